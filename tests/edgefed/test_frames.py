"""The path between messages and frames: encoding, windowed sending, the inbound path."""

from __future__ import annotations

import asyncio

import pytest
import torch

from edgefed.transport.frames import BadDelivery, Delivery, Inbound, encode_frames, send_windowed
from schemas import codec
from schemas.errors import ChunkError, CodecError, PayloadTooLarge
from schemas.messages import Update
from tests.edgefed.transport_helpers import MiB, chunk_frames, make_update


def test_encode_frames_small_message_is_one_frame() -> None:
    update = make_update()
    frames = list(
        encode_frames(
            "t",
            update,
            retain=False,
            chunk_topic=None,
            compression="none",
            max_payload=64 * 1024,
            max_message_bytes=MiB,
        )
    )
    assert frames == [("t", codec.encode(update))]


def test_encode_frames_refuses_before_sending() -> None:
    update = make_update(nbytes=300 * 1024)
    common = {"chunk_topic": None, "compression": "none", "max_message_bytes": MiB}
    with pytest.raises(ValueError, match="chunk_topic"):
        encode_frames("t", update, retain=True, max_payload=64 * 1024, **common)  # type: ignore[arg-type]
    with pytest.raises(PayloadTooLarge):
        encode_frames(
            "t",
            update,
            retain=False,
            chunk_topic=None,
            compression="none",
            max_payload=64 * 1024,
            max_message_bytes=100 * 1024,
        )
    with pytest.raises(ValueError, match="publish"):
        encode_frames("t/+", update, retain=False, max_payload=MiB, **common)  # type: ignore[arg-type]


async def test_send_windowed_keeps_the_window_and_counts_bytes() -> None:
    in_flight = 0
    most = 0
    sent: list[str] = []

    async def send(topic: str, payload: bytes) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        sent.append(topic)

    frames = [(f"t/{index}", b"x" * index) for index in range(10)]
    assert await send_windowed(frames, send, window=3, name="test") == sum(range(10))
    assert most == 3
    assert sorted(sent) == sorted(topic for topic, _ in frames)


async def test_send_windowed_cancels_the_rest_when_one_fails() -> None:
    cancelled: list[str] = []

    async def send(topic: str, payload: bytes) -> None:
        if topic == "t/0":
            raise OSError("link down")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(topic)
            raise

    frames = [(f"t/{index}", b"x") for index in range(3)]
    with pytest.raises(OSError, match="link down"):
        await send_windowed(frames, send, window=3, name="test")
    assert sorted(cancelled) == ["t/1", "t/2"]


def test_inbound_reassembles_reordered_and_duplicated_chunks_under_chunk0_topic() -> None:
    update = make_update(nbytes=100 * 1024)
    frames = chunk_frames(update)
    assert len(frames) > 3
    assert all(len(payload) <= 16 * 1024 for _, payload in frames)
    inbound = Inbound(max_message_bytes=MiB)
    arrivals = [*reversed(frames), frames[1]]  # chunk 0 is not the last to arrive
    results = [inbound.feed(topic, payload) for topic, payload in arrivals]
    [delivered] = [result for result in results if result is not None]
    assert isinstance(delivered, Delivery)
    assert delivered.topic == "u/0"
    assert delivered.size == sum(len(payload) for _, payload in frames)
    assert isinstance(delivered.message, Update)
    assert torch.equal(delivered.message.delta["layer.lora_B"], update.delta["layer.lora_B"])
    assert inbound.feed(*frames[2]) is None  # a late duplicate of a finished transfer
    assert inbound.pending == 0


def test_inbound_without_chunk0_uses_completing_topic() -> None:
    frames = chunk_frames(make_update(nbytes=40 * 1024))
    inbound = Inbound(max_message_bytes=MiB)
    for index, (_, payload) in enumerate(frames):
        topic = "elsewhere" if index == 0 else f"u/{index}"
        result = inbound.feed(topic, payload)
    assert isinstance(result, Delivery)
    assert result.topic == "elsewhere"
    inbound = Inbound(max_message_bytes=MiB)
    results = [inbound.feed(f"late/{i}", payload) for i, (_, payload) in enumerate(frames)]
    assert isinstance(results[-1], Delivery)
    assert results[-1].topic == "late/0"


def test_inbound_expired_transfer_becomes_bad_delivery() -> None:
    now = [0.0]
    inbound = Inbound(max_message_bytes=MiB, chunk_ttl_s=5.0, clock=lambda: now[0])
    frames = chunk_frames(make_update(nbytes=40 * 1024))
    assert inbound.feed(*frames[0]) is None
    assert inbound.feed(*frames[1]) is None
    assert inbound.expire() == []
    now[0] = 6.0
    [expired] = inbound.expire()
    assert isinstance(expired.error, ChunkError)
    assert expired.topic == "u/0"
    assert expired.size == len(frames[0][1]) + len(frames[1][1])
    assert inbound.pending == 0


def test_inbound_refuses_garbage_and_oversize_and_ignores_empty() -> None:
    inbound = Inbound(max_message_bytes=1000)
    assert inbound.feed("t", b"") is None
    garbage = inbound.feed("t", b"\xc1not msgpack")
    assert isinstance(garbage, BadDelivery)
    assert isinstance(garbage.error, CodecError)
    oversize = inbound.feed("t", b"\x00" * 1001)
    assert isinstance(oversize, BadDelivery)
    assert isinstance(oversize.error, PayloadTooLarge)
    assert oversize.size == 1001
