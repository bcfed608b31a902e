"""The numbers a person asks of a federation run, as a table and two plots.

Base vs final held-out accuracy, how many versions and updates (accepted / rejected),
bytes each way, and how stale merged updates were. Works on the results file layout
(``FleetResult.to_dict`` plus a ``summary`` and an ``accuracy`` series).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class RunSummary:
    """The headline of one run."""

    model: str
    dataset: str
    agents: int
    base_accuracy: float | None
    final_accuracy: float | None
    """Of the model the run hands over (the demo's: the mean of its last versions)."""
    held_out: int
    versions: int
    accepted: int
    rejected: int
    device_steps: int
    bytes_up: int
    bytes_down: int
    mean_staleness: float
    max_staleness: int
    train_s: float
    wall_s: float
    last_version_accuracy: float | None = None
    """Of the last global version alone, when the final model is an average of several."""
    averaged_versions: tuple[int, ...] = ()
    """The versions the final model averages (empty: it is the last version)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)


def summarize(
    results: dict[str, Any],
    *,
    model: str,
    dataset: str,
    base_accuracy: float | None,
    final_accuracy: float | None,
    held_out: int,
    device_steps: int,
    train_s: float,
    wall_s: float,
    versions: int | None = None,
    last_version_accuracy: float | None = None,
    averaged_versions: list[int] | None = None,
) -> RunSummary:
    """Collect the headline from a fleet's results and the final check.

    ``versions`` overrides the last published version (a run stopped on time may have
    merged one more that it never published).
    """
    updates = results["updates"]
    accepted = [u for u in updates if u["accepted"]]
    staleness = [u["staleness"] for u in accepted]
    agents = results.get("agents", [])
    return RunSummary(
        model=model,
        dataset=dataset,
        agents=len(agents),
        base_accuracy=base_accuracy,
        final_accuracy=final_accuracy,
        last_version_accuracy=last_version_accuracy,
        averaged_versions=tuple(averaged_versions or ()),
        held_out=held_out,
        versions=(
            versions
            if versions is not None
            else max((h["version"] for h in results["history"]), default=0)
        ),
        accepted=len(accepted),
        rejected=len(updates) - len(accepted),
        device_steps=device_steps,
        bytes_up=sum(u["bytes"] for u in updates),
        bytes_down=sum(a.get("bytes_down", 0) for a in agents),
        mean_staleness=statistics.fmean(staleness) if staleness else 0.0,
        max_staleness=max(staleness, default=0),
        train_s=train_s,
        wall_s=wall_s,
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_table(summary: RunSummary) -> Table:
    """Two columns: what, and how much."""
    table = Table(title=f"{summary.model} on {summary.dataset}, {summary.agents} devices")
    table.add_column("")
    table.add_column("", justify="right")
    rows = [
        (f"base accuracy ({summary.held_out} held-out)", _acc(summary.base_accuracy)),
        (f"final accuracy ({summary.held_out} held-out)", _acc(summary.final_accuracy)),
        ("global versions", str(summary.versions)),
        ("updates accepted / rejected", f"{summary.accepted} / {summary.rejected}"),
        ("device steps", str(summary.device_steps)),
        ("bytes up (updates)", _mb(summary.bytes_up)),
        ("bytes down (globals)", _mb(summary.bytes_down)),
        ("staleness mean / max", f"{summary.mean_staleness:.2f} / {summary.max_staleness}"),
        ("training time", f"{summary.train_s:.0f} s"),
        ("wall time", f"{summary.wall_s:.0f} s"),
    ]
    if len(summary.averaged_versions) > 1:  # the final model is a tail average
        last = summary.last_version_accuracy
        rows.insert(
            2,
            (
                f"  = mean of versions {', '.join(map(str, summary.averaged_versions))}",
                "" if last is None else f"last alone {_acc(last)}",
            ),
        )
    for name, value in rows:
        table.add_row(name, value)
    return table


def _pyplot() -> Any:
    import matplotlib as mpl  # noqa: PLC0415 - heavy, only when a plot is asked for

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_accuracy(
    points: list[dict[str, float]],
    path: Path,
    *,
    title: str,
    progress: list[dict[str, float]] | None = None,
    held_out: int = 0,
) -> Path:
    """Held-out accuracy of the global model against training wall time.

    ``points`` are scored on the whole held-out set; ``progress`` (optional) is what the
    aggregator measured on a small part of it while training, drawn fainter.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if progress:
        axis.plot(
            [p["time_s"] for p in progress],
            [p["accuracy"] for p in progress],
            marker=".",
            alpha=0.4,
            label="while training (subset)",
        )
    label = f"{held_out} held-out" if held_out else "held-out"
    axis.plot(
        [p["time_s"] for p in points], [p["accuracy"] for p in points], marker="o", label=label
    )
    for p in points:
        axis.annotate(f"v{int(p['version'])}", (p["time_s"], p["accuracy"]), fontsize=7)
    axis.legend(fontsize=8)
    axis.set(xlabel="wall time (s)", ylabel="accuracy", title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_staleness(results: dict[str, Any], path: Path) -> Path:
    """How stale accepted updates were when they arrived."""
    plt = _pyplot()
    staleness = [u["staleness"] for u in results["updates"] if u["accepted"]]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    top = max(staleness, default=0)
    axis.hist(staleness, bins=range(top + 2), align="left", rwidth=0.8)
    axis.set(xlabel="staleness (versions)", ylabel="accepted updates", title="staleness")
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """The runs of one fleet side by side, as a markdown table (outcome records)."""
    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("mode", lambda r: r["mode"]),
        ("strategy", lambda r: r["strategy"]["name"]),
        ("time to target (sim s)", lambda r: _secs(r["time_to_target_s"])),
        ("final eval loss", lambda r: _num(r["final_eval_loss"], 4)),
        ("final accuracy", lambda r: _num(r["final_eval_accuracy"], 3)),
        ("versions", lambda r: str(r["versions"])),
        ("accepted / rejected", lambda r: f"{r['accepted']} / {r['rejected']}"),
        ("MB up / down", lambda r: f"{r['bytes_up'] / 1e6:.2f} / {r['bytes_down'] / 1e6:.2f}"),
        (
            "staleness mean / max",
            lambda r: f"{r['staleness']['mean']:.2f} / {r['staleness']['max']}",
        ),
        ("sim s / real s", lambda r: f"{r['simulated_s']:.1f} / {r['real_s']:.1f}"),
    ]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(run) for _, cell in columns) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def _secs(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
