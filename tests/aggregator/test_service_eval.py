"""Which versions the aggregator scores: every ``eval_every``-th, or only the last (0)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.messages import Update

FED = "evalcadence"


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
            update = Update(
                client_id="dev0",
                task_id=config.task_id,
                base_version=service.version,
                num_samples=8,
                delta={n: torch.full_like(t, 0.01) for n, t in service.current.items()},
            )
            await device.publish(topics.update(FED, "dev0"), update)
            async with asyncio.timeout(30):
                while service.version == version and not running.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        results = await asyncio.wait_for(running, 30)
    return [h.version for h in results.history if h.eval_loss is not None]


@pytest.mark.parametrize(("every", "scored"), [(1, [0, 1, 2, 3]), (2, [0, 2, 3]), (0, [3])])
async def test_versions_scored_follow_eval_every(every: int, scored: list[int]) -> None:
    assert await _scored_versions(every) == scored
