"""Each version's record is appended to a JSONL series as it is made."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.results import Results, VersionRecord, series_path


def _record(version: int) -> VersionRecord:
    return VersionRecord(
        version=version, time_s=float(version), eval_loss=1.0, eval_accuracy=0.5, merged_updates=0
    )


def _versions(path: Path) -> list[int]:
    return [json.loads(line)["version"] for line in path.read_text().splitlines()]


def test_a_new_run_starts_the_series_and_a_resumed_one_goes_on(tmp_path: Path) -> None:
    path = series_path(tmp_path / "r.json")
    assert path == tmp_path / "r.versions.jsonl"
    first = Results(config={}, series=path)
    first.start_series(resumed=False)
    for version in (0, 1, 2):
        first.add_version(_record(version))
        assert _versions(path) == list(range(version + 1))  # on disk at once
    resumed = Results(config={}, series=path)
    resumed.start_series(resumed=True)
    resumed.add_version(_record(3))
    assert _versions(path) == [0, 1, 2, 3]
    rerun = Results(config={}, series=path)
    rerun.start_series(resumed=False)
    rerun.add_version(_record(0))
    assert _versions(path) == [0]


def test_without_a_series_only_the_history_keeps_versions(tmp_path: Path) -> None:
    results = Results(config={})
    results.start_series(resumed=False)
    results.add_version(_record(0))
    assert [r.version for r in results.history] == [0]
    assert list(tmp_path.iterdir()) == []
