"""Synchronous rounds on the aggregator (in-memory broker): selection, refusals, deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPlan, SyncRoundService
from edgefed.transport.frames import Delivery
from edgefed.transport.memory import MemoryBroker, MemoryTransport
from schemas import topics
from schemas.errors import ConfigError
from schemas.messages import Ack, Task, Update

FED = "rounds"
CLIENTS = ("dev0", "dev1", "dev2")


def make_config(size: int, **extra: object) -> AggregatorConfig:
    return AggregatorConfig.model_validate(
        {
            "federation": FED,
            "strategy": {"name": "fedbuff", "staleness": "constant", "buffer_size": size},
            "max_staleness": 0,
            "eval_data": "synthetic:n=8,seed=3",
            "eval_every": 1000,
        }
        | extra
    )


@contextlib.asynccontextmanager
async def running(
    plan: RoundPlan, **extra: object
) -> AsyncIterator[tuple[SyncRoundService, MemoryTransport, MemoryTransport]]:
    """The service, a device transport reading acks, and one reading tasks."""
    broker = MemoryBroker()
    async with (
        broker.transport("aggregator") as transport,
        broker.transport("device") as device,
        broker.transport("watcher") as watcher,
    ):
        for client in CLIENTS:
            await device.subscribe(topics.ack(FED, client))
        service = SyncRoundService(make_config(plan.size, **extra), transport, plan=plan)
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        await watcher.subscribe(topics.task(FED))
        try:
            yield service, device, watcher
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def update(service: SyncRoundService, client: str, base: int) -> Update:
    return Update(
        client_id=client,
        task_id=service.config.task_id,
        base_version=base,
        num_samples=8,
        method="lora",
        delta={n: torch.full_like(t, 0.01) for n, t in service.current.items()},
    )


async def send(device: MemoryTransport, message: Update) -> Ack:
    await device.publish(topics.update(FED, message.client_id), message)
    async with asyncio.timeout(10):
        async for item in device.deliveries():
            if (
                isinstance(item, Delivery)
                and isinstance(item.message, Ack)
                and item.message.update_id == message.update_id
            ):
                return item.message
    raise AssertionError("no ack")


async def newest_task(device: MemoryTransport, version: int) -> Task:
    async with asyncio.timeout(10):
        async for item in device.deliveries():
            if (
                isinstance(item, Delivery)
                and isinstance(item.message, Task)
                and item.message.version >= version
            ):
                return item.message
    raise AssertionError("no task")


async def test_round_refuses_an_unselected_device_and_names_the_selected_in_the_task() -> None:
    plan = RoundPlan(clients=CLIENTS, per_round=1, seed=3)
    async with running(plan) as (service, device, watcher):
        chosen = plan.selected(0)
        outsider = next(c for c in CLIENTS if c not in chosen)
        ack = await send(device, update(service, outsider, 0))
        assert not ack.accepted and ack.reason == "not_selected"
        assert outsider in (ack.detail or "") and service.version == 0
        task = await newest_task(watcher, 0)
        assert task.round_clients == chosen
        ack = await send(device, update(service, chosen[0], 0))
        assert ack.accepted and ack.version == 1  # a round of one: it closes at once
        assert (await newest_task(watcher, 1)).round_clients == plan.selected(1)
        assert service.rounds[0].closed == "full"
        assert service.rejections == {"not_selected": 1}


async def test_round_closes_at_its_deadline_and_refuses_the_late_update_as_stale() -> None:
    plan = RoundPlan(clients=CLIENTS, per_round=2, deadline_s=1.0, seed=1)
    async with running(plan) as (service, device, _):
        first, second = plan.selected(0)
        ack = await send(device, update(service, first, 0))
        assert ack.accepted and service.version == 0
        async with asyncio.timeout(5):
            while service.version == 0:  # noqa: ASYNC110 (polling the closed round)
                await asyncio.sleep(0.02)
        record = service.rounds[0]
        assert record.closed == "deadline" and record.closed_s is not None
        assert 1.0 <= record.closed_s - record.opened_s < 2.0
        late = await send(device, update(service, second, 0))
        assert not late.accepted and late.reason == "stale"
        assert len(service.results.merges) == 1


async def test_private_round_closes_at_its_deadline_with_a_noised_release() -> None:
    plan = RoundPlan(clients=CLIENTS, per_round=2, deadline_s=0.5, seed=1)
    privacy = {"noise_multiplier": 1.0, "clip_norm": 10.0, "seed": 3}
    async with running(plan, privacy=privacy) as (service, device, _):
        start = service.current
        sent = update(service, plan.selected(0)[0], 0)
        assert (await send(device, sent)).accepted
        async with asyncio.timeout(5):
            while service.version == 0:  # noqa: ASYNC110 (polling the closed round)
                await asyncio.sleep(0.02)
        assert service.rounds[0].closed == "deadline"
        # The one delta moved the global, plus noise of sigma * C (its share is 1).
        moved = torch.cat([(service.current[n] - start[n] - 0.01).flatten() for n in start])
        assert float(moved.std()) == pytest.approx(10.0, rel=0.1)


def test_rounds_need_fedbuff_sized_to_the_round() -> None:
    plan = RoundPlan(clients=CLIENTS, per_round=2)
    with pytest.raises(ConfigError, match="buffer_size 2"):
        SyncRoundService(make_config(3), MemoryBroker().transport("x"), plan=plan)


def test_a_sync_table_sets_up_rounds_without_other_settings() -> None:
    """``[sync]`` alone gives FedBuff with a buffer of one round and no stale update."""
    config = AggregatorConfig.model_validate(
        {"federation": FED, "seed": 4, "sync": {"clients": CLIENTS, "clients_per_round": 2}}
    )
    assert config.strategy.name == "fedbuff" and config.strategy.buffer_size == 2
    assert config.max_staleness == 0
    plan = RoundPlan.of(config)
    assert plan.clients == CLIENTS and plan.size == 2 and plan.seed == 4
    whole = AggregatorConfig.model_validate({"federation": FED, "sync": {"clients": CLIENTS}})
    assert whole.strategy.buffer_size == 3 and RoundPlan.of(whole).per_round is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"strategy": {"buffer_size": 3}}, "buffer_size 2"),
        ({"strategy": {"name": "fedasync"}}, "fedbuff"),
        ({"max_staleness": 2}, "max_staleness 0"),
        ({"sync": {"clients": CLIENTS, "clients_per_round": 4}}, "more than the 3 clients"),
        ({"sync": {"clients": ("a", "a")}}, "distinct"),
        ({"sync": {"clients": ()}}, "at least 1"),
    ],
)
def test_a_sync_table_refuses_what_contradicts_rounds(
    extra: dict[str, object], message: str
) -> None:
    data = {"federation": FED, "sync": {"clients": CLIENTS, "clients_per_round": 2}} | extra
    with pytest.raises(ValueError, match=message):
        AggregatorConfig.model_validate(data)


async def test_every_round_names_its_devices_even_when_all_take_part() -> None:
    """The names in the task are how an agent knows it trains in rounds."""
    plan = RoundPlan(clients=CLIENTS)
    async with running(plan) as (_, _, watcher):
        assert (await newest_task(watcher, 0)).round_clients == CLIENTS


async def test_a_device_answers_each_round_once() -> None:
    """A fast device cannot fill a round in place of a slower one that was picked too."""
    plan = RoundPlan(clients=CLIENTS, per_round=2, seed=1)  # rounds 0 and 1 both take dev1
    async with running(plan) as (service, device, _):
        first, second = plan.selected(0)
        assert first in plan.selected(1)
        assert (await send(device, update(service, first, 0))).accepted
        again = await send(device, update(service, first, 0))
        assert not again.accepted and again.reason == "not_selected"
        assert "already" in (again.detail or "") and service.version == 0
        assert (await send(device, update(service, second, 0))).accepted
        assert service.version == 1
        assert (await send(device, update(service, first, 1))).accepted  # a new round
