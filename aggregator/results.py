"""The results file: what happened to every update and how the global model fared."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.messages import Ack, Update


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """The global model at one version."""

    version: int
    time_s: float
    eval_loss: float | None
    eval_accuracy: float | None
    merged_updates: int


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    """One received update and what the aggregator did with it."""

    client_id: str
    """The sender: for an unreadable update, the one its topic names."""
    update_id: str
    """``unreadable`` when the payload did not decode to an update."""
    base_version: int | None
    staleness: int | None
    """None for an update refused before its version was examined (unreadable)."""
    bytes: int
    accepted: bool
    reason: str | None
    version_after: int
    time_s: float
    method: str | None = "lora"
    """How the update was trained, so bytes per update compare across methods."""

    @classmethod
    def answered(
        cls, update: Update, ack: Ack, *, size: int, staleness: int, time_s: float
    ) -> UpdateRecord:
        """The record of ``update`` once ``ack`` answered it."""
        return cls(
            client_id=update.client_id,
            update_id=update.update_id,
            base_version=update.base_version,
            staleness=staleness,
            bytes=size,
            accepted=ack.accepted,
            reason=ack.reason,
            version_after=ack.version,
            time_s=time_s,
            method=update.method,
        )

    @classmethod
    def unreadable(cls, ack: Ack, *, size: int, time_s: float) -> UpdateRecord:
        """The record of a payload that never became an update, refused with ``ack``."""
        return cls(
            client_id=ack.client_id,
            update_id=ack.update_id,
            base_version=None,
            staleness=None,
            bytes=size,
            accepted=False,
            reason=ack.reason,
            version_after=ack.version,
            time_s=time_s,
            method=None,
        )


@dataclass(frozen=True, slots=True)
class SplitRecord:
    """One split-learning request the split server answered (docs/architecture.md §6 ``split``)."""

    client_id: str
    request_id: str
    phase: str
    accepted: bool
    bytes_up: int
    """The request as received, all chunks included."""
    bytes_down: int
    """The reply as published."""
    server_s: float
    """Server compute spent on it (its share of a batch)."""
    time_s: float = 0.0
    """When it was answered, on the clock of the versions' and updates' records."""


@dataclass(slots=True)
class Results:
    """Accumulates records while the aggregator runs; written as one JSON file."""

    config: dict[str, Any]
    history: list[VersionRecord] = field(default_factory=list)
    updates: list[UpdateRecord] = field(default_factory=list)
    merges: dict[str, int] = field(default_factory=dict)
    """How many times each update id was folded into a global (must be exactly 1)."""
    privacy: dict[str, Any] | None = None
    """Central DP: noise multiplier, clip norm, releases and the (ε, δ) estimate."""
    split: list[SplitRecord] = field(default_factory=list)
    """Split learning: every answered request's bytes each way and server time."""
    rounds: list[Any] = field(default_factory=list)
    """Synchronous rounds: each round's record (a dataclass), who was picked and when it
    closed (:class:`aggregator.rounds.RoundRecord`); empty for asynchronous merging."""
    series: Path | None = None
    """Where each version's record is appended as one JSON line when it is made, so a run
    that dies keeps its history (:func:`series_path` of the results file)."""
    answers: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """Updates answered by (decision, reason, method), kept as they come (not saved)."""
    staleness: Counter[int] = field(default_factory=Counter)
    """Accepted updates by staleness, kept as they come (not saved)."""

    def start_series(self, *, resumed: bool) -> None:
        """A new run starts its ``series`` afresh; a resumed one goes on appending to it."""
        if self.series is not None and not resumed:
            self.series.unlink(missing_ok=True)

    def add_update(self, record: UpdateRecord) -> None:
        """Keep ``record`` and count it, so reports never walk every record again."""
        self.updates.append(record)
        decision = "accepted" if record.accepted else "rejected"
        self.answers[decision, record.reason or "", record.method or "unknown"] += 1
        if record.accepted and record.staleness is not None:
            self.staleness[record.staleness] += 1

    def staleness_counts(self) -> dict[int, int]:
        """Accepted updates by staleness, lowest first."""
        return dict(sorted(self.staleness.items()))

    def add_version(self, record: VersionRecord) -> None:
        """Keep ``record`` and, with a ``series`` file, append it there at once."""
        self.history.append(record)
        if self.series is not None:
            with self.series.open("a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(record)) + "\n")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {
            "config": self.config,
            "history": [asdict(record) for record in self.history],
            "updates": [asdict(record) for record in self.updates],
            "merges": self.merges,
            "privacy": self.privacy,
            "split": [asdict(record) for record in self.split],
            "rounds": [asdict(record) for record in self.rounds],
        }

    def save(self, path: str | Path) -> None:
        """Write the results file (whole, then rename, so readers never see half of it)."""
        target = Path(path)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        tmp.replace(target)


def series_path(results_file: str | Path) -> Path:
    """The per-version JSONL beside a results file: ``r.json`` -> ``r.versions.jsonl``."""
    path = Path(results_file)
    return path.with_name(path.stem + ".versions.jsonl")
