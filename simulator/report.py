"""Turning a fleet's results into what people read: a summary and plots.

``plot_loss`` draws one run; the ``plot_runs_*`` functions draw the outcome records of
several runs of one fleet (async and sync) on shared axes, against simulated time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def summary_table(results: dict[str, Any], *, rows: int = 8) -> Table:
    """Eval loss at a few evenly spaced versions, plus update counts."""
    history = [h for h in results["history"] if h["eval_loss"] is not None]
    step = max(1, (len(history) - 1) // max(1, rows - 1))
    shown = history[::step]
    if history and shown[-1] is not history[-1]:
        shown.append(history[-1])
    table = Table(title="global model")
    for column in ("version", "time (s)", "eval loss", "accuracy", "merged updates"):
        table.add_column(column, justify="right")
    for h in shown:
        accuracy = h["eval_accuracy"]
        table.add_row(
            str(h["version"]),
            f"{h['time_s']:.1f}",
            f"{h['eval_loss']:.4f}",
            "-" if accuracy is None else f"{accuracy:.3f}",
            str(h["merged_updates"]),
        )
    return table


def headline(results: dict[str, Any]) -> str:
    """One line: loss drop, updates accepted/rejected, staleness seen."""
    losses = [h["eval_loss"] for h in results["history"] if h["eval_loss"] is not None]
    updates = results["updates"]
    accepted = [u for u in updates if u["accepted"]]
    max_staleness = max((u["staleness"] for u in accepted), default=0)
    ratio = losses[-1] / losses[0] if losses and losses[0] else float("nan")
    return (
        f"eval loss {losses[0]:.4f} -> {losses[-1]:.4f} ({ratio:.2f}x) over "
        f"{results['history'][-1]['version']} versions; {len(accepted)}/{len(updates)} updates "
        f"accepted; max staleness {max_staleness}"
    )


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    """Print the table and the headline."""
    console = console or Console()
    console.print(summary_table(results))
    console.print(headline(results))


def plot_loss(results: dict[str, Any], path: str | Path) -> Path:
    """Eval loss against wall time, as a PNG beside the results."""
    import matplotlib as mpl  # noqa: PLC0415 - heavy, only when a plot is asked for

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    history = [h for h in results["history"] if h["eval_loss"] is not None]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([h["time_s"] for h in history], [h["eval_loss"] for h in history], marker=".")
    strategy = results["config"]["strategy"]["name"]
    axis.set(xlabel="wall time (s)", ylabel="eval loss", title=f"global model ({strategy})")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    target = Path(path)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def pyplot() -> Any:
    """The pyplot module on matplotlib's file-only backend, imported only when a plot is drawn."""
    import matplotlib as mpl  # noqa: PLC0415 - heavy, only when a plot is asked for

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(figure: Any, path: str | Path) -> Path:
    """Lay ``figure`` out, write it to ``path`` and free it."""
    target = Path(path)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    pyplot().close(figure)
    return target


def plot_runs_progress(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Eval loss (and accuracy, when scored) against simulated time, every run on one chart.

    The target is drawn as a dashed line and each run's time to it as a dotted one.
    """
    plt = pyplot()
    has_accuracy = any(r["eval_accuracy"] is not None for run in runs for r in run["series"])
    figure, axes = plt.subplots(
        1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 6, 3.6)
    )
    axes = list(axes) if has_accuracy else [axes]
    metrics = ["eval_loss", "eval_accuracy"][: len(axes)]
    for axis, metric in zip(axes, metrics, strict=True):
        for run in runs:
            points = [r for r in run["series"] if r[metric] is not None]
            line = axis.plot(
                [r["time_s"] for r in points],
                [r[metric] for r in points],
                marker=".",
                markersize=3,
                label=f"{run['mode']} ({run['strategy']['name']})",
            )[0]
            if run["time_to_target_s"] is not None:
                axis.axvline(run["time_to_target_s"], color=line.get_color(), linestyle=":")
        target = (runs[0]["target"] or {}).get(metric)
        if target is not None:
            axis.axhline(target, color="grey", linestyle="--", label="target")
        axis.set(xlabel="simulated wall time (s)", ylabel=metric.replace("_", " "))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_title(_title(runs))
    return save_figure(figure, path)


def _title(runs: list[dict[str, Any]]) -> str:
    fleet = runs[0]["fleet"] or "fleet"
    ratio = ""
    times = {run["mode"]: run["time_to_target_s"] for run in runs}
    if times.get("async") and times.get("sync"):
        ratio = f": async reaches the target {times['sync'] / times['async']:.1f}x sooner"
    return f"{fleet}, {runs[0]['agents']} devices{ratio}"


def plot_runs_bytes(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Cumulative bytes up (updates) and down (globals) against simulated time."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for run in runs:
        times = [r["time_s"] for r in run["series"]]
        up = axis.plot(
            times, [r["bytes_up"] / 1e6 for r in run["series"]], label=f"{run['mode']} up"
        )
        axis.plot(
            times,
            [r["bytes_down"] / 1e6 for r in run["series"]],
            linestyle="--",
            color=up[0].get_color(),
            label=f"{run['mode']} down",
        )
    axis.set(xlabel="simulated wall time (s)", ylabel="MB (cumulative)", title="traffic")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_runs_staleness(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Staleness of accepted updates, one bar group per run."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / max(1, len(runs))
    for index, run in enumerate(runs):
        histogram = {int(k): v for k, v in run["staleness"]["histogram"].items()}
        axis.bar(
            [k + index * width for k in histogram],
            list(histogram.values()),
            width=width,
            label=f"{run['mode']} (mean {run['staleness']['mean']:.2f})",
        )
    axis.set(xlabel="staleness (versions)", ylabel="accepted updates", title="staleness")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_device_memory(run: dict[str, Any], path: str | Path) -> Path:
    """Each device's peak training memory against its profile's budget."""
    plt = pyplot()
    devices = run["devices"]
    figure, axis = plt.subplots(figsize=(max(5, 0.6 * len(devices) + 2), 3.4))
    names = [f"{d['client_id']}\n{d['profile'] or ''}" for d in devices]
    axis.bar(names, [d["peak_memory_mb"] or 0 for d in devices], label="peak (planned)")
    if any(d["budget_mb"] for d in devices):  # an all-NaN series breaks the legend's layout
        axis.scatter(
            names,
            [d["budget_mb"] or float("nan") for d in devices],
            marker="_",
            s=400,
            color="red",
            label="budget",
        )
    axis.set(ylabel="MB", title="device memory")
    axis.tick_params(axis="x", labelsize=7)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def save_json(results: dict[str, Any], path: str | Path) -> None:
    """Write the results file."""
    Path(path).write_text(json.dumps(results, indent=1), encoding="utf-8")
