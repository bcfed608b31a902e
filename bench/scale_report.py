"""Figures of a scale run: the result record, latency percentiles, a table and a plot."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of process ``pid`` in MB (from ``/proc``), None when unknown."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds (empty when nothing was measured)."""
    if not seconds:
        return {}
    ordered = sorted(seconds)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else []

    def pick(q: int) -> float:
        return ordered[0] if not cuts else cuts[q - 1]

    return {
        "p50": round(pick(50) * 1000, 1),
        "p90": round(pick(90) * 1000, 1),
        "p99": round(pick(99) * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


@dataclass(frozen=True)
class ScaleResult:
    """What a scale run measured and whether every acked update was merged exactly once."""

    agents: int
    updates_sent: int
    updates_accepted: int
    updates_rejected: int
    updates_unanswered: int
    resends: int
    merged_once: int
    merged_twice_or_more: int
    buffered: int
    """Accepted, acked and still in the FedBuff buffer when the run ended (not lost)."""
    lost: int
    """Accepted (the agent holds an accepting ack) yet neither merged nor buffered."""
    versions: int
    update_bytes: int
    connect_s: float
    send_s: float
    broker_rss_idle_mb: float | None
    broker_rss_connected_mb: float | None
    broker_rss_peak_mb: float | None
    agents_rss_mb: float | None
    """Resident memory of the process holding every agent's connection, once connected."""
    merge_lag_ms: dict[str, float]
    """Publish → merged into a global (the audit log's merge time minus ``sent_at``)."""
    ack_latency_ms: dict[str, float]
    merge_lags_s: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """Every acked update merged exactly once (or buffered), nothing unanswered."""
        return (
            self.lost == 0
            and self.merged_twice_or_more == 0
            and self.updates_unanswered == 0
            and self.merged_once + self.buffered == self.updates_accepted
        )

    @property
    def updates_per_s(self) -> float:
        """Accepted updates per second of the sending phase."""
        return self.updates_accepted / self.send_s if self.send_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The documented JSON object (without the raw lag list)."""
        data = asdict(self)
        del data["merge_lags_s"]
        return data | {"ok": self.ok, "updates_per_s": round(self.updates_per_s, 1)}


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


def scale_table(result: ScaleResult) -> Table:
    """The run as a two-column table."""
    table = Table(title=f"{result.agents} agents, each a real MQTT connection")
    table.add_column("measure")
    table.add_column("value", justify="right")
    lag, ack = result.merge_lag_ms, result.ack_latency_ms
    rows = [
        ("connect all", f"{result.connect_s:.2f} s"),
        (
            "broker RSS idle / connected / peak",
            " / ".join(
                _mb(v)
                for v in (
                    result.broker_rss_idle_mb,
                    result.broker_rss_connected_mb,
                    result.broker_rss_peak_mb,
                )
            ),
        ),
        ("agents' process RSS (all connections)", _mb(result.agents_rss_mb)),
        (
            "updates sent / accepted / rejected",
            (f"{result.updates_sent} / {result.updates_accepted} / {result.updates_rejected}"),
        ),
        ("unanswered / resends", f"{result.updates_unanswered} / {result.resends}"),
        (
            "merged once / buffered / lost / merged twice",
            (
                f"{result.merged_once} / {result.buffered} / {result.lost} / "
                f"{result.merged_twice_or_more}"
            ),
        ),
        ("update size", f"{result.update_bytes / 1024:.1f} KiB"),
        ("throughput", f"{result.updates_per_s:.0f} updates/s ({result.versions} versions)"),
        ("publish→merged p50/p90/p99/max", _ms(lag)),
        ("publish→ack p50/p90/p99/max", _ms(ack)),
        ("zero lost acked updates", "yes" if result.ok else "NO"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _ms(summary: dict[str, float]) -> str:
    if not summary:
        return "n/a"
    return " / ".join(f"{summary[k]:.0f}" for k in ("p50", "p90", "p99", "max")) + " ms"


def print_scale(result: ScaleResult, console: Console | None = None) -> None:
    """Print the table."""
    (console or Console()).print(scale_table(result))


def plot_lag(result: ScaleResult, path: str | Path) -> Path:
    """Distribution of publish→merged lag (CDF), as a PNG."""
    import matplotlib as mpl  # noqa: PLC0415 (heavy; only when a plot is asked for)

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    target = Path(path)
    lags = sorted(lag * 1000 for lag in result.merge_lags_s)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if lags:
        ax.plot(lags, [(i + 1) / len(lags) for i in range(len(lags))])
    ax.set_xlabel("publish → merged into a global (ms)")
    ax.set_ylabel("fraction of updates")
    ax.set_title(f"{result.agents} MQTT agents, {result.updates_accepted} updates, one aggregator")
    ax.grid(visible=True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
