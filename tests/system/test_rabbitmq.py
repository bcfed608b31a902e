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
from tests.system.conftest import Proc, _toml

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


# The aggregator first, agents joining after its retained task and global are out:
# test_broker_matrix.py::test_processes_outlive_a_killed_aggregator[rabbitmq].
@pytest.mark.parametrize("first", ["agents"])
async def test_processes_federate_through_rabbitmq_whichever_starts_first(
    rabbitmq_url: str, tmp_path: Path, federation: str, first: str
) -> None:
    common = {"federation": federation, "mqtt": {"url": rabbitmq_url}}
    aggregator_file = tmp_path / "aggregator.toml"
    aggregator_file.write_text(_toml(common | {
        "max_versions": 3, "json_out": str(tmp_path / "results.json"),
        "eval_data": "synthetic:n=16,seed=9", "strategy": {"buffer_size": 2},
        "train": {"local_steps": 2, "batch_size": 4, "seq_len": 16},
    }))  # fmt: skip
    aggregator = Proc(
        "aggregator", ["aggregator", "--config", str(aggregator_file)], tmp_path / "a.log"
    )
    agents = []
    for i in range(2):
        agent_file = tmp_path / f"dev{i}.toml"
        agent_file.write_text(_toml(common | {
            "client_id": f"dev{i}", "data": f"synthetic:n=32,seed={i + 1}", "max_updates": 3,
            "seed": i, "torch_threads": 1,
        }))  # fmt: skip
        agents.append(
            Proc(f"dev{i}", ["agent", "--config", str(agent_file)], tmp_path / f"{i}.log")
        )
    early, late = ([aggregator], agents) if first == "aggregator" else (agents, [aggregator])
    procs = [*early, *late]
    try:
        for proc in early:
            proc.start()
        # The late ones start once the early ones are up: an aggregator has published its
        # retained task and global, agents are connected and waiting.
        sign = " ready at " if first == "aggregator" else "connected to"
        while not all(sign in proc.text() for proc in early):
            assert all(proc.running for proc in early), early[0].text()
            await asyncio.sleep(0.2)
        for proc in late:
            proc.start()
        codes = {proc.name: await proc.exited(150) for proc in procs}
    finally:
        for proc in procs:
            proc.cleanup()
    logs = "\n".join(f"--- {p.name}\n{p.text()[-2000:]}" for p in (aggregator, *agents))
    assert codes == {"aggregator": 0, "dev0": 0, "dev1": 0}, logs
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    assert history[-1]["version"] == 3
