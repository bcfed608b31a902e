"""The service over the in-memory transport: checkpoints, resume, audit log, held acks.

These are unit tests of the wiring (MemoryBroker, no socket); the crash tests against real
processes and a real broker are in tests/system/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from aggregator.audit import MergeEntry, UpdateEntry, read_audit
from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from edgefed.transport.frames import Delivery
from edgefed.transport.memory import MemoryBroker, MemoryTransport
from schemas import topics
from schemas.errors import ConfigError
from schemas.messages import Ack, GlobalModel, Metrics, TensorMap, Update

FED = "recovery"


def make_config(tmp_path: Path, **changes: object) -> AggregatorConfig:
    fields: dict[str, object] = {
        "federation": FED,
        "strategy": StrategySettings(name="fedbuff", buffer_size=2),
        "eval_data": "synthetic:n=8,seed=3",
        "eval_every": 1000,
        "checkpoint_dir": str(tmp_path / "ckpt"),
    }
    return AggregatorConfig.model_validate(fields | changes)


def make_update(
    shapes: TensorMap, client: str = "dev1", *, value: float = 0.01, base: int = 0
) -> Update:
    delta = {name: torch.full_like(t, value) for name, t in shapes.items()}
    return Update(client_id=client, task_id="task-1", base_version=base, num_samples=4, delta=delta)


class Harness:
    """A running service plus one device transport that sees every ack."""

    def __init__(self, service: AggregatorService, device: MemoryTransport) -> None:
        self.service = service
        self.device = device

    async def send(self, update: Update) -> None:
        await self.device.publish(topics.update(FED, update.client_id), update)

    async def ack(self, timeout_s: float = 5.0) -> Ack:
        async with asyncio.timeout(timeout_s):
            async for item in self.device.deliveries():
                if isinstance(item, Delivery) and isinstance(item.message, Ack):
                    return item.message
        raise AssertionError("delivery stream ended")

    async def send_and_ack(self, update: Update) -> Ack:
        await self.send(update)
        return await self.ack()


@contextlib.asynccontextmanager
async def running(config: AggregatorConfig, broker: MemoryBroker) -> AsyncIterator[Harness]:
    async with broker.transport("aggregator") as transport, broker.transport("device") as device:
        await device.subscribe(topics.ack(FED, "dev1"))
        await device.subscribe(topics.ack(FED, "dev2"))
        service = AggregatorService(config, transport)
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        try:
            yield Harness(service, device)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def snapshot(tensors: TensorMap) -> dict[str, bytes]:
    return {name: t.contiguous().view(torch.uint8).numpy().tobytes() for name, t in tensors.items()}


def audit_of(config: AggregatorConfig) -> list[UpdateEntry | MergeEntry]:
    assert config.checkpoint_dir is not None
    return read_audit(Path(config.checkpoint_dir) / "audit.jsonl")


async def test_service_resumes_version_global_and_buffer_after_a_stop(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running(config, MemoryBroker()) as run:
        shapes = run.service.current
        u1, u2, u3 = (make_update(shapes, value=v) for v in (0.01, 0.02, 0.03))
        assert (await run.send_and_ack(u1)).version == 0
        assert (await run.send_and_ack(u2)).version == 1
        third = await run.send_and_ack(u3)
        assert third.accepted and third.version == 1
        before = snapshot(run.service.current)
    # A new process: a fresh broker (nothing retained) and a fresh service on the same folder.
    broker = MemoryBroker()
    async with running(config, broker) as run:
        assert run.service.version == 1
        assert snapshot(run.service.current) == before
        again = await run.send_and_ack(u3)
        assert again.accepted and again.duplicate and again.version == 1
        fourth = await run.send_and_ack(make_update(shapes, value=0.04))
        assert fourth.accepted and fourth.version == 2
        await asyncio.wait_for(run.service.wait_for_version(2), 5)
        retained = [t for t in broker.retained if "/global/" in t]
        assert retained == [topics.global_model(FED, 2, 0)]
    entries = audit_of(config)
    accepted = [
        e.update_id for e in entries if isinstance(e, UpdateEntry) and e.decision == "accepted"
    ]
    merges = [e for e in entries if isinstance(e, MergeEntry)]
    assert len(accepted) == len(set(accepted)) == 4
    assert [(m.version, m.update_ids) for m in merges] == [
        (1, (u1.update_id, u2.update_id)),
        (2, (u3.update_id, accepted[3])),
    ]
    duplicates = [e for e in entries if isinstance(e, UpdateEntry) and e.decision == "duplicate"]
    assert [d.update_id for d in duplicates] == [u3.update_id]


async def test_service_republishes_retained_global_and_task_on_resume(tmp_path: Path) -> None:
    config = make_config(tmp_path, strategy=StrategySettings(name="fedasync"))
    async with running(config, MemoryBroker()) as run:
        await run.send_and_ack(make_update(run.service.current))
        merged = snapshot(run.service.current)
    broker = MemoryBroker()
    async with running(config, broker) as run, broker.transport("late") as late:
        await late.subscribe(topics.global_filter(FED))
        async with asyncio.timeout(5):
            async for item in late.deliveries():
                assert isinstance(item, Delivery)
                assert isinstance(item.message, GlobalModel)
                assert item.message.version == 1
                assert snapshot(item.message.tensors) == merged
                break
        assert topics.task(FED) in broker.retained


async def test_service_holds_acks_of_buffered_updates_until_checkpointed(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        strategy=StrategySettings(name="fedbuff", buffer_size=10),
        checkpoint_every=3,
        checkpoint_max_delay_s=0.3,
    )
    manifest = tmp_path / "ckpt" / "manifest.json"
    async with running(config, MemoryBroker()) as run:
        shapes = run.service.current
        await run.send(make_update(shapes, value=0.1))
        await run.send(make_update(shapes, value=0.2))
        with pytest.raises(TimeoutError):
            await run.ack(timeout_s=0.1)  # two held, fewer than checkpoint_every
        assert not manifest.exists()
        first = await run.ack(timeout_s=2)  # the delay ran out: committed, then answered
        assert first.accepted
        assert json.loads(manifest.read_text())["states"]["strategy"]["pending"] == 2
        await run.ack()
        for value in (0.3, 0.4, 0.5):
            await run.send(make_update(shapes, value=value))
        acks = [await run.ack(timeout_s=0.2) for _ in range(3)]  # the 3rd commits at once
        assert [(a.accepted, a.version) for a in acks] == [(True, 0)] * 3
        saved = json.loads(manifest.read_text())
        assert (saved["commit"], saved["states"]["strategy"]["pending"]) == (2, 5)


async def test_service_counts_rejections_per_reason_and_audits_them(tmp_path: Path) -> None:
    config = make_config(tmp_path, known_clients=frozenset({"dev1"}))
    broker = MemoryBroker()
    async with running(config, broker) as run, broker.transport("watch") as watch:
        await watch.subscribe(topics.metrics(FED))
        shapes = run.service.current
        nack = await run.send_and_ack(make_update(shapes, client="dev2"))
        assert (nack.accepted, nack.reason) == (False, "unknown_client")
        nack = await run.send_and_ack(make_update(shapes, base=3))
        assert nack.reason == "future_version"
        nan = {n: torch.full_like(t, float("nan")) for n, t in shapes.items()}
        bad = Update(client_id="dev1", task_id="task-1", base_version=0, num_samples=1, delta=nan)
        assert (await run.send_and_ack(bad)).reason == "non_finite"
        assert run.service.rejections == {
            "unknown_client": 1,
            "future_version": 1,
            "non_finite": 1,
        }
        ok = make_update(shapes)
        await run.send_and_ack(ok)
        await run.send_and_ack(make_update(shapes, value=0.5))  # second fills the buffer: v1
        async with asyncio.timeout(5):
            async for item in watch.deliveries():
                assert isinstance(item, Delivery) and isinstance(item.message, Metrics)
                if item.message.version == 1:
                    assert item.message.rejected_by_reason == run.service.rejections
                    break
    rejected = [
        (e.client_id, e.reason)
        for e in audit_of(config)
        if isinstance(e, UpdateEntry) and e.decision == "rejected"
    ]
    assert rejected == [
        ("dev2", "unknown_client"),
        ("dev1", "future_version"),
        ("dev1", "non_finite"),
    ]


async def test_service_refuses_an_update_id_reused_by_another_client(tmp_path: Path) -> None:
    config = make_config(tmp_path, strategy=StrategySettings(name="fedasync"))
    async with running(config, MemoryBroker()) as run:
        first = make_update(run.service.current, client="dev1")
        assert (await run.send_and_ack(first)).accepted
        thief = first.model_copy(update={"client_id": "dev2"})
        nack = await run.send_and_ack(thief)
        assert (nack.accepted, nack.reason, nack.client_id) == (False, "duplicate", "dev2")
        assert run.service.version == 1
        assert run.service.results.merges == {first.update_id: 1}


async def test_service_refuses_a_checkpoint_of_another_strategy(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running(config, MemoryBroker()) as run:
        await run.send_and_ack(make_update(run.service.current))  # one buffered update
    other = make_config(tmp_path, strategy=StrategySettings(name="fedasync"))
    async with broker_transport() as transport:
        service = AggregatorService(other, transport)
        with pytest.raises(ConfigError, match="fedbuff"):
            await service.start()


class Counter:
    """An extra piece of state, as a K controller would register it."""

    def __init__(self) -> None:
        self.k = 4
        self.variance = torch.zeros(3)

    def state_dict(self) -> dict[str, object]:
        return {"k": self.k, "variance": self.variance, "history": [1.5, float("inf")]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        k, variance = state["k"], state["variance"]
        assert isinstance(k, int) and isinstance(variance, torch.Tensor)
        assert state["history"] == [1.5, float("inf")]
        self.k, self.variance = k, variance


async def test_service_checkpoints_registered_state(tmp_path: Path) -> None:
    config = make_config(tmp_path, strategy=StrategySettings(name="fedasync"))
    async with broker_transport() as transport:
        service = AggregatorService(config, transport)
        counter = Counter()
        counter.k, counter.variance = 9, torch.tensor([0.5, 0.25, 2.0])
        service.register_state("k_controller", counter)
        with pytest.raises(ConfigError):
            service.register_state("k_controller", counter)
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        async with service_device(transport) as device:
            await device.publish(topics.update(FED, "dev1"), make_update(service.current))
            await asyncio.wait_for(service.wait_for_version(1), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    async with broker_transport() as transport:
        restored = AggregatorService(config, transport)
        fresh = Counter()
        restored.register_state("k_controller", fresh)
        await restored.start()
        restored.close()
        assert fresh.k == 9
        assert torch.equal(fresh.variance, torch.tensor([0.5, 0.25, 2.0]))
    async with broker_transport() as transport:
        forgetful = AggregatorService(config, transport)
        with pytest.raises(ConfigError, match="k_controller"):
            await forgetful.start()


@contextlib.asynccontextmanager
async def broker_transport() -> AsyncIterator[MemoryTransport]:
    async with MemoryBroker().transport("aggregator") as transport:
        yield transport


@contextlib.asynccontextmanager
async def service_device(transport: MemoryTransport) -> AsyncIterator[MemoryTransport]:
    async with transport.broker.transport("device") as device:
        yield device


async def test_a_resumed_service_keeps_its_run_and_refuses_another_runs_updates(
    tmp_path: Path,
) -> None:
    """Resuming continues the run; a fresh folder starts a new, later one."""
    config = make_config(tmp_path)
    async with running(config, MemoryBroker()) as run:
        first_run = run.service.run_id
        shapes = run.service.current
        assert (await run.send_and_ack(make_update(shapes, value=0.01))).accepted
    async with running(config, MemoryBroker()) as run:
        assert run.service.run_id == first_run
        elsewhere = make_update(shapes, value=0.02).model_copy(update={"run_id": "0-earlier"})
        refused = await run.send_and_ack(elsewhere)
        assert (refused.accepted, refused.reason) == (False, "wrong_run")
        assert run.service.version == 0  # nothing merged, state intact
    fresh = make_config(tmp_path / "other")
    async with running(fresh, MemoryBroker()) as run:
        assert run.service.run_id > first_run
