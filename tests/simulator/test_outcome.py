"""A fleet run's outcome: time to target, the per-version series, the side-by-side table."""

from __future__ import annotations

from typing import Any

from simulator.outcome import series, speedup, time_to_target
from simulator.summary import markdown_table


def _version(version: int, time_s: float, loss: float | None, accuracy: float | None = None):
    return {
        "version": version,
        "time_s": time_s,
        "eval_loss": loss,
        "eval_accuracy": accuracy,
        "merged_updates": 2 * version,
    }


HISTORY = [
    _version(0, 0.0, 4.0, 0.1),
    _version(1, 1.0, None),
    _version(2, 2.0, 2.9, 0.2),
    _version(3, 3.0, 2.5, 0.4),
]


def test_time_to_target_is_the_first_scored_version_meeting_every_part() -> None:
    assert time_to_target(HISTORY, {"eval_loss": 3.0}) == 2.0
    assert time_to_target(HISTORY, {"eval_loss": 3.0, "eval_accuracy": 0.3}) == 3.0
    assert time_to_target(HISTORY, {"eval_accuracy": 0.5}) is None
    assert time_to_target(HISTORY, None) is None


def test_speedup_needs_both_runs_to_reach_the_target() -> None:
    assert speedup({"time_to_target_s": 0.5}, {"time_to_target_s": 2.0}) == 4.0
    assert speedup({"time_to_target_s": None}, {"time_to_target_s": 2.0}) is None


def test_series_accumulates_bytes_up_to_each_version() -> None:
    results: dict[str, Any] = {
        "history": HISTORY,
        "updates": [
            {"time_s": 0.5, "bytes": 100},
            {"time_s": 1.0, "bytes": 10},
            {"time_s": 2.5, "bytes": 1},
            {"time_s": 9.0, "bytes": 1000},  # buffered when the run ended
        ],
        "agents": [
            {"device": {"downloads": [[0.0, 7], [2.0, 7]]}},
            {"device": {"downloads": [[0.1, 7]]}},
        ],
    }
    rows = series(results)
    assert [r["bytes_up"] for r in rows] == [0, 110, 110, 111]
    assert [r["bytes_down"] for r in rows] == [7, 14, 21, 21]
    assert [r["merged_updates"] for r in rows] == [0, 2, 4, 6]


def test_markdown_table_puts_runs_side_by_side() -> None:
    run = {
        "mode": "async",
        "strategy": {"name": "fedbuff"},
        "time_to_target_s": 1.234,
        "final_eval_loss": 2.5,
        "final_eval_accuracy": None,
        "versions": 3,
        "accepted": 6,
        "rejected": 1,
        "bytes_up": 2_000_000,
        "bytes_down": 500_000,
        "staleness": {"mean": 1.5, "max": 4},
        "simulated_s": 3.0,
        "real_s": 24.0,
    }
    missed = run | {"mode": "sync", "time_to_target_s": None}
    table = markdown_table([run, missed]).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| async | fedbuff | 1.23 | 2.5000 | - | 3 | 6 / 1 | 2.00 / 0.50")
    assert "not reached" in table[3]
