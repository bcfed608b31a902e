"""The core federation against every broker: Mosquitto, amqtt, RabbitMQ and NATS.

For each broker, started privately on free ports: a simulated forward-gradient fleet learns,
and a federation of separate ``edgefed`` processes (one LoRA device, one
forward-gradient device) goes on after its aggregator is killed with SIGKILL and started
again, with every acked update merged exactly once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgefed.cli.main import COMMANDS, build_parser
from tests.brokers import BROKERS, BrokerKind, BrokerPool
from tests.conftest import broker_url
from tests.system.conftest import Federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def url(request: pytest.FixtureRequest, broker_pool: BrokerPool) -> str:
    kind: BrokerKind = request.param
    return broker_url(broker_pool, kind)


def _brokers(*left_to_others: BrokerKind) -> pytest.MarkDecorator:
    kinds = [kind for kind in BROKERS if kind not in left_to_others]
    return pytest.mark.parametrize("url", kinds, indirect=True)


@_brokers("mosquitto")
async def test_a_simulated_forward_gradient_fleet_learns(url: str, tmp_path: Path) -> None:
    """Seeds instead of deltas, and perturbation counts adapted per device, on every broker."""
    args = build_parser().parse_args(
        ["simulate", "--broker", url, "--model", "tiny", "--agents", "2", "--method", "fwdgrad",
         "--max-versions", "3", "--json-out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert await asyncio.wait_for(asyncio.to_thread(COMMANDS["simulate"].run, args), 120) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    history = results["history"]
    assert history[-1]["version"] == 3
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert {u["method"] for u in results["updates"]} == {"fwdgrad"}


@_brokers("mosquitto", "amqtt")
async def test_processes_outlive_a_killed_aggregator(
    url: str, federation_of: Callable[..., Any]
) -> None:
    aggregator_settings = {
        "method": "lora", "accept_methods": ["fwdgrad"], "eval_data": "synthetic:n=16,seed=9",
        "eval_every": 1000, "strategy": {"name": "fedbuff", "buffer_size": 2},
        "train": {"local_steps": 2, "batch_size": 4, "seq_len": 16},
    }  # fmt: skip
    agent_settings = {"ack_timeout_s": 5.0, "max_resends": 100, "torch_threads": 1}
    fed: Federation = federation_of(_At(url), aggregator_settings, agent_settings)
    aggregator = fed.aggregator(max_versions=4).start()
    # Agents join after the retained task and global are out (RabbitMQ hands retained
    # messages only to exact subscriptions).
    await fed.until("the aggregator ready", lambda: " ready at " in aggregator.text())
    fed.agent_settings = agent_settings | {"method": "fwdgrad"}
    fwdgrad = fed.agent("dev1", max_updates=4, seed=1).start()
    fed.agent_settings = agent_settings
    lora = fed.agent("dev0", max_updates=4, seed=0).start()
    await fed.until("3 updates accepted", lambda: fed.accepted_in_audit() >= 3, 90)
    aggregator.kill()
    aggregator.start()
    assert await aggregator.exited(120) == 0, fed.logs()
    for agent in (lora, fwdgrad):
        assert await agent.exited(60) == 0, fed.logs()
    result = fed.check_exactly_once(["dev0", "dev1"])
    assert result.versions == (1, 2, 3, 4)
    assert len(result.merged) == 8
    assert "resumed" in aggregator.text(), fed.logs()
    assert "dev0 (lora): 4 updates, 4 accepted" in lora.text(), fed.logs()
    assert "dev1 (fwdgrad): 4 updates, 4 accepted" in fwdgrad.text(), fed.logs()


class _At:
    """What ``federation_of`` reads of a broker: its URL."""

    def __init__(self, url: str) -> None:
        self.url = url
