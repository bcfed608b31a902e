"""The agent's durable outbox: an update is on disk before it is published, until it is acked.

Devices reboot and lose power. An update that left the device but whose Ack never came back
must be published again after a restart, with the same ``update_id`` so the aggregator can
tell it apart from new work and never merge it twice (docs/architecture.md §8). The store is one
SQLite database in WAL mode with ``synchronous=FULL``: every commit is on stable storage when
:meth:`Outbox.put` or :meth:`Outbox.answer` returns, and recording an answer (drop the
pending row, keep the answer) is one transaction, so a crash leaves either state, never half.

Answers are kept too (without the payload): they are what the agent saw acked, which is
what an operator or a test compares with the aggregator's audit log. Counters live in their
own table so old answers can be pruned without forgetting how many updates were answered.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from schemas import codec
from schemas.errors import CodecError, ConfigError
from schemas.messages import Ack, Update

log = logging.getLogger(__name__)

OUTBOX_FILE: Final = "outbox.sqlite3"
"""The database's name inside an agent's ``state_dir``."""

_SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    update_id TEXT PRIMARY KEY,
    base_version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS answered (
    update_id TEXT PRIMARY KEY,
    accepted INTEGER NOT NULL,
    reason TEXT,
    version INTEGER NOT NULL,
    duplicate INTEGER NOT NULL,
    base_version INTEGER,
    answered_at REAL NOT NULL,
    ack TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Answer:
    """An Ack this device received and recorded, with the update's base version."""

    update_id: str
    accepted: bool
    reason: str | None
    version: int
    duplicate: bool
    base_version: int | None
    answered_at: float


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    """How many updates were ever answered, accepted, and created (for seeds and max_updates)."""

    answered: int
    accepted: int
    created: int


class Outbox:
    """Pending updates and received answers of one device, in one SQLite file.

    Use as a context manager, or call :meth:`close`. Not shared between threads at once;
    the agent awaits each call (``asyncio.to_thread``) before the next.
    """

    def __init__(self, path: str | Path, *, keep_answers: int = 10_000) -> None:
        """Open (or create) the outbox at ``path``.

        Args:
            path: The database file; its folder is created when missing.
            keep_answers: Answers kept for inspection; older rows are pruned on open.
                Counters are kept apart, so pruning never changes them.

        Raises:
            ConfigError: The file cannot be opened, or was written by a newer release.
        """
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: calls hop between worker threads but never overlap.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the outbox {self.path}: {exc}") from exc
        try:
            self._setup(keep_answers)
        except sqlite3.Error as exc:
            self._db.close()
            raise ConfigError(f"cannot open the outbox {self.path}: {exc}") from exc
        except ConfigError:
            self._db.close()
            raise

    def _setup(self, keep_answers: int) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        found = self._meta("schema_version", default=None)
        if found is None:
            self._set_meta("schema_version", _SCHEMA_VERSION)
        elif found > _SCHEMA_VERSION:
            raise ConfigError(
                f"outbox {self.path} has schema {found}; this release reads {_SCHEMA_VERSION}"
            )
        self._prune(keep_answers)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (every commit is already durable)."""
        self._db.close()

    # -- writing

    def put(self, update: Update) -> None:
        """Store ``update`` durably before it is published; storing it again is a no-op."""
        payload = codec.encode(update)
        with self._transaction():
            inserted = self._db.execute(
                "INSERT OR IGNORE INTO pending (update_id, base_version, created_at, payload) "
                "VALUES (?, ?, ?, ?)",
                (update.update_id, update.base_version, time.time(), payload),
            ).rowcount
            if inserted:
                self._bump("created", 1)

    def answer(self, ack: Ack) -> bool:
        """Record ``ack`` and drop its update from the pending set, in one transaction.

        Returns:
            True when this is the first answer recorded for the update; a repeated answer
            (an Ack re-sent after a re-publish) changes nothing and returns False.
        """
        with self._transaction():
            row = self._db.execute(
                "SELECT base_version FROM pending WHERE update_id = ?", (ack.update_id,)
            ).fetchone()
            inserted = self._db.execute(
                "INSERT OR IGNORE INTO answered (update_id, accepted, reason, version, "
                "duplicate, base_version, answered_at, ack) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ack.update_id,
                    int(ack.accepted),
                    ack.reason,
                    ack.version,
                    int(ack.duplicate),
                    None if row is None else int(row[0]),
                    time.time(),
                    ack.model_dump_json(),
                ),
            ).rowcount
            self._db.execute("DELETE FROM pending WHERE update_id = ?", (ack.update_id,))
            if inserted:
                self._bump("answered", 1)
                self._bump("accepted", int(ack.accepted))
        return bool(inserted)

    # -- reading

    def pending(self) -> list[Update]:
        """Updates stored and not yet answered, oldest first.

        A row that no longer decodes (written by an incompatible release, or damaged) is
        logged and deleted: it could never be answered, and it must not block the rest.
        """
        rows = self._db.execute(
            "SELECT update_id, payload FROM pending ORDER BY created_at, rowid"
        ).fetchall()
        updates: list[Update] = []
        for update_id, payload in rows:
            try:
                message = codec.decode(bytes(payload))
            except CodecError as exc:
                log.error(  # noqa: TRY400 (the reason is the message; no traceback helps)
                    "outbox %s: dropping unreadable update %s: %s", self.path, update_id, exc
                )
                self._drop(update_id)
                continue
            if not isinstance(message, Update) or message.update_id != update_id:
                log.error("outbox %s: dropping row %s: not that update", self.path, update_id)
                self._drop(update_id)
                continue
            updates.append(message)
        return updates

    def pending_ids(self) -> list[str]:
        """Ids of the pending updates, oldest first (cheap: no payloads are decoded)."""
        rows = self._db.execute("SELECT update_id FROM pending ORDER BY created_at, rowid")
        return [str(update_id) for (update_id,) in rows]

    def answers(self) -> list[Answer]:
        """Every answer kept, in the order they were recorded."""
        rows = self._db.execute(
            "SELECT update_id, accepted, reason, version, duplicate, base_version, answered_at "
            "FROM answered ORDER BY rowid"
        )
        return [
            Answer(
                update_id=str(update_id),
                accepted=bool(accepted),
                reason=reason,
                version=int(version),
                duplicate=bool(duplicate),
                base_version=None if base is None else int(base),
                answered_at=float(at),
            )
            for update_id, accepted, reason, version, duplicate, base, at in rows
        ]

    def answer_for(self, update_id: str) -> Ack | None:
        """The Ack recorded for ``update_id``, if it was answered and is still kept."""
        row = self._db.execute(
            "SELECT ack FROM answered WHERE update_id = ?", (update_id,)
        ).fetchone()
        return None if row is None else Ack.model_validate(json.loads(row[0]))

    def counts(self) -> OutboxCounts:
        """Lifetime counters, unaffected by pruning."""
        return OutboxCounts(
            answered=self._meta("answered", default=0) or 0,
            accepted=self._meta("accepted", default=0) or 0,
            created=self._meta("created", default=0) or 0,
        )

    # -- internals

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _drop(self, update_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM pending WHERE update_id = ?", (update_id,))

    def _prune(self, keep: int) -> None:
        with self._transaction():
            self._db.execute(
                "DELETE FROM answered WHERE rowid <= (SELECT max(rowid) FROM answered) - ?",
                (max(keep, 0),),
            )

    def _meta(self, key: str, *, default: int | None) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _bump(self, key: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, by),
        )


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
