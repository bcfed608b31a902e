"""Pre-sums at the merger: their parts are acked, audited and merged once, repeats refused.

The unit tests cover :class:`aggregator.presums.Presums`; the rest run an
:class:`~aggregator.service.AggregatorService` in-process against the real broker and play
the intake replicas (and the devices) by hand.
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
from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.presums import Presums
from aggregator.service import AggregatorService
from aggregator.strategies import MergeResult
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.errors import ConfigError
from schemas.messages import Ack, Part, TensorMap, Update

WAIT_S = 15.0
"""Longest a test waits for one answer."""

# -- Presums, alone


def _part(update_id: str, client_id: str, *, base: int = 0, staleness: int = 0) -> Part:
    return Part(
        update_id=update_id, client_id=client_id, base_version=base, num_samples=4,
        staleness=staleness,
    )  # fmt: skip


def _presum(client_id: str, parts: tuple[Part, ...], **fields: object) -> Update:
    values: dict[str, object] = {
        "client_id": client_id,
        "task_id": "task-1",
        "base_version": 3,
        "num_samples": max(1, 4 * len(parts)),
        "delta": {"w": torch.zeros(2)},
        "parts": parts,
    }
    return Update.model_validate(values | fields)


def _buffered() -> MergeResult:
    return MergeResult(new_global=None, weight=1.0)


def _merge(*update_ids: str) -> MergeResult:
    return MergeResult(new_global={"w": torch.ones(2)}, weight=1.0, merged_update_ids=update_ids)


def test_answers_accept_every_part_at_the_merge_version() -> None:
    update = _presum(
        "intake-1",
        (_part("x", "dev1", base=3, staleness=0), _part("y", "dev2", base=1, staleness=2)),
    )
    answers = Presums.answers(update, version=4)
    assert [(ack.update_id, ack.client_id) for ack, _ in answers] == [("x", "dev1"), ("y", "dev2")]
    for ack, _ in answers:
        assert ack.accepted and ack.reason is None and not ack.duplicate
        assert ack.version == 4 and not ack.merged_before
    assert [ack.staleness for ack, _ in answers] == [0, 2]
    entries = [entry for _, entry in answers]
    assert [(e.update_id, e.client_id, e.decision) for e in entries] == [
        ("x", "dev1", "accepted"),
        ("y", "dev2", "accepted"),
    ]
    assert [(e.base_version, e.staleness, e.version) for e in entries] == [(3, 0, 4), (1, 2, 4)]


def test_answers_none_for_an_update_without_parts() -> None:
    assert Presums.answers(_presum("dev1", ()), version=1) == []


def test_merged_replaces_a_presum_by_its_parts_once() -> None:
    presums = Presums()
    update = _presum("intake-1", (_part("x", "dev1"), _part("y", "dev2")))
    result = presums.merged(update, _merge(update.update_id))
    assert result.merged_update_ids == ("x", "y")
    assert result.new_global is not None and result.weight == 1.0
    assert presums.parts == {}  # popped: a pre-sum is merged once
    plain = _presum("dev3", ())
    assert presums.merged(plain, _merge(plain.update_id)).merged_update_ids == (plain.update_id,)
    assert presums.parts == {}


def test_merged_keeps_a_buffered_presum_until_its_merge() -> None:
    presums = Presums()
    first = _presum("intake-1", (_part("x", "dev1"), _part("y", "dev2")))
    buffered = presums.merged(first, _buffered())
    assert buffered.merged_update_ids == () and buffered.new_global is None
    assert presums.parts == {first.update_id: ["x", "y"]}
    plain = _presum("dev3", ())
    result = presums.merged(plain, _merge(first.update_id, plain.update_id))
    assert result.merged_update_ids == ("x", "y", plain.update_id)
    assert presums.parts == {}


def test_merged_before_finds_only_accepted_parts() -> None:
    update = _presum("intake-2", (_part("x", "dev1"), _part("y", "dev2"), _part("z", "dev3")))
    answered = {
        "x": Ack(update_id="x", client_id="dev1", accepted=True, version=1),
        "y": Ack(update_id="y", client_id="dev2", accepted=False, reason="stale", version=1),
        "other": Ack(update_id="other", client_id="dev9", accepted=True, version=1),
    }
    assert Presums.merged_before(update, answered) == ("x",)
    assert Presums.merged_before(update, {}) == ()
    assert Presums.merged_before(_presum("dev1", ()), answered) == ()


def test_state_round_trip() -> None:
    presums = Presums()
    first = _presum("intake-1", (_part("x", "dev1"), _part("y", "dev2")))
    second = _presum("intake-2", (_part("z", "dev3"),))
    presums.merged(first, _buffered())
    presums.merged(second, _buffered())
    restored = Presums()
    restored.load_state_dict(presums.state_dict())
    assert restored.parts == {first.update_id: ["x", "y"], second.update_id: ["z"]}
    third = _presum("dev4", ())
    result = restored.merged(third, _merge(second.update_id, first.update_id, third.update_id))
    assert result.merged_update_ids == ("z", "x", "y", third.update_id)
    restored.load_state_dict({})  # a checkpoint without pre-sums
    assert restored.parts == {}


@pytest.mark.parametrize(
    "state",
    [
        {"parts": ["x", "y"]},
        {"parts": {"p": "x"}},
        {"parts": {"p": [1, 2]}},
        {"parts": {"p": ["x", None]}},
        {"parts": None},
    ],
)
def test_malformed_state_is_a_config_error(state: dict[str, object]) -> None:
    presums = Presums()
    presums.parts = {"kept": ["a"]}
    with pytest.raises(ConfigError):
        presums.load_state_dict(state)
    assert presums.parts == {"kept": ["a"]}


# -- the merger against the broker


@contextlib.asynccontextmanager
async def running_service(
    url: str, federation: str, **settings: object
) -> AsyncIterator[AggregatorService]:
    config = AggregatorConfig.model_validate(
        {
            "federation": federation,
            "strategy": StrategySettings(name="fedasync"),
            "eval_every": 0,
        }
        | settings
    )
    transport_config = TransportConfig(url=url, client_id=f"{federation}-aggregator")
    async with MqttTransport(transport_config) as transport:
        service = AggregatorService(config, transport)
        task = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.ready.wait(), 60)
            yield service
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Inbox:
    """Every ack a transport receives, read in the background."""

    def __init__(self, transport: MqttTransport) -> None:
        self.transport = transport
        self.acks: list[Ack] = []

    async def read(self) -> None:
        async for delivery in self.transport.deliveries():
            if isinstance(delivery, Delivery) and isinstance(delivery.message, Ack):
                self.acks.append(delivery.message)

    def of(self, client_id: str) -> list[Ack]:
        return [ack for ack in self.acks if ack.client_id == client_id]

    async def wait_for(self, found: Callable[[Ack], bool]) -> Ack:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for ack in self.acks:
                if found(ack):
                    return ack
            await asyncio.sleep(0.02)
        raise AssertionError(f"no such ack within {WAIT_S} s; received {self.acks}")


@contextlib.asynccontextmanager
async def inbox(url: str, federation: str, clients: list[str]) -> AsyncIterator[Inbox]:
    """A connection that publishes as the replicas and devices and hears their acks."""
    config = TransportConfig(url=url, client_id=f"{federation}-clients")
    async with MqttTransport(config) as transport:
        for client in clients:
            await transport.subscribe(topics.ack(federation, client))
        box = Inbox(transport)
        reader = asyncio.create_task(box.read())
        try:
            yield box
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def _small_delta(like: TensorMap, value: float = 0.01) -> TensorMap:
    return {name: torch.full_like(t, value) for name, t in like.items()}


def _clone(tensors: TensorMap) -> TensorMap:
    return {name: t.clone() for name, t in tensors.items()}


def _same(a: TensorMap, b: TensorMap) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.broker
async def test_merger_acks_parts_and_refuses_a_presum_with_a_part_taken_before(
    mosquitto_url: str, federation: str, tmp_path: Path
) -> None:
    clients = ["intake-1", "intake-2", "dev1", "dev2", "dev3"]
    async with (
        running_service(
            mosquitto_url, federation, intake="replicas", checkpoint_dir=str(tmp_path)
        ) as service,
        inbox(mosquitto_url, federation, clients) as box,
    ):
        fed, task_id = federation, service.config.task_id
        initial = _clone(service.current)

        def presum(replica: str, parts: tuple[Part, ...], base: int) -> Update:
            return Update(
                client_id=replica, task_id=task_id, run_id=service.run_id, base_version=base,
                num_samples=sum(p.num_samples for p in parts), delta=_small_delta(initial),
                parts=parts,
            )  # fmt: skip

        x, y, z = _part("upd-x", "dev1"), _part("upd-y", "dev2"), _part("upd-z", "dev3", base=1)

        # P1: both its devices are answered by the merger, with the version P1 made.
        p1 = presum("intake-1", (x, y), base=0)
        await box.transport.publish(topics.intake(fed, "intake-1"), p1)
        replica_ack = await box.wait_for(lambda a: a.update_id == p1.update_id)
        assert replica_ack.client_id == "intake-1" and replica_ack.accepted
        assert replica_ack.version == 1 and not replica_ack.duplicate
        ack_x = await box.wait_for(lambda a: a.update_id == "upd-x")
        ack_y = await box.wait_for(lambda a: a.update_id == "upd-y")
        assert (ack_x.client_id, ack_x.accepted, ack_x.version, ack_x.staleness) == (
            "dev1", True, 1, 0
        )  # fmt: skip
        assert (ack_y.client_id, ack_y.accepted, ack_y.version, ack_y.staleness) == (
            "dev2", True, 1, 0
        )  # fmt: skip
        assert not ack_x.duplicate and not ack_y.duplicate
        assert service.version == 1
        after_p1 = _clone(service.current)
        assert not _same(after_p1, initial)

        # P2 holds X again (another replica took its repeat): refused, X's device re-acked.
        p2 = presum("intake-2", (x, z), base=1)
        await box.transport.publish(topics.intake(fed, "intake-2"), p2)
        refusal = await box.wait_for(lambda a: a.update_id == p2.update_id)
        assert refusal.client_id == "intake-2" and not refusal.accepted
        assert refusal.reason == "duplicate" and refusal.merged_before == ("upd-x",)
        again = await box.wait_for(lambda a: a.update_id == "upd-x" and a.duplicate)
        assert (again.client_id, again.accepted, again.version) == ("dev1", True, 1)
        await asyncio.sleep(0.5)  # time for any answer that should not come
        assert box.of("dev3") == [], "Z was refused with its pre-sum: its replica sends it again"
        assert [a.update_id for a in box.of("dev2")] == ["upd-y"]
        assert len(box.of("dev1")) == 2
        assert service.version == 1
        assert _same(service.current, after_p1)

        # P3 holds only Z: accepted.
        p3 = presum("intake-2", (z,), base=1)
        await box.transport.publish(topics.intake(fed, "intake-2"), p3)
        accepted = await box.wait_for(lambda a: a.update_id == p3.update_id)
        assert accepted.accepted and accepted.version == 2
        ack_z = await box.wait_for(lambda a: a.update_id == "upd-z")
        assert (ack_z.client_id, ack_z.accepted, ack_z.version, ack_z.duplicate) == (
            "dev3", True, 2, False
        )  # fmt: skip
        assert service.version == 2
        assert service.rejections == {"duplicate": 1}
        assert service.results.merges == {"upd-x": 1, "upd-y": 1, "upd-z": 1}

    # The audit log names the device updates: accepted once each, merged once each.
    entries = read_audit(tmp_path / AUDIT_FILE)
    accepted_entries = [
        e for e in entries if isinstance(e, UpdateEntry) and e.decision == "accepted"
    ]
    by_id = {e.update_id: e for e in accepted_entries}
    assert len(by_id) == len(accepted_entries), "an update accepted twice"
    assert (by_id["upd-x"].client_id, by_id["upd-x"].version) == ("dev1", 1)
    assert (by_id["upd-y"].client_id, by_id["upd-y"].version) == ("dev2", 1)
    assert (by_id["upd-z"].client_id, by_id["upd-z"].version) == ("dev3", 2)
    assert all(by_id[i].commit is not None for i in ("upd-x", "upd-y", "upd-z"))
    merges = [e for e in entries if isinstance(e, MergeEntry)]
    assert [(m.version, m.update_ids) for m in merges] == [
        (1, ("upd-x", "upd-y")),
        (2, ("upd-z",)),
    ]
    refused = [e for e in entries if isinstance(e, UpdateEntry) and e.update_id == p2.update_id]
    assert [(e.client_id, e.decision, e.reason) for e in refused] == [
        ("intake-2", "rejected", "duplicate")
    ]


@pytest.mark.broker
async def test_merger_behind_replicas_nacks_a_presum_without_parts(
    mosquitto_url: str, federation: str
) -> None:
    async with (
        running_service(mosquitto_url, federation, intake="replicas") as service,
        inbox(mosquitto_url, federation, ["intake-1", "dev1"]) as box,
    ):
        initial = _clone(service.current)
        plain = Update(
            client_id="dev1", task_id=service.config.task_id, base_version=0, num_samples=8,
            delta=_small_delta(initial),
        )  # fmt: skip
        # A device's own update is not the merger's to read behind replicas.
        await box.transport.publish(topics.update(federation, "dev1"), plain)
        not_presum = plain.model_copy(update={"client_id": "intake-1", "update_id": "upd-p"})
        await box.transport.publish(topics.intake(federation, "intake-1"), not_presum)
        nack = await box.wait_for(lambda a: a.client_id == "intake-1")
        assert not nack.accepted and nack.reason == "malformed", nack
        await asyncio.sleep(0.5)
        assert box.of("dev1") == []
        assert len(box.acks) == 1
        assert service.version == 0
        assert _same(service.current, initial)


@pytest.mark.broker
async def test_direct_merger_nacks_an_update_with_parts(
    mosquitto_url: str, federation: str
) -> None:
    async with (
        running_service(mosquitto_url, federation) as service,
        inbox(mosquitto_url, federation, ["dev1", "dev2"]) as box,
    ):
        initial = _clone(service.current)
        smuggled = Update(
            client_id="dev1", task_id=service.config.task_id, base_version=0, num_samples=8,
            delta=_small_delta(initial), parts=(_part("upd-a", "dev2"),),
        )  # fmt: skip
        await box.transport.publish(topics.update(federation, "dev1"), smuggled)
        nack = await box.wait_for(lambda a: a.client_id == "dev1")
        assert not nack.accepted and nack.reason == "malformed", nack
        assert service.version == 0
        assert _same(service.current, initial)
        # The same update without parts is a device's own: merged.
        plain = smuggled.model_copy(update={"parts": (), "update_id": "upd-plain"})
        await box.transport.publish(topics.update(federation, "dev1"), plain)
        ack = await box.wait_for(lambda a: a.update_id == "upd-plain")
        assert ack.accepted and ack.version == 1
        await asyncio.sleep(0.3)
        assert box.of("dev2") == []
