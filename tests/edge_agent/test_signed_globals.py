"""Agents train only on globals the aggregator signed, through a broker with no ACL at all.

The broker here is the development one (anonymous, no ACL): anyone may publish on
``global``, which is exactly what the signature is for.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.agent import AgentReport, run_agent
from edge_agent.config import AgentConfig
from edgefed.data.synthetic import synthetic_shards
from edgefed.security.signing import GlobalSigner, write_keypair
from edgefed.transport.config import TransportConfig
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import GlobalModel
from tests.edgefed.transport_helpers import until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_agent_refuses_forged_globals_and_trains_on_the_next_valid_one(
    mosquitto_url: str, federation: str, tmp_path: Path
) -> None:
    write_keypair(tmp_path / "agg.key", tmp_path / "agg.pub")
    write_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    config = AggregatorConfig(
        federation=federation,
        signing_key=str(tmp_path / "agg.key"),
        max_versions=5,
        strategy={"name": "fedbuff", "buffer_size": 1},  # type: ignore[arg-type]
    )
    agent_config = AgentConfig(
        federation=federation,
        client_id="dev-1",
        data="synthetic",
        trusted_global_keys=(str(tmp_path / "agg.pub"),),
    )
    report = AgentReport(client_id="dev-1")
    shard = synthetic_shards(1, total=64, seq_len=config.train.seq_len, seed=3)[0]
    aggregator_settings = TransportConfig(url=mosquitto_url, client_id=f"agg-{uuid.uuid4().hex}")
    async with MqttTransport(aggregator_settings) as transport:
        service = AggregatorService(config, transport)
        serving = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        shapes = {name: t.shape for name, t in service.current.items()}

        def poisoned(version: int) -> GlobalModel:
            tensors = {name: torch.full(shape, 9.0) for name, shape in shapes.items()}
            return GlobalModel(
                task_id=config.task_id, version=version, run_id=service.run_id, tensors=tensors
            )

        # Three forged "next versions" of the current run, as an intruder on an open broker
        # would send them on the topic the agent follows: the genuine key's signature over
        # other tensors (tampered), a signature by another key, and no signature at all.
        genuine = GlobalSigner.from_file(tmp_path / "agg.key")
        signed_other = genuine.sign(
            GlobalModel(
                task_id=config.task_id, version=11, run_id=service.run_id, tensors=service.current
            ),
            federation=federation,
        )
        tampered = poisoned(11).model_copy(update={"signature": signed_other.signature})
        rogue = GlobalSigner.from_file(tmp_path / "rogue.key").sign(
            poisoned(12), federation=federation
        )
        forged = [tampered, rogue, poisoned(13)]
        agent = asyncio.create_task(
            run_agent(agent_config, url=mosquitto_url, data=shard, report=report)
        )
        try:
            await until(lambda: report.accepted >= 1)
            async with service._lock:  # no new version while the intruder sends
                await asyncio.sleep(0.5)  # the agent follows the current version's topic
                topic = topics.global_model(federation, service.version)
                async with MqttTransport(
                    TransportConfig(url=mosquitto_url, client_id="intruder")
                ) as bad:
                    for model in forged:
                        await bad.publish(topic, model)
                await until(lambda: report.refused_globals >= len(forged))
            await asyncio.wait_for(serving, 60)
            await until(lambda: report.accepted >= 5)  # the last ack is on its way
        finally:
            agent.cancel()
            await asyncio.gather(agent, return_exceptions=True)

    assert report.refused_globals == len(forged)
    # Training went on: every version was built from this agent's updates, each based on
    # the newest genuine global it had, moving on as new genuine versions arrived.
    assert service.version == 5
    assert report.accepted >= 5
    updates = service.results.updates
    assert all(u.accepted for u in updates), updates
    bases = [u.base_version for u in updates]
    assert bases == sorted(bases) and bases[-1] >= 3, bases
