"""Versions are scored beside the intake: in order, and without holding up any ack."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from aggregator.adapter_folder import FederationModel
from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.results import VersionRecord
from aggregator.scoring import MOST_WAITING, Scoring
from aggregator.service import AggregatorService
from edgefed.data.loading import load_data
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import get_adapter, set_adapter
from edgefed.transport.frames import Delivery
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.messages import Ack, LoraSpec, ModelRef, TensorMap, Update

FED = "scoring"
EVAL = "synthetic:n=16,seed=3"


def _record(version: int) -> VersionRecord:
    return VersionRecord(
        version=version, time_s=0.0, eval_loss=None, eval_accuracy=None, merged_updates=0
    )


async def test_records_are_reported_in_version_order_scored_or_not() -> None:
    build = FederationModel(
        model=ModelRef(name="tiny"), lora=LoraSpec(), dataset="synthetic", seed=0
    ).build
    data = load_data(EVAL, seq_len=32, model="tiny")
    model = build()
    start = get_adapter(model)
    moved = {name: tensor + 0.05 for name, tensor in start.items()}
    reported: list[VersionRecord] = []

    async def report(record: VersionRecord) -> None:
        reported.append(record)

    scoring = Scoring(build, data, report)
    scoring.start()
    scoring.submit(_record(0), start)
    scoring.submit(_record(1), None)
    scoring.submit(_record(2), moved)
    await asyncio.wait_for(scoring.drain(), 60)
    await scoring.close()
    assert [r.version for r in reported] == [0, 1, 2]
    assert reported[1].eval_loss is None
    set_adapter(model, moved)
    expected = evaluate(model, data)
    assert reported[2].eval_loss == pytest.approx(expected.loss)
    assert reported[2].eval_accuracy == pytest.approx(expected.accuracy)
    assert reported[0].eval_loss != pytest.approx(expected.loss)  # each its own adapter


async def test_scoring_that_falls_behind_passes_over_versions_to_score_the_newest() -> None:
    build = FederationModel(
        model=ModelRef(name="tiny"), lora=LoraSpec(), dataset="synthetic", seed=0
    ).build
    adapter = get_adapter(build())
    started, release = threading.Event(), threading.Event()
    reported: list[VersionRecord] = []

    class HeldScoring(Scoring):
        def _score(self, adapter: TensorMap) -> tuple[float, float]:
            started.set()
            assert release.wait(30)
            return super()._score(adapter)

    async def report(record: VersionRecord) -> None:
        reported.append(record)

    scoring = HeldScoring(build, load_data(EVAL, seq_len=32, model="tiny"), report)
    scoring.start()
    scoring.submit(_record(0), adapter)
    assert await asyncio.to_thread(started.wait, 30)  # version 0 is being scored
    for version in range(1, 1 + MOST_WAITING + 2):
        scoring.submit(_record(version), adapter)
    release.set()
    await asyncio.wait_for(scoring.drain(), 60)
    await scoring.close()
    assert [r.version for r in reported] == list(range(MOST_WAITING + 3))
    scored = [r.version for r in reported if r.eval_loss is not None]
    assert scored == [0, *range(2, MOST_WAITING + 3)], scored  # 1 had 4 due behind it
    assert scoring.passed_over == 1


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
        eval_data=EVAL,
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
            update = Update(
                client_id="dev0",
                task_id=config.task_id,
                base_version=service.version,
                num_samples=8,
                delta={n: torch.full_like(t, 0.01) for n, t in service.current.items()},
            )
            await device.publish(topics.update(FED, "dev0"), update)
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
