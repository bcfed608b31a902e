"""An intake replica between the devices and the merger, in-process against the real broker.

The merger (``intake = "replicas"``) and one :class:`~aggregator.intake_replica.IntakeReplica`
run on their own connections; the test plays the devices (and, once, a second replica) and
listens to every ack and pre-sum on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from aggregator.audit import AUDIT_FILE, MergeEntry, UpdateEntry, read_audit
from aggregator.config import AggregatorConfig
from aggregator.connections import intake_transport
from aggregator.intake_replica import IntakeReplica
from aggregator.service import AggregatorService
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import Ack, Part, TensorMap, Update
from tests.aggregator.test_presums import running_service

WAIT_S = 10.0
"""Longest a test waits for one answer."""

pytestmark = pytest.mark.broker

REPLICA = "intake-1"
DEVICES = ["dev1", "dev2", "dev3", "dev4", "dev5"]


def running_merger(
    url: str, federation: str, checkpoint_dir: Path
) -> contextlib.AbstractAsyncContextManager[AggregatorService]:
    return running_service(url, federation, intake="replicas", checkpoint_dir=str(checkpoint_dir))


@contextlib.asynccontextmanager
async def running_replica(url: str, federation: str) -> AsyncIterator[IntakeReplica]:
    config = AggregatorConfig(
        federation=federation, role="intake", site_id=REPLICA, presum_size=2, presum_delay_s=0.3
    )
    async with MqttTransport(intake_transport(config, url=url)) as transport:
        replica = IntakeReplica(config, transport)
        task = asyncio.create_task(replica.run())
        try:
            deadline = time.monotonic() + 20
            while not replica.taking:  # subscribed to its share of the devices' updates
                if task.done():
                    task.result()
                    raise AssertionError("the replica stopped before taking updates")
                assert time.monotonic() < deadline, "the replica never took the root's task"
                await asyncio.sleep(0.02)
            yield replica
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Broker:
    """The devices' connection: publishes their updates, hears every ack and pre-sum."""

    def __init__(self, transport: MqttTransport, federation: str) -> None:
        self.transport = transport
        self.federation = federation
        self.acks: list[Ack] = []
        self.presums: list[Update] = []

    async def read(self) -> None:
        async for delivery in self.transport.deliveries():
            if not isinstance(delivery, Delivery):
                continue
            if isinstance(delivery.message, Ack):
                self.acks.append(delivery.message)
            elif isinstance(delivery.message, Update) and delivery.message.parts:
                self.presums.append(delivery.message)

    async def send(self, update: Update) -> None:
        await self.transport.publish(topics.update(self.federation, update.client_id), update)

    def acks_of(self, client_id: str) -> list[Ack]:
        return [ack for ack in self.acks if ack.client_id == client_id]

    async def ack(self, found: Callable[[Ack], bool]) -> Ack:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for ack in self.acks:
                if found(ack):
                    return ack
            await asyncio.sleep(0.02)
        raise AssertionError(f"no such ack within {WAIT_S} s; received {self.acks}")

    async def presum(self, found: Callable[[Update], bool]) -> Update:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for presum in self.presums:
                if found(presum):
                    return presum
            await asyncio.sleep(0.02)
        seen = [(p.client_id, [part.update_id for part in p.parts]) for p in self.presums]
        raise AssertionError(f"no such pre-sum within {WAIT_S} s; saw {seen}")


@contextlib.asynccontextmanager
async def devices(url: str, federation: str) -> AsyncIterator[Broker]:
    config = TransportConfig(url=url, client_id=f"{federation}-devices")
    async with MqttTransport(config) as transport:
        for client in [*DEVICES, REPLICA]:
            await transport.subscribe(topics.ack(federation, client))
        await transport.subscribe(topics.intake_filter(federation))
        broker = Broker(transport, federation)
        reader = asyncio.create_task(broker.read())
        try:
            yield broker
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def device_update(service: AggregatorService, client_id: str, **changes: object) -> Update:
    delta: TensorMap = {name: torch.full_like(t, 0.01) for name, t in service.current.items()}
    fields: dict[str, object] = {
        "client_id": client_id,
        "task_id": service.config.task_id,
        "run_id": service.run_id,
        "base_version": service.version,
        "num_samples": 8,
        "delta": delta,
    }
    return Update.model_validate(fields | changes)


def merged_ids(checkpoint_dir: Path) -> list[str]:
    entries = read_audit(checkpoint_dir / AUDIT_FILE)
    return [uid for e in entries if isinstance(e, MergeEntry) for uid in e.update_ids]


async def test_replica_checks_device_updates_and_the_merger_acks_them(
    mosquitto_url: str, federation: str, tmp_path: Path
) -> None:
    async with (
        running_merger(mosquitto_url, federation, tmp_path) as service,
        running_replica(mosquitto_url, federation) as replica,
        devices(mosquitto_url, federation) as broker,
    ):
        first, second = device_update(service, "dev1"), device_update(service, "dev2")
        await broker.send(first)
        await broker.send(second)
        ack1 = await broker.ack(lambda a: a.update_id == first.update_id)
        ack2 = await broker.ack(lambda a: a.update_id == second.update_id)
        for ack, client in ((ack1, "dev1"), (ack2, "dev2")):
            assert ack.client_id == client and ack.accepted and not ack.duplicate, ack
            assert ack.version == 1 and ack.staleness == 0
        assert service.version == 1
        presum = await broker.presum(lambda p: p.client_id == REPLICA)
        assert {p.update_id for p in presum.parts} == {first.update_id, second.update_id}
        assert {p.client_id for p in presum.parts} == {"dev1", "dev2"}
        assert presum.num_samples == 16 and presum.base_version == 0
        answer = await broker.ack(lambda a: a.update_id == presum.update_id)
        assert answer.client_id == REPLICA and answer.accepted
        assert len(broker.presums) == 1, "two device updates make one pre-sum"
        assert replica.taken == 2
        for _ in range(500):  # the replica reads the merger's answer
            if replica.merged >= 2:
                break
            await asyncio.sleep(0.02)
        assert replica.merged == 2

        # A device update the replica refuses never reaches the merger.
        wrong = device_update(service, "dev3", task_id="another-task")
        await broker.send(wrong)
        nack = await broker.ack(lambda a: a.update_id == wrong.update_id)
        assert (nack.client_id, nack.accepted, nack.reason) == ("dev3", False, "wrong_task"), nack
        await asyncio.sleep(0.6)  # past presum_delay_s: a pre-sum holding it would be out
        assert len(broker.presums) == 1
        assert broker.acks_of("dev3") == [nack]
        assert service.version == 1
        assert replica.taken == 2

    assert sorted(merged_ids(tmp_path)) == sorted([first.update_id, second.update_id])
    assert service.results.merges == {first.update_id: 1, second.update_id: 1}


async def test_replica_sends_the_rest_when_the_merger_took_a_part_before(
    mosquitto_url: str, federation: str, tmp_path: Path
) -> None:
    async with (
        running_merger(mosquitto_url, federation, tmp_path) as service,
        running_replica(mosquitto_url, federation) as replica,
        devices(mosquitto_url, federation) as broker,
    ):
        x = device_update(service, "dev4")
        y = device_update(service, "dev5")
        # Another replica took X first (its device sent it twice): merged at version 1.
        part = Part(
            update_id=x.update_id, client_id="dev4", base_version=0, num_samples=8, staleness=0
        )
        other = x.model_copy(update={"update_id": "presum-9", "client_id": "intake-9",
                                     "parts": (part,)})  # fmt: skip
        await broker.transport.publish(topics.intake(federation, "intake-9"), other)
        taken = await broker.ack(lambda a: a.update_id == x.update_id)
        assert taken.accepted and taken.version == 1 and not taken.duplicate
        assert service.version == 1
        after_x = {name: t.clone() for name, t in service.current.items()}

        # Its repeat reaches this replica beside a new update Y: one pre-sum of both.
        await asyncio.gather(broker.send(x), broker.send(y))
        both = await broker.presum(lambda p: p.client_id == REPLICA)
        assert {p.update_id for p in both.parts} == {x.update_id, y.update_id}
        refusal = await broker.ack(lambda a: a.update_id == both.update_id)
        assert (refusal.client_id, refusal.accepted, refusal.reason) == (
            REPLICA, False, "duplicate"
        )  # fmt: skip
        assert refusal.merged_before == (x.update_id,)
        again = await broker.ack(lambda a: a.update_id == x.update_id and a.duplicate)
        assert (again.client_id, again.accepted, again.version) == ("dev4", True, 1)

        # The replica sends Y alone; the merger merges it and acks its device.
        rest = await broker.presum(lambda p: p.client_id == REPLICA and p is not both)
        assert [p.update_id for p in rest.parts] == [y.update_id]
        assert rest.num_samples == y.num_samples
        ack_y = await broker.ack(lambda a: a.update_id == y.update_id)
        assert (ack_y.client_id, ack_y.accepted, ack_y.version, ack_y.duplicate) == (
            "dev5", True, 2, False
        )  # fmt: skip
        accepted = await broker.ack(lambda a: a.update_id == rest.update_id)
        assert accepted.accepted and accepted.version == 2
        assert service.version == 2
        assert not all(torch.equal(service.current[n], t) for n, t in after_x.items())
        await asyncio.sleep(0.6)
        assert [p.update_id for p in broker.presums if p.client_id == REPLICA] == [
            both.update_id,
            rest.update_id,
        ]
        assert len(broker.acks_of("dev4")) == 2 and len(broker.acks_of("dev5")) == 1
        assert replica.merged == 1 and replica.taken == 2
        assert service.rejections == {"duplicate": 1}
        assert service.results.merges == {x.update_id: 1, y.update_id: 1}

    merged = merged_ids(tmp_path)
    assert sorted(merged) == sorted([x.update_id, y.update_id]), "a device update merged twice"
    entries = read_audit(tmp_path / AUDIT_FILE)
    accepted_x = [
        e for e in entries
        if isinstance(e, UpdateEntry) and e.update_id == x.update_id and e.decision == "accepted"
    ]  # fmt: skip
    assert len(accepted_x) == 1 and accepted_x[0].client_id == "dev4"
