"""RabbitMQ's MQTT plugin: retained messages only for subscriptions without wildcards.

Before devices subscribed to the exact topics their task names, a run against RabbitMQ hung
at version 0 with no error: agents that joined after the aggregator never saw the retained
global.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edgefed.cli.main import COMMANDS, build_parser
from tests.brokers import BrokerPool
from tests.conftest import broker_url
from tests.system.conftest import tiny_federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def rabbitmq_url(broker_pool: BrokerPool) -> str:
    return broker_url(broker_pool, "rabbitmq")


async def test_simulate_reaches_its_versions_through_rabbitmq(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    args = build_parser().parse_args(
        ["simulate", "--broker", rabbitmq_url, "--model", "tiny", "--agents", "4",
         "--max-versions", "20", "--json-out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert await asyncio.wait_for(asyncio.to_thread(COMMANDS["simulate"].run, args), 180) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["history"][-1]["version"] == 20


async def test_processes_federate_through_rabbitmq_when_agents_start_first(
    rabbitmq_url: str, tmp_path: Path, federation: str
) -> None:
    """The aggregator starting first, agents joining after its retained task and global are
    out: test_broker_matrix.py::test_processes_outlive_a_killed_aggregator[rabbitmq]."""
    fed = tiny_federation(
        tmp_path, rabbitmq_url, federation, aggregator={"max_versions": 3}, agent={"max_updates": 3}
    )
    aggregator, agents = fed.aggregator, fed.agents
    procs = [*agents, aggregator]
    try:
        for agent in agents:
            agent.start()
        # The aggregator starts once the agents are connected and waiting.
        while not all("connected to" in agent.text() for agent in agents):
            assert all(agent.running for agent in agents), agents[0].text()
            await asyncio.sleep(0.2)
        aggregator.start()
        codes = {proc.name: await proc.exited(150) for proc in procs}
    finally:
        for proc in procs:
            proc.cleanup()
    logs = "\n".join(f"--- {p.name}\n{p.text()[-2000:]}" for p in (aggregator, *agents))
    assert codes == {"aggregator": 0, "dev0": 0, "dev1": 0}, logs
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    assert history[-1]["version"] == 3
