"""The audit log: JSONL entries, repair after a crash, and the answers rebuilt from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.audit import (
    AuditLog,
    MergeEntry,
    UpdateEntry,
    entry_from_json,
    entry_to_json,
    read_audit,
)
from aggregator.durability import answers_to_keep
from schemas.messages import Ack


def entry(update_id: str, decision: str = "accepted", **changes: object) -> UpdateEntry:
    fields: dict[str, object] = {
        "update_id": update_id,
        "client_id": "dev1",
        "base_version": 2,
        "staleness": 1,
        "decision": decision,
        "reason": None if decision != "rejected" else "stale",
        "version": 3,
        "time": 1.0,
    }
    return UpdateEntry.model_validate(fields | changes)


def test_audit_entries_round_trip_as_json_lines() -> None:
    update = entry("u1", commit=4, size=123)
    merge = MergeEntry(version=3, update_ids=("u0", "u1"), commit=4)
    assert entry_from_json(entry_to_json(update)) == update
    assert entry_from_json(entry_to_json(merge)) == merge
    with pytest.raises(ValueError, match="not an audit entry"):
        entry_from_json('{"event": "update", "update_id": 5}')


def test_update_entry_turns_back_into_the_ack_it_recorded() -> None:
    ack = Ack(
        update_id="u1",
        client_id="dev1",
        accepted=False,
        reason="norm_bound",
        detail="too big",
        version=4,
        staleness=0,
    )
    recorded = UpdateEntry.from_ack(ack, decision="rejected", base_version=4, size=10)
    assert recorded.to_ack() == ack
    assert recorded.to_ack(duplicate=True) == ack.model_copy(update={"duplicate": True})


def test_audit_log_appends_and_reads(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a" / "audit.jsonl")
    log.append([entry("u1"), entry("u2", "rejected")])
    log.append([MergeEntry(version=3, update_ids=("u1",))])
    log.close()
    entries = read_audit(tmp_path / "a" / "audit.jsonl")
    assert [type(e).__name__ for e in entries] == ["UpdateEntry", "UpdateEntry", "MergeEntry"]
    assert read_audit(tmp_path / "missing.jsonl") == []


def test_audit_recover_cuts_a_torn_line_and_rewrites_missing_committed_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    committed_before = entry("u1", commit=1)
    log.append([committed_before, entry("r1", "rejected")])
    log.close()
    with path.open("ab") as handle:
        handle.write(b'{"event": "update", "update_id": "u2", "cli')  # died mid-write
    batch = (entry("u2", commit=2), MergeEntry(version=3, update_ids=("u1", "u2"), commit=2))
    log = AuditLog(path)
    entries = log.recover(batch)
    log.close()
    assert entries == [committed_before, entry("r1", "rejected"), *batch]
    assert read_audit(path) == entries
    # Recovering again adds nothing: the batch is there now.
    log = AuditLog(path)
    assert log.recover(batch) == entries
    log.close()
    assert path.read_text().count("\n") == 4


def test_read_audit_skips_a_garbled_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text(entry_to_json(entry("u1")) + "\nnot json\n" + entry_to_json(entry("u2")) + "\n")
    assert [e.update_id for e in read_audit(path)] == ["u1", "u2"]  # type: ignore[union-attr]
    assert "line 2" in caplog.text


def test_answers_to_keep_prefers_acceptance_and_skips_repeats() -> None:
    entries = [
        entry("u1"),
        entry("u2", "rejected"),
        entry("u1", "rejected", reason="duplicate", client_id="thief"),
        entry("u2", "duplicate"),
        entry("u3"),
        UpdateEntry(
            update_id=None,
            client_id="x",
            base_version=None,
            staleness=None,
            decision="rejected",
            reason="malformed",
            version=3,
        ),
    ]
    answers = answers_to_keep(entries, limit=10)
    assert list(answers) == ["u1", "u2", "u3"]
    assert answers["u1"].accepted and answers["u1"].client_id == "dev1"
    assert not answers["u2"].accepted and answers["u2"].reason == "stale"
    assert list(answers_to_keep(entries, limit=2)) == ["u2", "u3"]
