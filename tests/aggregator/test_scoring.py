"""Versions are scored beside the intake: in order, and without holding up any ack."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aggregator.adapter_folder import FederationModel
from aggregator.results import VersionRecord
from aggregator.scoring import MOST_WAITING, Scoring
from edgefed.data.loading import load_data
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import get_adapter, set_adapter
from schemas.messages import LoraSpec, ModelRef, TensorMap

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
