"""The transport protocol: publish and receive whole messages, whatever carries them.

Everything above the transport is written against :class:`Transport`. Two implementations
exist: :class:`~edgefed.transport.mqtt.MqttTransport` (a real broker) and
:class:`~edgefed.transport.memory.MemoryTransport` (an in-process stand-in for unit tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from edgefed.transport.frames import BadDelivery, Delivery, TransportStats
from schemas.codec import Compression
from schemas.messages import Message


class Transport(Protocol):
    """Publish and receive whole messages; what every component is written against."""

    stats: TransportStats
    """Bytes and messages so far, both ways (metrics and benchmarks read them)."""
    max_payload: int
    """Largest MQTT payload sent; a larger message goes out in chunks."""

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
        """Encode and publish ``message``; return the bytes published, all chunks included.

        A payload larger than ``max_payload`` is split into chunks; chunk ``i`` goes to
        ``chunk_topic(i)`` when given, else to ``topic``. ``before_send``, when given, is
        awaited with the bytes about to be published (all chunks) before the first goes
        out: an emulated link delays exactly what the transport sends.

        Raises:
            ValueError: ``retain`` with chunking and no ``chunk_topic`` (only the last chunk
                would stay retained), or an invalid topic or QoS.
            PayloadTooLarge: the encoded message exceeds ``max_message_bytes``.
            TransportError: the broker did not take the message in time.
        """
        ...

    async def clear_retained(self, topic: str) -> None:
        """Delete the retained message on ``topic`` (an empty retained payload)."""
        ...

    async def publish_text(
        self, topic: str, text: str, *, retain: bool = False, qos: int = 1
    ) -> None:
        """Publish UTF-8 ``text`` outside the codec: JSON that ``mosquitto_sub`` shows as is."""
        ...

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""
        ...

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving what ``topic_filter`` matches (and stop re-subscribing to it)."""
        ...

    def deliveries(self) -> AsyncIterator[Delivery | BadDelivery]:
        """Every message received, in arrival order; ends when the transport closes."""
        ...
