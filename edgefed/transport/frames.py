"""Between messages and MQTT frames: the path every payload takes, shared by both transports.

Outbound, :func:`encode_frames` encodes a message and splits it into
:class:`~schemas.messages.Chunk` frames when it is larger than ``max_payload``
(managed brokers often cap packets at 128 KiB-1 MiB). Inbound, :class:`Inbound`
checks, decodes and reassembles received frames, and :class:`DeliveryStream` hands
the results to the consumer: a :class:`Delivery` for every message that arrived
whole or was reassembled, a :class:`BadDelivery` for anything that could not be
decoded, so a malformed message is visible to the caller but never stops the stream.

Chunked transfers are delivered with the topic their chunk 0 arrived on (for a
retained global that is ``global/<version>/0``), or with the topic of the chunk
that completed the transfer when chunk 0's topic is unknown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from edgefed.transport.topic_match import check_topic
from schemas import chunking, codec
from schemas.codec import DEFAULT_MAX_MESSAGE_BYTES, Compression
from schemas.errors import ChunkError, CodecError, PayloadTooLarge
from schemas.messages import AnyMessage, Chunk, Message

log = logging.getLogger(__name__)

_REMEMBER_COMPLETED: Final = 4096


@dataclass(frozen=True)
class Delivery:
    """A whole, decoded message; ``size`` counts bytes on the wire, all chunks included."""

    topic: str
    message: AnyMessage
    size: int


@dataclass(frozen=True)
class BadDelivery:
    """Bytes that did not become a message: undecodable, too large, or a failed transfer."""

    topic: str
    error: CodecError
    size: int


@dataclass
class TransportStats:
    """Running counters, for metrics and the simulator's bytes-over-time plots."""

    published_bytes: int = 0
    published_frames: int = 0
    received_bytes: int = 0
    received_frames: int = 0
    deliveries: int = 0
    bad_deliveries: int = 0
    connections: int = 0


def encode_frames(
    topic: str,
    message: Message,
    *,
    retain: bool,
    chunk_topic: Callable[[int], str] | None,
    compression: Compression,
    max_payload: int,
    max_message_bytes: int,
) -> Iterator[tuple[str, bytes]]:
    """Encode ``message`` into the (topic, payload) frames to publish, in order.

    Checks happen before this returns, so nothing is sent when one fails; chunks are
    encoded lazily, one at a time, so a large message is not held twice as frames.

    Raises:
        ValueError: retained chunking without ``chunk_topic``, or an invalid topic.
        PayloadTooLarge: the encoded message exceeds ``max_message_bytes``.
    """
    check_topic(topic)
    data = codec.encode(message, compression=compression)
    if len(data) > max_message_bytes:
        raise PayloadTooLarge(len(data), max_message_bytes)
    if len(data) <= max_payload:
        return iter(((topic, data),))
    if retain and chunk_topic is None:
        raise ValueError(
            f"a retained message of {len(data)} bytes needs chunk_topic: on one topic only "
            "its last chunk would stay retained"
        )
    total, chunks = chunking.encode_chunks(data, max_payload=max_payload)
    topics = [check_topic(chunk_topic(i)) if chunk_topic else topic for i in range(total)]
    return zip(topics, chunks, strict=True)


async def announce_size(
    frames: Iterator[tuple[str, bytes]], before_send: Callable[[int], Awaitable[None]] | None
) -> Iterator[tuple[str, bytes]]:
    """Await ``before_send`` with the frames' total bytes; the frames are then held at once."""
    if before_send is None:
        return frames
    held = list(frames)
    await before_send(sum(len(payload) for _, payload in held))
    return iter(held)


async def send_windowed(
    frames: Iterable[tuple[str, bytes]],
    send: Callable[[str, bytes], Coroutine[object, object, None]],
    *,
    window: int,
    name: str,
) -> int:
    """Send ``frames`` with at most ``window`` in flight; return the bytes sent, once all are.

    The chunks of one message go out together so a slow link is not idle between
    acknowledgements. When one send fails, those still in flight are cancelled and
    the error is raised.
    """
    total = 0
    in_flight: deque[asyncio.Task[None]] = deque()
    try:
        for index, (topic, payload) in enumerate(frames):
            if len(in_flight) >= window:
                await in_flight.popleft()
            total += len(payload)
            in_flight.append(asyncio.create_task(send(topic, payload), name=f"{name}:{index}"))
        while in_flight:
            await in_flight.popleft()
    finally:
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
    return total


@dataclass
class _Transfer:
    """What is known about a chunked transfer besides its bytes."""

    last_seen: float
    last_topic: str
    first_topic: str | None = None
    wire_bytes: int = 0

    @property
    def topic(self) -> str:
        """The topic to deliver under: chunk 0's when it has arrived."""
        return self.first_topic or self.last_topic


class Inbound:
    """Turns received payloads into deliveries: size check, decode, chunk reassembly.

    Both transports feed every received payload through one of these, so chunked and
    malformed messages behave the same in unit tests and on a real broker.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_message_bytes
        self._ttl = chunk_ttl_s
        self._clock = clock
        self._reassembler = chunking.Reassembler(
            ttl_s=chunk_ttl_s, max_transfer_bytes=max_message_bytes, clock=clock
        )
        self._transfers: dict[str, _Transfer] = {}
        # Transfers completed within the TTL. The reassembler ignores late duplicates of
        # their chunks (QoS 1 redelivery, retained chunks re-sent after a reconnect) too;
        # this keeps them from reopening the topic and size bookkeeping here.
        self._completed: OrderedDict[str, float] = OrderedDict()

    @property
    def pending(self) -> int:
        """Chunked transfers still incomplete."""
        return len(self._transfers)

    def feed(self, topic: str, payload: bytes) -> Delivery | BadDelivery | None:
        """One received payload in; a delivery out when a message is whole (None otherwise)."""
        size = len(payload)
        if size == 0:
            return None  # a cleared retained message
        if size > self._max:
            return BadDelivery(topic, PayloadTooLarge(size, self._max), size)
        return self._decode(topic, payload, size, transfer_id=None)

    def expire(self) -> list[BadDelivery]:
        """Drop transfers idle for the TTL; each becomes a ``BadDelivery``."""
        now = self._clock()
        expired: list[BadDelivery] = []
        for error in self._reassembler.expire():
            transfer = self._transfers.pop(error.transfer_id, None)
            if transfer is None:
                expired.append(BadDelivery("", error, 0))
            else:
                expired.append(BadDelivery(transfer.topic, error, transfer.wire_bytes))
        # Safety net: bookkeeping idle far longer than the reassembler keeps a transfer
        # (a late duplicate chunk that the reassembler still remembers as completed).
        for transfer_id, transfer in list(self._transfers.items()):
            if now - transfer.last_seen > 2 * self._ttl:
                del self._transfers[transfer_id]
        while self._completed and now - next(iter(self._completed.values())) > self._ttl:
            self._completed.popitem(last=False)
        return expired

    def _decode(
        self, topic: str, payload: bytes, size: int, *, transfer_id: str | None
    ) -> Delivery | BadDelivery | None:
        """Decode a frame (``transfer_id`` None) or a reassembled transfer's payload."""
        try:
            message = codec.decode(payload, max_size=self._max)
        except CodecError as exc:
            return BadDelivery(topic, exc, size)
        if not isinstance(message, Chunk):
            return Delivery(topic, message, size)
        if transfer_id is None:
            return self._add_chunk(topic, message, size)
        error = CodecError(f"transfer {transfer_id} holds a chunk, not a message")
        return BadDelivery(topic, error, size)

    def _add_chunk(self, topic: str, chunk: Chunk, size: int) -> Delivery | BadDelivery | None:
        if chunk.transfer_id in self._completed:
            log.debug("duplicate chunk %d of completed transfer %s", chunk.index, chunk.transfer_id)
            return None
        now = self._clock()
        transfer = self._transfers.setdefault(chunk.transfer_id, _Transfer(now, topic))
        transfer.last_seen = now
        transfer.wire_bytes += size
        transfer.last_topic = topic
        if chunk.index == 0:
            transfer.first_topic = topic
        try:
            whole = self._reassembler.add(chunk)
        except ChunkError as exc:
            # The reassembler forgets a failed transfer (a sender may retry the id).
            self._transfers.pop(chunk.transfer_id, None)
            return BadDelivery(transfer.topic, exc, transfer.wire_bytes)
        if whole is None:
            return None
        self._transfers.pop(chunk.transfer_id, None)
        self._completed[chunk.transfer_id] = now
        if len(self._completed) > _REMEMBER_COMPLETED:
            self._completed.popitem(last=False)
        return self._decode(
            transfer.topic, whole, transfer.wire_bytes, transfer_id=chunk.transfer_id
        )


class _Closed:
    """Marks the end of the delivery stream."""


_CLOSED: Final = _Closed()


class DeliveryStream:
    """Received frames in, deliveries out to the consumer, every step counted.

    Each transport receives through one of these, so counting, logging and the
    handling of bad frames cannot drift apart between them. Closing ends every
    iterator.
    """

    def __init__(self, stats: TransportStats, inbound: Inbound) -> None:
        self._stats = stats
        self._inbound = inbound
        self._queue: asyncio.Queue[Delivery | BadDelivery | _Closed] = asyncio.Queue()

    def receive(self, topic: str, payload: bytes) -> None:
        """Count one received frame and queue what it completes, if anything."""
        self._stats.received_frames += 1
        self._stats.received_bytes += len(payload)
        try:
            item = self._inbound.feed(topic, payload)
        except Exception as exc:
            # A decoder bug on hostile bytes must not take the receive loop down with it.
            log.exception("unexpected error decoding a message on %r", topic)
            item = BadDelivery(topic, CodecError(f"decoder failed: {exc!r}"), len(payload))
        if item is not None:
            self._put(item)

    def expire(self) -> list[BadDelivery]:
        """Expire idle chunked transfers; each is queued as a ``BadDelivery`` and returned."""
        expired = self._inbound.expire()
        for bad in expired:
            self._put(bad)
        return expired

    def close(self) -> None:
        """End every iterator once the deliveries already queued are consumed."""
        self._queue.put_nowait(_CLOSED)

    async def iterate(self) -> AsyncIterator[Delivery | BadDelivery]:
        """Deliveries in arrival order, until :meth:`close`."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _Closed):
                self._queue.put_nowait(item)  # so every other iterator ends too
                return
            yield item

    def _put(self, item: Delivery | BadDelivery) -> None:
        if isinstance(item, BadDelivery):
            self._stats.bad_deliveries += 1
            log.warning(
                "dropped a bad message on %r (%d bytes): %s", item.topic, item.size, item.error
            )
        else:
            self._stats.deliveries += 1
        self._queue.put_nowait(item)
