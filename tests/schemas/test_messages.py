"""Message models validate when built, which is what lets the codec trust a built message."""

from __future__ import annotations

import pydantic
import pytest
import torch

from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION, Ack, Chunk, Update


def test_messages_every_kind_is_distinct_and_versioned() -> None:
    kinds = [cls.model_fields["kind"].default for cls in MESSAGE_TYPES]
    assert len(set(kinds)) == len(kinds)
    assert all(
        cls.model_fields["schema_version"].default == SCHEMA_VERSION for cls in MESSAGE_TYPES
    )


def test_messages_are_frozen_and_refuse_unknown_fields() -> None:
    ack = Ack(update_id="u", client_id="c", accepted=True, version=1)
    with pytest.raises(pydantic.ValidationError):
        ack.version = 2  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        Ack(update_id="u", client_id="c", accepted=True, version=1, surprise=1)  # type: ignore[call-arg]


def test_messages_ack_rejection_needs_a_reason() -> None:
    with pytest.raises(pydantic.ValidationError, match="reason"):
        Ack(update_id="u", client_id="c", accepted=False, version=1)
    assert (
        Ack(update_id="u", client_id="c", accepted=False, reason="stale", version=1).reason
        == "stale"
    )


def test_messages_chunk_index_must_be_below_total() -> None:
    with pytest.raises(pydantic.ValidationError, match="index"):
        Chunk(transfer_id="t", index=2, total=2, size=1, xxh3="0" * 16, data=b"x")
    with pytest.raises(pydantic.ValidationError):
        Chunk(transfer_id="t", index=0, total=1, size=1, xxh3="not-hex", data=b"x")


def test_messages_update_holds_tensors_and_gets_a_fresh_id() -> None:
    first = Update(
        client_id="c", task_id="t", base_version=0, num_samples=1, delta={"w": torch.ones(2)}
    )
    second = Update(client_id="c", task_id="t", base_version=0, num_samples=1, delta={})
    assert first.update_id != second.update_id
    with pytest.raises(pydantic.ValidationError):
        Update(client_id="c", task_id="t", base_version=0, num_samples=0, delta={})
    with pytest.raises(pydantic.ValidationError):
        Update(client_id="c", task_id="t", base_version=0, num_samples=1, delta={"w": [1.0]})
