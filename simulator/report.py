"""Turning a fleet's results into what people read: a summary and a loss plot."""

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


def save_json(results: dict[str, Any], path: str | Path) -> None:
    """Write the results file."""
    Path(path).write_text(json.dumps(results, indent=1), encoding="utf-8")
