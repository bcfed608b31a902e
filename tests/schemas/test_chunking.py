"""Chunked transfers: splitting under a size limit and reassembly under real-world disorder."""

from __future__ import annotations

import random

import pytest
import torch
import xxhash

from schemas.chunking import Reassembler, checksum, encode_chunks, split_payload
from schemas.codec import decode, encode
from schemas.errors import ChunkError, ConfigError
from schemas.messages import Chunk, Update


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000, 64 * 1024 + 3])
@pytest.mark.parametrize("max_payload", [400, 1000, 4096])
def test_split_payload_every_encoded_chunk_fits(size: int, max_payload: int) -> None:
    payload = _payload(size)
    chunks = split_payload(payload, max_payload=max_payload)
    assert all(len(encode(chunk)) <= max_payload for chunk in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.total for c in chunks} == {len(chunks)}
    assert {c.transfer_id for c in chunks} == {chunks[0].transfer_id}
    assert b"".join(c.data for c in chunks) == payload
    assert chunks[0].xxh3 == xxhash.xxh3_64_hexdigest(payload)
    assert all(c.data for c in chunks) or size == 0


def test_split_payload_uses_the_room_it_has() -> None:
    chunks = split_payload(_payload(100_000), max_payload=10_000)
    # All but the last chunk are full to within the few bytes reserved for index growth.
    assert all(len(encode(c)) > 10_000 - 16 for c in chunks[:-1])


def test_split_payload_empty_payload_gives_one_chunk() -> None:
    chunks = split_payload(b"")
    assert len(chunks) == 1
    assert (chunks[0].total, chunks[0].size, chunks[0].data) == (1, 0, b"")


def test_split_payload_keeps_a_given_transfer_id_and_accepts_memoryview() -> None:
    payload = _payload(3000)
    chunks = split_payload(memoryview(payload), max_payload=1000, transfer_id="t-42")
    assert {c.transfer_id for c in chunks} == {"t-42"}
    assert b"".join(c.data for c in chunks) == payload


@pytest.mark.parametrize("size", [0, 999, 5000, 64 * 1024 + 3])
def test_encode_chunks_frames_match_the_encoded_split(size: int) -> None:
    payload = _payload(size, 5)
    total, frames = encode_chunks(payload, max_payload=1000, transfer_id="t-7")
    expected = split_payload(payload, max_payload=1000, transfer_id="t-7")
    assert total == len(expected)
    assert list(frames) == [encode(chunk) for chunk in expected]


def test_encode_chunks_rejects_a_limit_with_no_room_before_any_frame() -> None:
    with pytest.raises(ConfigError):
        encode_chunks(b"abc", max_payload=100)


def test_split_payload_rejects_a_limit_with_no_room() -> None:
    with pytest.raises(ConfigError):
        split_payload(b"abc", max_payload=100)


def _reassemble(chunks: list[Chunk], reassembler: Reassembler) -> list[bytes]:
    return [out for chunk in chunks if (out := reassembler.add(chunk)) is not None]


def test_reassembler_shuffled_order() -> None:
    payload = _payload(20_000, 1)
    chunks = split_payload(payload, max_payload=1000)
    random.Random(5).shuffle(chunks)
    reassembler = Reassembler()
    assert _reassemble(chunks, reassembler) == [payload]
    assert reassembler.pending == 0


def test_reassembler_duplicates_are_ignored() -> None:
    payload = _payload(8000, 2)
    chunks = split_payload(payload, max_payload=1000)
    doubled = [c for c in chunks for _ in range(2)]
    random.Random(6).shuffle(doubled)
    reassembler = Reassembler()
    assert _reassemble(doubled, reassembler) == [payload]


def test_reassembler_late_duplicate_after_completion_returns_none() -> None:
    clock = FakeClock()
    chunks = split_payload(_payload(5000, 3), max_payload=1000)
    reassembler = Reassembler(ttl_s=30, clock=clock)
    assert len(_reassemble(chunks, reassembler)) == 1
    clock.now += 10
    assert reassembler.add(chunks[2]) is None
    assert reassembler.pending == 0
    assert reassembler.expire() == []


def test_reassembler_forgets_completed_ids_after_ttl() -> None:
    clock = FakeClock()
    chunks = split_payload(_payload(3000, 4), max_payload=1000)
    reassembler = Reassembler(ttl_s=30, clock=clock)
    _reassemble(chunks, reassembler)
    clock.now += 31
    assert reassembler.add(chunks[0]) is None
    assert reassembler.pending == 1  # a new transfer under the old id, which will expire


def test_reassembler_missing_chunk_expires_with_chunk_error() -> None:
    clock = FakeClock()
    chunks = split_payload(_payload(5000, 5), max_payload=1000)
    reassembler = Reassembler(ttl_s=60, clock=clock)
    assert _reassemble(chunks[:2] + chunks[3:], reassembler) == []
    assert reassembler.pending == 1
    clock.now += 59
    assert reassembler.expire() == []
    clock.now += 1
    errors = reassembler.expire()
    assert len(errors) == 1
    assert isinstance(errors[0], ChunkError)
    assert errors[0].transfer_id == chunks[0].transfer_id
    assert "expired" in errors[0].reason
    assert reassembler.pending == 0


def test_reassembler_expiry_counts_idle_time() -> None:
    clock = FakeClock()
    chunks = split_payload(_payload(5000, 6), max_payload=1000)
    reassembler = Reassembler(ttl_s=60, clock=clock)
    for chunk in chunks[:-1]:
        reassembler.add(chunk)
        clock.now += 40  # slow but steady: never idle for 60 s
        assert reassembler.expire() == []
    assert reassembler.add(chunks[-1]) is not None


def test_reassembler_corrupted_chunk_fails_the_checksum_and_is_forgotten() -> None:
    payload = _payload(4000, 7)
    chunks = split_payload(payload, max_payload=1000)
    bad = chunks[1].model_copy(update={"data": bytes(len(chunks[1].data))})
    reassembler = Reassembler()
    with pytest.raises(ChunkError, match="checksum does not match") as info:
        _reassemble([chunks[0], bad, *chunks[2:]], reassembler)
    assert info.value.transfer_id == chunks[0].transfer_id
    assert reassembler.pending == 0
    # The sender may retry under the same id.
    assert _reassemble(chunks, reassembler) == [payload]


def test_reassembler_inconsistent_chunks_raise_and_are_forgotten() -> None:
    chunks = split_payload(_payload(4000, 8), max_payload=1000)
    other_total = chunks[1].model_copy(update={"total": chunks[1].total + 1})
    reassembler = Reassembler()
    reassembler.add(chunks[0])
    with pytest.raises(ChunkError, match="disagree"):
        reassembler.add(other_total)
    assert reassembler.pending == 0


def test_reassembler_conflicting_duplicate_raises() -> None:
    chunks = split_payload(_payload(4000, 9), max_payload=1000)
    reassembler = Reassembler()
    reassembler.add(chunks[0])
    with pytest.raises(ChunkError, match="different data"):
        reassembler.add(chunks[0].model_copy(update={"data": b"x" * len(chunks[0].data)}))
    assert reassembler.pending == 0


def test_reassembler_refuses_transfers_over_the_limit() -> None:
    chunks = split_payload(_payload(5000, 10), max_payload=1000)
    reassembler = Reassembler(max_transfer_bytes=4999)
    with pytest.raises(ChunkError, match="exceeds"):
        reassembler.add(chunks[0])
    assert reassembler.pending == 0


def test_reassembler_refuses_chunks_carrying_more_than_announced() -> None:
    digest = checksum(b"abcd")
    first = Chunk(transfer_id="t", index=0, total=2, size=4, xxh3=digest, data=b"abc")
    second = Chunk(transfer_id="t", index=1, total=2, size=4, xxh3=digest, data=b"de")
    reassembler = Reassembler()
    reassembler.add(first)
    with pytest.raises(ChunkError, match="more than"):
        reassembler.add(second)


def test_reassembler_refuses_more_chunks_than_bytes() -> None:
    digest = checksum(b"ab")
    chunk = Chunk(transfer_id="t", index=0, total=5, size=2, xxh3=digest, data=b"a")
    with pytest.raises(ChunkError, match="cannot carry"):
        Reassembler().add(chunk)


def test_reassembler_keeps_transfers_apart() -> None:
    a, b = _payload(3000, 11), _payload(2500, 12)
    chunks = split_payload(a, max_payload=1000) + split_payload(b, max_payload=1000)
    random.Random(7).shuffle(chunks)
    assert sorted(_reassemble(chunks, Reassembler())) == sorted([a, b])


def test_reassembler_reversed_order() -> None:
    payload = _payload(4321, 13)
    chunks = split_payload(payload, max_payload=1000)
    assert _reassemble(chunks[::-1], Reassembler()) == [payload]


def test_reassembler_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError):
        Reassembler(ttl_s=0)


def test_chunking_carries_an_encoded_update_over_the_wire() -> None:
    tensor = torch.randn(64 * 1024)
    update = Update(client_id="c", task_id="t", base_version=1, num_samples=3, delta={"w": tensor})
    payload = encode(update)
    max_payload = 16 * 1024
    wire = [encode(chunk) for chunk in split_payload(payload, max_payload=max_payload)]
    assert len(wire) > 1
    assert all(len(message) <= max_payload for message in wire)
    random.Random(8).shuffle(wire)
    reassembler = Reassembler()
    results = []
    for message in wire:
        chunk = decode(message)
        assert isinstance(chunk, Chunk)
        if (out := reassembler.add(chunk)) is not None:
            results.append(out)
    assert results == [payload]
    decoded = decode(results[0])
    assert isinstance(decoded, Update)
    assert torch.equal(decoded.delta["w"], tensor)
