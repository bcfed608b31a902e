"""Which versions the aggregator scores (every ``eval_every``-th, or only the last), beside the intake."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.scoring import Scoring
from aggregator.service import AggregatorService
from edgefed.transport.frames import Delivery
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.messages import Ack, TensorMap, Update

FED = "evalcadence"


def _nudge(service: AggregatorService) -> Update:
    """A small update from ``dev0`` on the current version."""
    return Update(
        client_id="dev0",
        task_id=service.config.task_id,
        base_version=service.version,
        num_samples=8,
        delta={n: torch.full_like(t, 0.01) for n, t in service.current.items()},
    )


async def _scored_versions(eval_every: int) -> list[int]:
    config = AggregatorConfig(
        federation=FED,
        strategy=StrategySettings(name="fedasync", staleness="constant"),
        eval_data="synthetic:n=8,seed=3",
        eval_every=eval_every,
        max_versions=3,
        max_staleness=10,
    )
    broker = MemoryBroker()
    async with broker.transport("aggregator") as transport, broker.transport("dev") as device:
        service = AggregatorService(config, transport)
        running = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        for _ in range(3):
            version = service.version
            await device.publish(topics.update(FED, "dev0"), _nudge(service))
            async with asyncio.timeout(30):
                while service.version == version and not running.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        results = await asyncio.wait_for(running, 30)
    return [h.version for h in results.history if h.eval_loss is not None]


@pytest.mark.parametrize(("every", "scored"), [(1, [0, 1, 2, 3]), (2, [0, 2, 3]), (0, [3])])
async def test_versions_scored_follow_eval_every(every: int, scored: list[int]) -> None:
    assert await _scored_versions(every) == scored


async def test_the_aggregator_acks_updates_while_a_version_is_being_scored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    scoring_started = threading.Event()
    scored: list[int] = []
    score = Scoring._score

    def slow_score(self: Scoring, adapter: TensorMap) -> tuple[float, float]:
        if scored:  # version 0 scores at once; version 1 holds until released
            scoring_started.set()
            assert release.wait(60)
        scored.append(len(scored))
        return score(self, adapter)

    monkeypatch.setattr(Scoring, "_score", slow_score)
    config = AggregatorConfig(
        federation=FED,
        strategy=StrategySettings(name="fedasync", staleness="constant"),
        eval_data="synthetic:n=16,seed=3",
        max_versions=3,
    )
    broker = MemoryBroker()
    async with broker.transport("aggregator") as transport, broker.transport("dev") as device:
        await device.subscribe(topics.ack(FED, "dev0"))
        acks = aiter(device.deliveries())
        service = AggregatorService(config, transport)
        running = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        versions_acked: list[int] = []
        for _ in range(3):
            await device.publish(topics.update(FED, "dev0"), _nudge(service))
            delivery = await asyncio.wait_for(anext(acks), 30)
            assert isinstance(delivery, Delivery) and isinstance(delivery.message, Ack)
            assert delivery.message.accepted
            versions_acked.append(delivery.message.version)
        # Every update answered, each making a version, while version 1 is still scoring.
        assert versions_acked == [1, 2, 3]
        assert await asyncio.to_thread(scoring_started.wait, 30)
        assert not running.done()
        assert [record.version for record in service.results.history] in ([], [0])
        release.set()
        results = await asyncio.wait_for(running, 60)
    assert [record.version for record in results.history] == [0, 1, 2, 3]
    assert all(record.eval_loss is not None for record in results.history)
