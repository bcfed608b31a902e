"""The seed table as a RESULTS.md section and one figure: accuracy against bytes and compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.results_file import replace_block
from simulator.report import pyplot, save_figure

START = "<!-- bench-seed:start -->"
END = "<!-- bench-seed:end -->"
COMMAND = "make bench-seed"
"""Reruns the table and rewrites this section (``edgefed bench seed --save``)."""


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _size(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def _mb(value: float | None) -> str:
    return "failed" if value is None else f"{value:.0f}"


def _row(row: dict[str, Any]) -> str:
    task = f"{row['dataset']} / {row['model']}"
    if "error" in row:
        return f"| {task} | {row['method']} | failed: {row['error'][:160]} | | | | | |"
    compute = row["compute_s_per_update"]
    return (
        f"| {task} | {row['method']} | {_acc(row['accuracy_before'])} → "
        f"{_acc(row['accuracy_after'])} ({_acc(row['accuracy_best'])}) | {row['versions']} | "
        f"{_size(row['bytes_up_per_device'])} / {_size(row['bytes_down_per_device'])} | "
        f"{'-' if compute is None else f'{compute:.2f}'} | {row['compute_s_per_device']:.0f} | "
        f"{_mb(row['peak_mb'])} ({row['peak_mb_estimated']:.0f}) |"
    )


def _measured(data: dict[str, Any]) -> list[str]:
    """A line naming when each task's rows were measured, where they were measured apart."""
    dates = data.get("measured", {})
    if len(set(dates.values())) < 2:
        return []
    return ["", "Rows measured on: " + ", ".join(f"{d} {when}" for d, when in dates.items()) + "."]


def markdown(data: dict[str, Any], plot: str | None) -> str:
    """The section for one run of the table (``data`` as ``edgefed bench seed`` saves it)."""
    budgets = ", ".join(f"{d} / {m}: {s:.0f} s" for d, m, s in data["budgets"])
    lines = [
        START,
        "# Seed-paper table: every method on the same task (`edgefed bench seed`)",
        "",
        f"Reproduce with `{COMMAND}` ({data['wall_s'] / 60:.0f} minutes on this host); raw "
        "figures in `bench/seed.json`. Each row is `edgefed simulate --model M --dataset D "
        f"--method X --agents {data['agents']} --max-versions 0 --max-seconds S` with equally "
        f"fast devices and the method's default settings; time budgets S: {budgets}. "
        f"Accuracy on {data['eval_rows']} held-out rows no device trained on: first version → "
        "last (best). Bytes per device: updates up (a split device's activations and "
        "gradients included) / globals down. Compute: device seconds per update (median) and "
        "in all per device. Peak memory: one device fit in a process of its own, weights "
        "included, measured (the planner's estimate).",
        *_measured(data),
        "",
        "| task | method | accuracy before → after (best) | versions | bytes/device up / down "
        "| compute s/update | device s in all | device peak MB, measured (est.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(row) for row in data["results"]]
    if plot:
        lines += ["", f"![accuracy against bytes uploaded and device compute]({plot})"]
    lines += ["", END]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against bytes uploaded and against device compute, per task, one line per method."""
    plt = pyplot()
    done = [row for row in rows if "error" not in row and row["points"]]
    tasks = list(dict.fromkeys((row["dataset"], row["model"]) for row in done))
    figure, axes = plt.subplots(
        max(1, len(tasks)), 2, figsize=(11, 3.6 * max(1, len(tasks))), squeeze=False
    )
    for (dataset, model), (by_bytes, by_compute) in zip(tasks, axes, strict=False):
        for row in done:
            if (row["dataset"], row["model"]) != (dataset, model):
                continue
            scored = [p for p in row["points"] if p["accuracy"] is not None]
            accuracy = [p["accuracy"] for p in scored]
            by_bytes.plot(
                [p["bytes_up"] for p in scored], accuracy, marker=".", label=row["method"]
            )
            by_compute.plot(
                [p["compute_s"] for p in scored], accuracy, marker=".", label=row["method"]
            )
        by_bytes.set_xscale("symlog", linthresh=1e3)
        by_bytes.set_xlabel("bytes uploaded per device")
        by_compute.set_xlabel("device compute per device (s)")
        for ax in (by_bytes, by_compute):
            ax.set_ylabel(f"held-out accuracy, {dataset} / {model}")
            ax.grid(alpha=0.3)
            ax.legend()
    return save_figure(figure, path)


def write_section(data: dict[str, Any], plot_name: str | None, path: Path) -> None:
    """Replace (or append) this table's section of ``path``; the rest stays as it is."""
    replace_block(path, START, END, markdown(data, plot_name))
