"""The agent's outbox: durable before publish, gone only when answered, intact across reopen."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
import torch

from edge_agent.outbox import Outbox
from schemas.errors import ConfigError
from schemas.messages import Ack, Update


def make_update(seed: int, *, base: int = 0) -> Update:
    generator = torch.Generator().manual_seed(seed)
    delta = {"layer.lora_B.weight": torch.randn(4, 2, generator=generator)}
    return Update(client_id="dev1", task_id="t", base_version=base, num_samples=3, delta=delta)


def ack_for(update: Update, *, accepted: bool = True, duplicate: bool = False) -> Ack:
    return Ack(
        update_id=update.update_id,
        client_id=update.client_id,
        accepted=accepted,
        reason=None if accepted else "stale",
        version=7,
        duplicate=duplicate,
    )


def test_outbox_keeps_pending_updates_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite3"
    first, second = make_update(1), make_update(2, base=3)
    with Outbox(path) as outbox:
        outbox.put(first)
        outbox.put(second)
    with Outbox(path) as outbox:
        pending = outbox.pending()
        assert [u.update_id for u in pending] == [first.update_id, second.update_id]
        assert pending[1].base_version == 3
        assert torch.equal(
            pending[0].delta["layer.lora_B.weight"], first.delta["layer.lora_B.weight"]
        )
        assert outbox.counts().created == 2


def test_outbox_answer_drops_pending_and_records_the_ack_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    update = make_update(1, base=2)
    with Outbox(path) as outbox:
        outbox.put(update)
        outbox.put(update)  # a re-send stores nothing new
        assert outbox.answer(ack_for(update))
        assert not outbox.answer(ack_for(update, duplicate=True))
        assert outbox.pending() == []
    with Outbox(path) as outbox:
        [answer] = outbox.answers()
        assert (answer.update_id, answer.accepted, answer.version, answer.duplicate) == (
            update.update_id,
            True,
            7,
            False,
        )
        assert answer.base_version == 2
        assert outbox.answer_for(update.update_id) == ack_for(update)
        counts = outbox.counts()
        assert (counts.created, counts.answered, counts.accepted) == (1, 1, 1)


def test_outbox_counts_survive_pruning_of_old_answers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    updates = [make_update(i) for i in range(5)]
    with Outbox(path) as outbox:
        for index, update in enumerate(updates):
            outbox.put(update)
            outbox.answer(ack_for(update, accepted=index % 2 == 0))
    with Outbox(path, keep_answers=2) as outbox:
        assert [a.update_id for a in outbox.answers()] == [u.update_id for u in updates[-2:]]
        counts = outbox.counts()
        assert (counts.created, counts.answered, counts.accepted) == (5, 5, 3)


def test_outbox_drops_rows_that_no_longer_decode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    good = make_update(1)
    with Outbox(path) as outbox:
        outbox.put(good)
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO pending VALUES (?, ?, ?, ?)", ("broken", 0, 0.0, b"\x93not msgpack")
        )
        db.execute(
            "INSERT INTO pending VALUES (?, ?, ?, ?)",
            (
                "mislabelled",
                0,
                1e12,
                bytes(db.execute("SELECT payload FROM pending").fetchone()[0]),
            ),
        )
    with caplog.at_level(logging.ERROR), Outbox(path) as outbox:
        assert [u.update_id for u in outbox.pending()] == [good.update_id]
        assert outbox.pending_ids() == [good.update_id]
    assert "broken" in caplog.text and "mislabelled" in caplog.text


def test_outbox_is_a_wal_database_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        outbox.put(make_update(1))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_outbox_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    Outbox(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(ConfigError, match="schema 99"):
        Outbox(path)
