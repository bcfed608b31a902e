"""Agents follow only tasks the aggregator signed, through a broker with no ACL at all.

The task says what to train, at which learning rate, on which proxy rows: on the open
development broker anyone may publish on ``task``, which is what its signature is for.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.agent import AgentReport, run_agent
from edge_agent.config import AgentConfig
from edgefed.data.synthetic import synthetic_shards
from edgefed.security.signing import GlobalSigner, GlobalVerifier, write_keypair
from edgefed.transport.config import TransportConfig
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import ModelRef, Task, TrainSpec
from tests.edgefed.transport_helpers import receive_message, until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _trusting_agent(federation: str, key: Path) -> tuple[AgentConfig, AgentReport]:
    """Device ``dev-1``, trusting only tasks and globals signed with ``key``'s private half."""
    config = AgentConfig(
        federation=federation, client_id="dev-1", data="synthetic", trusted_global_keys=(str(key),)
    )
    return config, AgentReport(client_id="dev-1")


async def test_agent_refuses_forged_tasks_and_follows_the_genuine_one(
    mosquitto_url: str, federation: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_keypair(tmp_path / "agg.key", tmp_path / "agg.pub")
    write_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    config = AggregatorConfig(
        federation=federation,
        signing_key=str(tmp_path / "agg.key"),
        max_versions=2,
        strategy={"name": "fedbuff", "buffer_size": 1},
    )
    agent_config, report = _trusting_agent(federation, tmp_path / "agg.pub")
    shard = synthetic_shards(1, total=64, seq_len=config.train.seq_len, seed=3)[0]
    settings = TransportConfig(url=mosquitto_url, client_id=f"agg-{uuid.uuid4().hex}")
    async with (
        MqttTransport(settings) as transport,
        MqttTransport(TransportConfig(url=mosquitto_url, client_id="intruder")) as intruder,
    ):
        service = AggregatorService(config, transport)
        serving = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        await intruder.subscribe(topics.task(federation))
        genuine = (await receive_message(intruder)).message
        assert isinstance(genuine, Task) and genuine.signature is not None
        GlobalVerifier.from_files([tmp_path / "agg.pub"]).verify(genuine, federation=federation)

        # The genuine signature over a learning rate 1000x larger; a task signed by another
        # key; no signature at all. The first is left retained, as an intruder would.
        steered: TrainSpec = genuine.train.model_copy(update={"lr": 5.0})
        tampered = genuine.model_copy(update={"train": steered})
        rogue = GlobalSigner.from_file(tmp_path / "rogue.key").sign(tampered, federation=federation)
        unsigned = tampered.model_copy(update={"signature": None})
        await intruder.publish(topics.task(federation), tampered, retain=True)
        agent = asyncio.create_task(
            run_agent(agent_config, url=mosquitto_url, data=shard, report=report)
        )
        try:
            await until(lambda: report.refused_tasks == 1)
            for forged in (rogue, unsigned):
                await intruder.publish(topics.task(federation), forged, retain=True)
            await until(lambda: report.refused_tasks == 3)
            await asyncio.sleep(0.5)
            assert report.updates_sent == 0  # no task it trusts yet: it trains on nothing
            # The genuine task again (as the aggregator republishes it with every version).
            await intruder.publish(topics.task(federation), genuine, retain=True)
            await asyncio.wait_for(serving, 60)
            await until(lambda: report.accepted >= 2)  # the last ack is on its way
        finally:
            agent.cancel()
            await asyncio.gather(agent, return_exceptions=True)
            await intruder.clear_retained(topics.task(federation))

    assert report.refused_tasks == 3
    assert report.refused_globals == 0
    assert service.version == 2
    assert report.accepted >= 2
    refusals = [r.getMessage() for r in caplog.records if "task version" in r.getMessage()]
    assert len(refusals) == 3, refusals
    assert any("(unsigned)" in line for line in refusals)
    assert sum("(bad_signature)" in line for line in refusals) == 2


async def test_agent_ignores_a_replayed_older_version_of_its_task(
    mosquitto_url: str, federation: str, tmp_path: Path
) -> None:
    write_keypair(tmp_path / "agg.key", tmp_path / "agg.pub")
    signer = GlobalSigner.from_file(tmp_path / "agg.key")
    agent_config, report = _trusting_agent(federation, tmp_path / "agg.pub")
    shard = synthetic_shards(1, total=16, seq_len=TrainSpec().seq_len, seed=3)[0]

    def task(version: int, task_id: str = "t1") -> Task:
        unsigned = Task(
            task_id=task_id,
            federation=federation,
            version=version,
            model=ModelRef(name="tiny"),
            round_clients=("dev-1",) if version % 2 else (),
        )
        return signer.sign(unsigned, federation=federation)

    settings = TransportConfig(url=mosquitto_url, client_id=f"replayer-{uuid.uuid4().hex}")
    async with MqttTransport(settings) as replayer:
        agent = asyncio.create_task(
            run_agent(agent_config, url=mosquitto_url, data=shard, report=report)
        )
        try:
            await replayer.publish(topics.task(federation), task(5), retain=True)
            await asyncio.sleep(1.0)  # the agent follows version 5
            # Genuine signatures all: an earlier round's task, the same version again,
            # a newer version, then a new task whose versions start again.
            for replayed in (task(3), task(5), task(6), task(4), task(1, task_id="t2")):
                await replayer.publish(topics.task(federation), replayed)
            await until(lambda: report.stale_tasks == 2)
            await asyncio.sleep(0.5)
        finally:
            agent.cancel()
            await asyncio.gather(agent, return_exceptions=True)
            await replayer.clear_retained(topics.task(federation))
    assert report.stale_tasks == 2  # versions 3 and 4 of t1; t2 is a task of its own
    assert report.refused_tasks == 0
