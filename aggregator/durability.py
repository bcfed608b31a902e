"""Nothing acked is lost: accepted updates are answered only once a checkpoint holds them.

The service hands every accepted update to a :class:`Ledger`, which holds its Ack and audit
line back until the next commit: a checkpoint (when a folder is configured) is written and
fsynced, then the audit lines are appended, then the acks go out, then a new global is
published. Whatever instant the process dies at, every update an agent saw acked is in the
checkpoint it resumes from, and no version was published that the checkpoint does not hold.

A merge is always committed at once; updates that are only buffered are committed every
``checkpoint_every`` (their acks wait at most ``checkpoint_max_delay_s``), which trades ack
latency for fewer writes when the global is large.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from aggregator.audit import AuditLog, MergeEntry, UpdateEntry
from aggregator.checkpoint import Checkpoint, CheckpointStore
from schemas.errors import ConfigError
from schemas.messages import Ack

log = logging.getLogger(__name__)

CheckpointBuilder = Callable[[int, tuple[UpdateEntry | MergeEntry, ...]], Checkpoint]
"""Builds the snapshot for a commit number and the audit lines it commits."""


class Ledger:
    """Commit sequencing for one service: held acks, the checkpoint store and the audit log."""

    def __init__(
        self,
        *,
        checkpoint_dir: str | Path | None,
        audit_path: str | Path | None,
        every: int = 1,
    ) -> None:
        """Set up the stores; nothing is read until :meth:`resume`.

        Args:
            checkpoint_dir: Folder of the checkpoints; None keeps state in memory only.
            audit_path: The JSONL audit log; None writes none.
            every: Buffered (not merged) accepted updates per commit.

        Raises:
            ConfigError: ``every`` is below 1.
        """
        if every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {every}")
        self.store = CheckpointStore(checkpoint_dir) if checkpoint_dir is not None else None
        self.audit = AuditLog(audit_path) if audit_path is not None else None
        self.every = every
        self.committed = 0
        """Number of the last commit (0 before the first)."""
        self._held: list[tuple[Ack, UpdateEntry]] = []
        self._held_ids: set[str] = set()
        self._merges: list[MergeEntry] = []
        self._window: OrderedDict[str, UpdateEntry] = OrderedDict()
        self.held_event = asyncio.Event()
        """Set while acks are held; a timer commits them after the maximum delay."""

    # -- holding

    def hold(self, ack: Ack, entry: UpdateEntry, *, merge: MergeEntry | None = None) -> None:
        """Keep an accepted update's Ack (and the merge it completed) until the next commit."""
        self._held.append((ack, entry))
        self._held_ids.add(ack.update_id)
        if merge is not None:
            self._merges.append(merge)
        self.held_event.set()

    def merged(self, merge: MergeEntry) -> None:
        """Keep a merge no update completed (a round closed at its deadline) for the commit."""
        self._merges.append(merge)
        self.held_event.set()

    def holds(self, update_id: str) -> bool:
        """Whether ``update_id`` was accepted but its commit has not happened yet."""
        return update_id in self._held_ids

    @property
    def held(self) -> int:
        """Acks waiting for a commit."""
        return len(self._held)

    def due(self) -> bool:
        """Whether the next commit should happen now (a merge, or ``every`` updates held)."""
        return bool(self._merges) or len(self._held) >= self.every

    def window(self, min_base_version: int) -> tuple[UpdateEntry, ...]:
        """Committed accepted updates whose repeats could still pass validation.

        A repeat with ``base_version`` below ``min_base_version`` is refused as stale, so
        those entries are pruned: the set stays as small as the staleness window.
        """
        for update_id, entry in list(self._window.items()):
            if entry.base_version is None or entry.base_version < min_base_version:
                del self._window[update_id]
        return tuple(self._window.values())

    # -- committing

    async def commit(self, build: CheckpointBuilder) -> list[Ack]:
        """Make everything held durable; return the acks that may now be sent, in order.

        The checkpoint is written in a worker thread (fsync can take a while on a device's
        flash); the caller must not change the state meanwhile.
        """
        number = self.committed + 1
        entries: list[UpdateEntry | MergeEntry] = []
        accepted: list[UpdateEntry] = []
        for _, entry in self._held:
            stamped = entry.model_copy(update={"commit": number})
            accepted.append(stamped)
            entries.append(stamped)
        entries.extend(merge.model_copy(update={"commit": number}) for merge in self._merges)
        for entry in accepted:
            if entry.update_id is not None:
                self._window[entry.update_id] = entry
        if self.store is not None:
            checkpoint = build(number, tuple(entries))
            if self.audit is not None:
                self.audit.sync()  # earlier lines reach the disk before this commit does
            await asyncio.to_thread(self.store.save, checkpoint)
        if self.audit is not None:
            self.audit.append(entries)
        acks = [ack for ack, _ in self._held]
        self.committed = number
        self._held.clear()
        self._held_ids.clear()
        self._merges.clear()
        self.held_event.clear()
        return acks

    def record(self, entry: UpdateEntry) -> None:
        """Log a decision that changes no state (a rejection or a repeat) at once."""
        if self.audit is not None:
            self.audit.append((entry,))

    # -- resuming

    def resume(self, *, federation: str, task_id: str) -> Checkpoint | None:
        """Load the latest checkpoint (None when there is none) and continue its numbering.

        Raises:
            ConfigError: The checkpoint cannot be used (see ``CheckpointStore.load``).
        """
        if self.store is None:
            return None
        checkpoint = self.store.load(federation=federation, task_id=task_id)
        if checkpoint is not None:
            self.committed = checkpoint.commit
            for entry in checkpoint.answered:
                if entry.update_id is not None:
                    self._window[entry.update_id] = entry
        return checkpoint

    def recover_audit(self, committed: Sequence[UpdateEntry | MergeEntry]) -> list[UpdateEntry]:
        """Repair the audit log; return its update entries, oldest first."""
        if self.audit is None:
            return []
        entries = self.audit.recover(committed)
        return [entry for entry in entries if isinstance(entry, UpdateEntry)]

    def close(self) -> None:
        """Sync and close the audit log."""
        if self.audit is not None:
            self.audit.close()


def answers_to_keep(entries: Iterable[UpdateEntry], limit: int) -> OrderedDict[str, Ack]:
    """The last ``limit`` decisions of the audit log as the Acks to repeat for duplicates."""
    answered: OrderedDict[str, Ack] = OrderedDict()
    for entry in entries:
        if entry.update_id is None or entry.decision == "duplicate":
            continue
        if entry.update_id in answered and entry.decision != "accepted":
            continue  # an accepted answer is never replaced by a later refusal
        answered[entry.update_id] = entry.to_ack()
        answered.move_to_end(entry.update_id)
        while len(answered) > limit:
            answered.popitem(last=False)
    return answered
