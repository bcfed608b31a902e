"""The seed table's pieces: per-version spend, the measured-memory process, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import seed_report
from bench.results_file import replace_block
from bench.seed_table import SeedTask, points, rows_to_run
from bench.suite import _with_saved_rows
from schemas.messages import Method, ModelRef, ProxySpec, Task, TrainSpec


def _results() -> dict[str, Any]:
    update = {"client_id": "dev000", "accepted": True}
    return {
        "history": [
            {"version": 0, "time_s": 0.0, "eval_accuracy": 0.25},
            {"version": 1, "time_s": 10.0, "eval_accuracy": 0.5},
            {"version": 2, "time_s": 20.0, "eval_accuracy": None},
        ],
        "updates": [
            update | {"update_id": "a", "bytes": 100, "time_s": 4.0},
            update | {"update_id": "b", "bytes": 300, "time_s": 9.0},
            update | {"update_id": "c", "bytes": 500, "time_s": 15.0},
        ],
        "split": [{"bytes_up": 1000, "bytes_down": 7, "time_s": 12.0}],
    }


def test_points_count_bytes_and_compute_per_device_up_to_each_version() -> None:
    found = points(_results(), {"a": 1.0, "b": 3.0, "c": 5.0}, agents=2)
    assert [p.version for p in found] == [0, 1, 2]
    assert [p.accuracy for p in found] == [0.25, 0.5, None]
    assert [p.bytes_up for p in found] == [0.0, 200.0, 950.0]  # split activations count
    assert [p.compute_s for p in found] == [0.0, 2.0, 4.5]


def test_points_take_an_update_the_observer_missed_as_no_compute() -> None:
    found = points(_results(), {"a": 1.0}, agents=1)
    assert found[-1].compute_s == 1.0 and found[-1].bytes_up == 1900.0


def test_split_runs_only_on_causal_models() -> None:
    tasks = (SeedTask("ag-news", "minilm-l6", 1.0), SeedTask("sst2", "smollm2-135m", 1.0))
    pairs = [(task.model, method) for task, method in rows_to_run(tasks)]
    assert ("minilm-l6", "split") not in pairs and ("smollm2-135m", "split") in pairs
    assert len(pairs) == 7


def _row(method: str, accuracy: float) -> dict[str, Any]:
    return {
        "dataset": "sst2",
        "model": "tiny",
        "method": method,
        "accuracy_before": 0.5,
        "accuracy_after": accuracy,
        "accuracy_best": accuracy,
        "versions": 3,
        "bytes_up_per_device": 2.5e6,
        "bytes_down_per_device": 900.0,
        "compute_s_per_update": 1.25,
        "compute_s_per_device": 4.2,
        "peak_mb": None if method == "kd" else 812.4,
        "peak_mb_estimated": 790.0,
        "points": [
            {"version": v, "accuracy": a, "bytes_up": 1e3 * v, "compute_s": 2.0 * v}
            for v, a in enumerate((0.5, 0.6, accuracy))
        ],
    }


def test_the_section_shows_every_row_and_names_its_command(tmp_path: Path) -> None:
    rows = [_row("lora", 0.8), _row("kd", 0.7)]
    rows.append({"dataset": "sst2", "model": "tiny", "method": "split", "error": "boom"})
    data = {"agents": 2, "eval_rows": 400, "budgets": [("sst2", "tiny", 60.0)], "wall_s": 120}
    text = seed_report.markdown(data | {"results": rows}, "seed_table.png")
    assert "`make bench-seed`" in text and "sst2 / tiny: 60 s" in text
    assert "| sst2 / tiny | lora | 0.500 → 0.800 (0.800) | 3 | 2.50 MB / 900 B | 1.25 | 4 |" in text
    assert "| 812 (790) |" in text and "| failed (790) |" in text
    assert "| split | failed: boom |" in text
    figure = seed_report.plot(rows, tmp_path / "seed.png")
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_a_section_is_replaced_in_place_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Before\n\n<!-- s -->\nold\n<!-- e -->\n\n# After\n")
    replace_block(path, "<!-- s -->", "<!-- e -->", "<!-- s -->\nnew\n<!-- e -->")
    assert path.read_text() == "# Before\n\n<!-- s -->\nnew\n<!-- e -->\n\n# After\n"
    replace_block(path, "<!-- x -->", "<!-- y -->", "<!-- x -->\nmore\n<!-- y -->")
    assert path.read_text().endswith("# After\n\n<!-- x -->\nmore\n<!-- y -->\n")


@pytest.mark.parametrize("method", ["lora", "kd", "fwdgrad", "split"])
def test_a_device_fit_is_measured_in_a_process_of_its_own(tmp_path: Path, method: Method) -> None:
    task = Task(
        task_id="t",
        federation="f",
        version=0,
        method=method,
        model=ModelRef(name="tiny"),
        train=TrainSpec(local_steps=2, batch_size=4, seq_len=16),
        proxy=ProxySpec(dataset="synthetic:n=64,seed=7", indices=(1, 5, 9), slice_id=0),
    )
    path = tmp_path / "task.json"
    path.write_text(task.model_dump_json())
    command = [
        sys.executable, "-m", "bench.seed_memory", "--task", str(path), "--method", method,
        "--data", "synthetic:n=32,seed=1", "--trainer", json.dumps({"split": {"cut": 1}}.get(method, {})),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["peak_mb"] >= row["resident_before_mb"] > 50  # torch and the model are in it
    assert row["fit_s"] > 0


def test_rerunning_one_task_keeps_the_other_tasks_saved_rows() -> None:
    """``bench seed --task D --save``: D's rows replaced in place, the rest kept with their date."""

    def row(dataset: str, method: str, accuracy: float) -> dict[str, Any]:
        return {"dataset": dataset, "method": method, "final_accuracy": accuracy}

    before = {
        "budgets": [("ag-news", "minilm-l6", 240), ("rotten-tomatoes", "smollm2-135m", 360)],
        "measured": {"ag-news": "2026-12-06", "rotten-tomatoes": "2026-12-06"},
        "wall_s": 2400.0,
        "results": [
            *[row("ag-news", "lora", 0.8), row("ag-news", "kd", 0.7)],
            *[row("rotten-tomatoes", "lora", 0.81), row("rotten-tomatoes", "split", 0.83)],
        ],
    }
    rerun = {
        "budgets": [("ag-news", "minilm-l6", 240)],
        "measured": {"ag-news": "2026-12-07"},
        "wall_s": 900.0,
        "results": [row("ag-news", "lora", 0.85), row("ag-news", "kd", 0.83)],
    }
    merged = _with_saved_rows(rerun, before, order=["ag-news", "rotten-tomatoes"])
    assert [(r["dataset"], r["final_accuracy"]) for r in merged["results"]] == [
        ("ag-news", 0.85), ("ag-news", 0.83), ("rotten-tomatoes", 0.81), ("rotten-tomatoes", 0.83)
    ]  # fmt: skip
    assert [b[0] for b in merged["budgets"]] == ["ag-news", "rotten-tomatoes"]
    assert merged["measured"] == {"rotten-tomatoes": "2026-12-06", "ag-news": "2026-12-07"}
    assert merged["wall_s"] == 900.0 + 1200.0
    assert "Rows measured on: rotten-tomatoes 2026-12-06, ag-news 2026-12-07." in (
        seed_report.markdown(merged | {"agents": 2, "eval_rows": 400, "results": []}, None)
    )
