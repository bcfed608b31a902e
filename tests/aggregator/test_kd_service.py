"""KD updates through the service (in-memory broker): checks, nacks, distillation, resume."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from aggregator.config import AggregatorConfig, KdSettings, StrategySettings
from aggregator.service import AggregatorService
from edgefed.data.kd_proxy import load_proxy, proxy_logits, top_k
from edgefed.ml.models import TINY_VOCAB, attach_lora, build_model
from edgefed.transport.frames import Delivery
from edgefed.transport.memory import MemoryBroker, MemoryTransport
from schemas import topics
from schemas.messages import Ack, LoraSpec, ModelRef, ProxySpec, Task, TensorMap, Update

FED = "kd-service"
ROWS, K, SEQ = 3, 5, 12
POSITIONS = ROWS * (SEQ - 1)


def make_config(tmp_path: Path) -> AggregatorConfig:
    return AggregatorConfig.model_validate(
        {
            "federation": FED,
            "method": "kd",
            "strategy": StrategySettings(name="fedbuff", buffer_size=2),
            "train": {"seq_len": SEQ},
            "eval_data": "synthetic:n=8,seed=3",
            "eval_every": 1000,
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "kd": KdSettings(
                proxy_dataset="synthetic:n=32,seed=4242", proxy_size=ROWS, top_k=K, server_steps=3
            ),
        }
    )


class Device:
    """One device transport that reads the retained task and every ack."""

    def __init__(self, transport: MemoryTransport, service: AggregatorService) -> None:
        self.transport = transport
        self.service = service

    async def task(self) -> Task:
        async with asyncio.timeout(5):
            async for item in self.transport.deliveries():
                if isinstance(item, Delivery) and isinstance(item.message, Task):
                    return item.message
        raise AssertionError("no task")

    async def send(self, update: Update) -> Ack:
        await self.transport.publish(topics.update(FED, update.client_id), update)
        async with asyncio.timeout(10):
            async for item in self.transport.deliveries():
                if isinstance(item, Delivery) and isinstance(item.message, Ack):
                    return item.message
        raise AssertionError("no ack")


@contextlib.asynccontextmanager
async def running(config: AggregatorConfig, broker: MemoryBroker) -> AsyncIterator[Device]:
    async with broker.transport("aggregator") as transport, broker.transport("device") as device:
        await device.subscribe(topics.ack(FED, "dev1"))
        service = AggregatorService(config, transport)
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        try:
            yield Device(device, service)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def teacher_logits(proxy: ProxySpec, model: str) -> TensorMap:
    """What a trained device would send: a different model's top-k on the slice."""
    teacher = attach_lora(build_model(model, seed=7), LoraSpec())
    data = load_proxy(proxy, seq_len=SEQ, model=ModelRef(name=model))
    return top_k(proxy_logits(teacher, data), proxy.top_k)


def kd_update(logits: TensorMap, slice_id: int, **changes: object) -> Update:
    fields: dict[str, object] = {
        "client_id": "dev1",
        "task_id": "task-1",
        "base_version": 0,
        "num_samples": 16,
        "method": "kd",
        "logits": logits,
        "proxy_slice": slice_id,
    }
    return Update.model_validate(fields | changes)


def _good() -> TensorMap:
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(64, generator=gen)[:K] for _ in range(POSITIONS)])
    return {"indices": ids.to(torch.int32), "values": torch.randn(POSITIONS, K).half()}


def _with(**tensors: torch.Tensor) -> TensorMap:
    return _good() | tensors


@pytest.mark.parametrize(
    ("logits", "slice_id", "reason"),
    [
        (_with(values=torch.full((POSITIONS, K), float("nan")).half()), 0, "non_finite"),
        (_with(values=torch.full((POSITIONS, K), float("inf")).half()), 0, "non_finite"),
        (_with(values=torch.zeros(POSITIONS, K - 1).half()), 0, "wrong_shape"),
        ({"values": torch.zeros(POSITIONS, K).half()}, 0, "wrong_shape"),
        (_with(indices=torch.zeros(POSITIONS, K)), 0, "wrong_dtype"),
        (_with(indices=torch.full((POSITIONS, K), 64, dtype=torch.int32)), 0, "malformed"),
        (_good(), 1, "wrong_proxy"),
    ],
)
async def test_bad_kd_logits_are_nacked_and_leave_the_global_alone(
    tmp_path: Path, logits: TensorMap, slice_id: int, reason: str
) -> None:
    async with running(make_config(tmp_path), MemoryBroker()) as device:
        before = {n: t.clone() for n, t in device.service.current.items()}
        ack = await device.send(kd_update(logits, slice_id))
        assert not ack.accepted
        assert ack.reason == reason, ack.detail
        assert device.service.version == 0
        assert device.service.rejections == {reason: 1}
        assert all(torch.equal(before[n], t) for n, t in device.service.current.items())


async def test_kd_updates_distill_into_a_new_global_and_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    broker = MemoryBroker()
    async with running(config, broker) as device:
        await device.transport.subscribe(topics.task(FED))
        task = await device.task()
        assert task.method == "kd"
        assert task.proxy is not None
        assert task.proxy.slice_id == 0
        assert len(task.proxy.indices) == ROWS
        shallow, deep = teacher_logits(task.proxy, "tiny"), teacher_logits(task.proxy, "tiny-4l")
        start = {n: t.clone() for n, t in device.service.current.items()}
        first = await device.send(kd_update(shallow, 0))
        assert first.accepted
        assert first.version == 0
    # A new process on the same checkpoint folder still holds the buffered logits.
    async with running(config, MemoryBroker()) as device:
        second = await device.send(kd_update(deep, 0, num_samples=8))
        assert second.accepted
        assert second.version == 1
        assert any(not torch.equal(start[n], t) for n, t in device.service.current.items())
        records = device.service.results.updates
        assert [r.method for r in records] == ["kd"]
        assert records[0].bytes > POSITIONS * K * 6
        await asyncio.wait_for(device.service.wait_for_version(1), 5)
        await device.transport.subscribe(topics.task(FED))
        task = await device.task()
        assert task.proxy is not None
        assert task.proxy.slice_id == 1
        stale = await device.send(kd_update(shallow, 0, update_id="late", base_version=0))
        assert stale.accepted, "a slice within max_staleness is still distilled on"


async def test_kd_asks_for_no_more_logits_than_the_model_has(tmp_path: Path) -> None:
    """A 4-class head has 4 logits: a top_k above the model's width asks for all of them."""
    config = make_config(tmp_path)
    config = config.model_copy(update={"kd": config.kd.model_copy(update={"top_k": 10**6})})
    async with running(config, MemoryBroker()) as device:
        await device.transport.subscribe(topics.task(FED))
        task = await device.task()
        assert task.proxy is not None
        assert task.proxy.top_k == TINY_VOCAB
        logits = teacher_logits(task.proxy, "tiny")
        assert logits["indices"].shape[-1] == TINY_VOCAB
        assert (await device.send(kd_update(logits, 0))).accepted
