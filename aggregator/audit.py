"""The audit log: one JSON line per update decision and per merge, so exactly-once is checkable.

Operators read it to see what happened to an update; tests compare it with what agents saw
acked. Lines are :class:`UpdateEntry` (accepted, rejected or duplicate, with the reason) and
:class:`MergeEntry` (which update ids went into which version).

Accepted updates and merges change the aggregator's state, so their lines are written only
after the checkpoint that holds that state is committed, and each such checkpoint also
carries its own lines: if the process dies between the two writes, :meth:`AuditLog.recover`
re-appends them on the next start. A line therefore never claims a merge the state does not
hold, and a committed merge is never missing. Rejections and duplicates change nothing and
are written at once. A torn last line (a crash mid-write) is cut off on recovery.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from schemas.errors import RejectReason
from schemas.messages import Ack

log = logging.getLogger(__name__)

Decision = Literal["accepted", "rejected", "duplicate"]
"""What the aggregator did with an update: took it, refused it, or re-answered a repeat."""

AUDIT_FILE: Final = "audit.jsonl"
"""The log's name inside a checkpoint folder when no other path is configured."""


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UpdateEntry(_Entry):
    """One update and what was decided; enough to answer a repeat with the same Ack."""

    event: Literal["update"] = "update"
    update_id: str | None
    """None for payloads too broken to carry an id."""
    client_id: str
    base_version: int | None
    staleness: int | None
    decision: Decision
    reason: RejectReason | None = None
    detail: str = ""
    version: int
    """The global version after the decision (the new one when the update was merged)."""
    size: int = 0
    """Bytes received, all chunks included."""
    time: float = Field(default_factory=time.time)
    commit: int | None = None
    """The checkpoint that made an accepted update durable; None when not checkpointed."""

    @classmethod
    def from_ack(
        cls, ack: Ack, *, decision: Decision, base_version: int | None, size: int
    ) -> UpdateEntry:
        """The entry for an Ack the aggregator sends."""
        return cls(
            update_id=ack.update_id,
            client_id=ack.client_id,
            base_version=base_version,
            staleness=ack.staleness,
            decision=decision,
            reason=ack.reason,
            detail=ack.detail,
            version=ack.version,
            size=size,
        )

    def to_ack(self, *, duplicate: bool = False) -> Ack:
        """The Ack this entry records (for re-answering a repeat after a restart).

        Raises:
            ValueError: For entries without an update id, which have nothing to re-answer.
        """
        if self.update_id is None:
            raise ValueError("an entry without an update id cannot be turned into an Ack")
        return Ack(
            update_id=self.update_id,
            client_id=self.client_id,
            accepted=self.decision == "accepted",
            reason=self.reason,
            detail=self.detail,
            version=self.version,
            staleness=self.staleness,
            duplicate=duplicate,
        )


class MergeEntry(_Entry):
    """A new global version and the updates folded into it, oldest first."""

    event: Literal["merge"] = "merge"
    version: int
    update_ids: tuple[str, ...]
    time: float = Field(default_factory=time.time)
    commit: int | None = None
    sent_as: str | None = None
    """A site aggregator's: the id of the update that carries this merge to the root."""


AuditEntry = Annotated[UpdateEntry | MergeEntry, Field(discriminator="event")]
_ENTRY: Final[TypeAdapter[UpdateEntry | MergeEntry]] = TypeAdapter(AuditEntry)


def entry_from_json(line: str | bytes) -> UpdateEntry | MergeEntry:
    """Parse one line.

    Raises:
        ValueError: The line is not an audit entry.
    """
    try:
        return _ENTRY.validate_json(line)
    except ValidationError as exc:
        raise ValueError(f"not an audit entry: {exc}") from exc


def entry_to_json(entry: UpdateEntry | MergeEntry) -> str:
    """One line of JSON, without the newline."""
    return entry.model_dump_json()


def _key(entry: UpdateEntry | MergeEntry) -> tuple[str, str | int | None]:
    if isinstance(entry, MergeEntry):
        return ("merge", entry.version)
    return ("update", entry.update_id)


def read_audit(path: str | Path) -> list[UpdateEntry | MergeEntry]:
    """Every readable entry of the log at ``path`` (empty when missing); bad lines are skipped."""
    target = Path(path)
    if not target.exists():
        return []
    entries: list[UpdateEntry | MergeEntry] = []
    with target.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.endswith(b"\n"):
                break  # torn tail: never completed, so never acted upon
            try:
                entries.append(entry_from_json(line))
            except ValueError as exc:
                log.warning("%s line %d is not an audit entry: %s", target, number, exc)
    return entries


class AuditLog:
    """Appends entries to a JSONL file; one writer per file.

    Writes are flushed to the OS at once (a killed process loses nothing); :meth:`sync`
    forces them to stable storage and runs before each checkpoint is committed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None

    def close(self) -> None:
        """Flush, sync and close the file."""
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def append(self, entries: Iterable[UpdateEntry | MergeEntry]) -> None:
        """Write entries as lines, in one write so a crash tears at most the last line."""
        data = "".join(entry_to_json(entry) + "\n" for entry in entries).encode()
        if not data:
            return
        handle = self._open()
        handle.write(data)
        handle.flush()

    def sync(self) -> None:
        """Force written lines to stable storage."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def recover(
        self, committed: Sequence[UpdateEntry | MergeEntry] = ()
    ) -> list[UpdateEntry | MergeEntry]:
        """Repair the log after a restart and return every entry in it.

        A torn last line is cut off. ``committed`` are the lines of the last checkpoint;
        those not in the log yet (the process died between the commit and the write) are
        appended now.
        """
        self._cut_torn_tail()
        entries = read_audit(self.path)
        commits = {entry.commit for entry in committed}
        present = {_key(entry) for entry in entries if entry.commit in commits}
        missing = [entry for entry in committed if _key(entry) not in present]
        if missing:
            log.warning("audit log %s: re-writing %d committed lines", self.path, len(missing))
            self.append(missing)
            self.sync()
            entries.extend(missing)
        return entries

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        return self._file

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            # Find the last newline; everything after it is a line that never completed.
            position = size
            step = 64 * 1024
            keep = 0
            while position > 0:
                start = max(0, position - step)
                handle.seek(start)
                block = handle.read(position - start)
                index = block.rfind(b"\n")
                if index >= 0:
                    keep = start + index + 1
                    break
                position = start
            log.warning("audit log %s: cutting a torn last line (%d bytes)", self.path, size - keep)
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
