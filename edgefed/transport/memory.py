"""The :class:`~edgefed.transport.mqtt.Transport` protocol in memory, for pure unit tests.

:class:`MemoryTransport` with :class:`MemoryBroker` encodes, chunks and decodes
exactly as the MQTT transport does (through :mod:`edgefed.transport.frames`), so components
built on the protocol can be tested without a socket (httpx ``MockTransport``). It
is never a stand-in for a broker in integration tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from edgefed.transport.config import Will
from edgefed.transport.frames import (
    BadDelivery,
    Delivery,
    DeliveryStream,
    Inbound,
    TransportStats,
    announce_size,
    encode_frames,
)
from edgefed.transport.topic_match import (
    check_filter,
    check_qos,
    check_topic,
    split_shared,
    topic_matches,
)
from schemas import codec
from schemas.codec import DEFAULT_MAX_MESSAGE_BYTES, Compression
from schemas.errors import TransportError
from schemas.messages import Message


@dataclass(frozen=True)
class Frame:
    """One payload as it crossed the in-memory broker (for assertions in tests)."""

    topic: str
    payload: bytes
    retain: bool
    sender: str


class MemoryBroker:
    """An in-process broker for unit tests of components written against ``Transport``.

    It keeps retained messages (an empty retained payload deletes), matches ``+`` and
    ``#`` filters, spreads ``$share/<group>/`` subscriptions over the group's members
    and publishes a client's will when :meth:`MemoryTransport.drop_connection` is called.
    Every frame is recorded in :attr:`frames`. Delivery is immediate and in order.
    """

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.frames: list[Frame] = []
        self._clients: dict[str, MemoryTransport] = {}
        self._share_turn: dict[tuple[str, str], int] = {}

    def transport(
        self,
        client_id: str,
        *,
        max_payload: int = 256 * 1024,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_ttl_s: float = 60.0,
        will: Will | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> MemoryTransport:
        """A new client of this broker (see :class:`MemoryTransport`)."""
        return MemoryTransport(
            self,
            client_id=client_id,
            max_payload=max_payload,
            max_message_bytes=max_message_bytes,
            chunk_ttl_s=chunk_ttl_s,
            will=will,
            clock=clock,
        )

    @property
    def clients(self) -> list[str]:
        """Client ids connected now."""
        return list(self._clients)

    def _attach(self, client: MemoryTransport) -> None:
        previous = self._clients.get(client.client_id)
        if previous is not None and previous is not client:
            previous._taken_over()
        self._clients[client.client_id] = client

    def _detach(self, client: MemoryTransport, *, publish_will: bool) -> None:
        if self._clients.get(client.client_id) is client:
            del self._clients[client.client_id]
        if publish_will and client.will_frame is not None:
            topic, payload, retain = client.will_frame
            self._route(topic, payload, retain=retain, sender=client.client_id)

    def _route(self, topic: str, payload: bytes, *, retain: bool, sender: str) -> None:
        self.frames.append(Frame(topic, payload, retain, sender))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        shared: dict[tuple[str, str], list[MemoryTransport]] = {}
        for client in list(self._clients.values()):
            direct = False
            for topic_filter in client.subscriptions:
                if not topic_matches(topic_filter, topic):
                    continue
                group, inner = split_shared(topic_filter)
                if group is None:
                    direct = True
                else:
                    shared.setdefault((group, inner), []).append(client)
            if direct:
                client._receive(topic, payload)
        for key, members in sorted(shared.items()):
            turn = self._share_turn.get(key, 0)
            self._share_turn[key] = turn + 1
            members[turn % len(members)]._receive(topic, payload)

    def _retained_matching(self, topic_filter: str) -> list[tuple[str, bytes]]:
        group, _ = split_shared(topic_filter)
        if group is not None:
            return []  # shared subscriptions get no retained messages
        return [(t, p) for t, p in self.retained.items() if topic_matches(topic_filter, t)]


class MemoryTransport:
    """The ``Transport`` over a :class:`MemoryBroker`, with the same encode/chunk/decode path.

    Use as ``async with broker.transport("agent-1") as transport:``. The ``clock`` drives
    chunk expiry so tests can expire transfers without sleeping (:meth:`expire_transfers`).
    """

    def __init__(
        self,
        broker: MemoryBroker,
        *,
        client_id: str = "memory",
        max_payload: int = 256 * 1024,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_ttl_s: float = 60.0,
        will: Will | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.max_payload = max_payload
        self.max_message_bytes = max_message_bytes
        self.stats = TransportStats()
        self.subscriptions: dict[str, int] = {}
        self.will_frame: tuple[str, bytes, bool] | None = None
        if will is not None:
            self.will_frame = (check_topic(will.topic), codec.encode(will.message), will.retain)
        inbound = Inbound(max_message_bytes=max_message_bytes, chunk_ttl_s=chunk_ttl_s, clock=clock)
        self._stream = DeliveryStream(self.stats, inbound)
        self._connected = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.client_id} connected={self._connected}>"

    async def __aenter__(self) -> Self:
        self.broker._attach(self)
        self._connected = True
        self.stats.connections += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect cleanly (no will) and end ``deliveries``."""
        if self._closed:
            return
        self._closed = True
        if self._connected:
            self.broker._detach(self, publish_will=False)
        self._connected = False
        self._stream.close()

    @property
    def connected(self) -> bool:
        """Whether attached to the broker."""
        return self._connected

    async def drop_connection(self) -> None:
        """Lose the connection: the broker publishes the will; then reconnect and re-subscribe."""
        self._require_connected()
        self.broker._detach(self, publish_will=True)
        self.broker._attach(self)
        self.stats.connections += 1
        for topic_filter in self.subscriptions:
            self._send_retained(topic_filter)

    def expire_transfers(self) -> list[BadDelivery]:
        """Expire incomplete transfers now (by ``clock``); each is also delivered."""
        return self._stream.expire()

    async def publish(
        self,
        topic: str,
        message: Message,
        *,
        retain: bool = False,
        qos: int = 1,
        chunk_topic: Callable[[int], str] | None = None,
        compression: Compression = "none",
        before_send: Callable[[int], Awaitable[None]] | None = None,
    ) -> int:
        """See :meth:`~edgefed.transport.mqtt.Transport.publish`."""
        check_qos(qos)
        self._require_connected()
        frames = encode_frames(
            topic,
            message,
            retain=retain,
            chunk_topic=chunk_topic,
            compression=compression,
            max_payload=self.max_payload,
            max_message_bytes=self.max_message_bytes,
        )
        total = 0
        for frame_topic, payload in await announce_size(frames, before_send):
            self._send(frame_topic, payload, retain=retain)
            total += len(payload)
            await asyncio.sleep(0)  # let receivers run between chunks, as a broker would
        return total

    async def clear_retained(self, topic: str) -> None:
        """See :meth:`~edgefed.transport.mqtt.Transport.clear_retained`."""
        self._require_connected()
        self._send(check_topic(topic), b"", retain=True)

    async def publish_text(
        self, topic: str, text: str, *, retain: bool = False, qos: int = 1
    ) -> None:
        """See :meth:`~edgefed.transport.base.Transport.publish_text`."""
        self._require_connected()
        check_qos(qos)
        self._send(check_topic(topic), text.encode(), retain=retain)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """See :meth:`~edgefed.transport.mqtt.Transport.subscribe`; retained matches arrive at once."""
        check_filter(topic_filter)
        check_qos(qos)
        self._require_connected()
        self.subscriptions[topic_filter] = qos
        self._send_retained(topic_filter)

    async def unsubscribe(self, topic_filter: str) -> None:
        """See :meth:`~edgefed.transport.base.Transport.unsubscribe`."""
        self.subscriptions.pop(topic_filter, None)

    def deliveries(self) -> AsyncIterator[Delivery | BadDelivery]:
        """See :meth:`~edgefed.transport.mqtt.Transport.deliveries`."""
        return self._stream.iterate()

    def _send(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.stats.published_frames += 1
        self.stats.published_bytes += len(payload)
        self.broker._route(topic, payload, retain=retain, sender=self.client_id)

    def _send_retained(self, topic_filter: str) -> None:
        for topic, payload in self.broker._retained_matching(topic_filter):
            self._receive(topic, payload)

    def _receive(self, topic: str, payload: bytes) -> None:
        self._stream.expire()  # time passed before this frame arrived
        self._stream.receive(topic, payload)

    def _taken_over(self) -> None:
        """Another client connected with our id; like a broker, drop this one."""
        self._connected = False

    def _require_connected(self) -> None:
        if not self._connected:
            raise TransportError(f"{self.client_id}: not connected to the memory broker")
