"""The MQTT transport: the only module that talks to the MQTT client library.

Everything above this module sees whole, decoded messages: ``publish`` encodes a
message and splits it into :class:`~schemas.messages.Chunk` messages when it is
larger than ``max_payload`` (managed brokers often cap packets at 128 KiB-1 MiB);
``deliveries`` yields :class:`Delivery` for every message that arrived whole or
was reassembled, and :class:`BadDelivery` for anything that could not be decoded,
so a malformed message is visible to the caller but never stops the stream.

:class:`MqttTransport` uses aiomqtt (asyncio): paho's own ``select()`` loop fails
quietly past about 340 clients per process (DESIGN §8b), and the simulator runs
many agents in one process. It keeps its connection in a background task,
reconnects with jittered exponential backoff, re-subscribes after every
reconnect, and makes publishes wait (bounded) while the broker is away.

:class:`MemoryTransport` with :class:`MemoryBroker` is the same protocol in
memory, for pure unit tests of the components built on :class:`Transport`; it is
never a stand-in for a broker in integration tests.

Chunked transfers are delivered with the topic their chunk 0 arrived on (for a
retained global that is ``global/<version>/0``), or with the topic of the chunk
that completed the transfer when chunk 0's topic is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, Protocol, Self, TypeVar
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from schemas import chunking, codec
from schemas.codec import DEFAULT_MAX_MESSAGE_BYTES, Compression
from schemas.errors import ChunkError, CodecError, ConfigError, PayloadTooLarge, TransportError
from schemas.messages import AnyMessage, Chunk, Message

log = logging.getLogger(__name__)
_T = TypeVar("_T")

Scheme = Literal["mqtt", "mqtts"]
DEFAULT_PORTS: Final[Mapping[str, int]] = {"mqtt": 1883, "mqtts": 8883}
LOCAL_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
"""Where a development broker is looked for when no URL is given."""
MQTT_MAX_PACKET: Final = 268_435_455
"""The MQTT remaining-length limit; clients refuse larger payloads outright."""
MIN_MAX_PAYLOAD: Final = 4096
"""Below this, chunk headers would dominate every packet."""
USERNAME_ENV: Final = "EDGEFED_MQTT_USERNAME"
PASSWORD_ENV: Final = "EDGEFED_MQTT_PASSWORD"  # noqa: S105 (the variable's name, not a secret)

# CONNACK refusals worth retrying: the broker is up but cannot take us now. Every other
# refusal (bad credentials, not authorised, invalid client id) will not fix itself.
_RETRYABLE_CONNACK: Final = frozenset({0x88, 0x89, 0x97, 0x9F})
_SUBACK_FAILURE: Final = 0x80


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BrokerURL:
    """Where the broker is: ``mqtt://[user:pass@]host[:port]``, ``mqtts://...`` or ``host:port``.

    The password is kept out of ``repr`` and ``str`` so URLs can be logged.
    """

    scheme: Scheme
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.scheme not in DEFAULT_PORTS:
            raise ConfigError(f"broker scheme {self.scheme!r} must be mqtt or mqtts")
        if not self.host:
            raise ConfigError("broker URL has no host")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port {self.port} is not in 1-65535")

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """Parse a broker URL; a bare ``host[:port]`` means ``mqtt://``.

        Raises:
            ConfigError: the URL is not an MQTT broker address.
        """
        text = url.strip()
        if not text:
            raise ConfigError("broker URL is empty")
        if "://" not in text:
            text = f"mqtt://{text}"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r} is malformed: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"broker URL {url!r} may not have a path, query or fragment")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host")
        return cls(
            scheme="mqtts" if scheme == "mqtts" else "mqtt",
            host=parts.hostname,
            port=DEFAULT_PORTS[scheme] if port is None else port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted."""
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for a client whose connection dies uncleanly.

    A clean shutdown (leaving ``async with``) sends DISCONNECT, so the will is not
    published then: publish the offline status yourself before leaving.
    """

    topic: str
    message: Message
    retain: bool = True


@dataclass(frozen=True)
class TransportConfig:
    """How one client reaches the broker.

    Attributes:
        url: broker URL (see :meth:`BrokerURL.parse`).
        client_id: MQTT client identifier; unique per broker.
        max_payload: encoded messages above this are split into chunks.
        max_message_bytes: largest whole message sent or accepted, checked before decoding.
        keepalive: seconds between pings; a dead link is noticed after about 1.5x this.
        clean_session: ``False`` keeps subscriptions and queued QoS 1 messages while the
            client is away, which the aggregator needs for update subscriptions (DESIGN §8b).
        will: last will, published by the broker when the connection dies uncleanly.
        ca_file: CA bundle for TLS; ``mqtts`` without it uses the system store.
        cert_file: client certificate for TLS client authentication.
        key_file: key of ``cert_file`` when it is not inside it.
        username: overrides the URL's user name, which overrides ``EDGEFED_MQTT_USERNAME``.
        password: overrides the URL's password, which overrides ``EDGEFED_MQTT_PASSWORD``.
        reconnect_min_s: smallest pause between connection attempts.
        reconnect_max_s: largest pause between connection attempts.
        chunk_ttl_s: an incomplete chunked transfer older than this is dropped.
        connect_timeout_s: deadline for the first connection when entering the transport.
        publish_timeout_s: how long one publish or subscribe may wait for a connection and
            the broker's acknowledgement before it raises ``TransportError``.
        publish_window: chunks of one message in flight at once.
    """

    url: str
    client_id: str
    max_payload: int = 256 * 1024
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive: int = 30
    clean_session: bool = True
    will: Will | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    chunk_ttl_s: float = 60.0
    connect_timeout_s: float = 30.0
    publish_timeout_s: float = 60.0
    publish_window: int = 8

    def __post_init__(self) -> None:
        BrokerURL.parse(self.url)
        if not self.client_id or len(self.client_id.encode()) > 65535:
            raise ConfigError("client_id must be 1-65535 bytes")
        if not MIN_MAX_PAYLOAD <= self.max_payload <= MQTT_MAX_PACKET - 65536:
            raise ConfigError(
                f"max_payload {self.max_payload} must be between {MIN_MAX_PAYLOAD} "
                f"and {MQTT_MAX_PACKET - 65536} bytes"
            )
        if self.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes must be positive")
        if not 0 <= self.keepalive <= 65535:
            raise ConfigError("keepalive must be 0-65535 seconds")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.chunk_ttl_s <= 0 or self.connect_timeout_s <= 0 or self.publish_timeout_s <= 0:
            raise ConfigError("chunk_ttl_s, connect_timeout_s and publish_timeout_s must be > 0")
        if self.publish_window < 1:
            raise ConfigError("publish_window must be at least 1")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("key_file needs cert_file")

    @property
    def broker(self) -> BrokerURL:
        """The parsed broker URL."""
        return BrokerURL.parse(self.url)


def resolve_credentials(
    config: TransportConfig, *, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str | None]:
    """User name and password to send: the config's, else the URL's, else the environment's.

    Each of the two is resolved on its own, so a password from the environment can go
    with a user name in the URL and no secret ever has to sit in a command line.
    """
    env = os.environ if environ is None else environ
    url = config.broker
    username = config.username or url.username or env.get(USERNAME_ENV) or None
    password = config.password
    if password is None:
        password = url.password if url.password is not None else env.get(PASSWORD_ENV)
    if password is not None and username is None:
        raise ConfigError("an MQTT password needs a user name")
    return username, password


# --------------------------------------------------------------------------- deliveries


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


class Transport(Protocol):
    """Publish and receive whole messages; what every component is written against."""

    async def publish(
        self,
        topic: str,
        message: Message,
        *,
        retain: bool = False,
        qos: int = 1,
        chunk_topic: Callable[[int], str] | None = None,
        compression: Compression = "none",
    ) -> int:
        """Encode and publish ``message``; return the bytes published, all chunks included.

        A payload larger than ``max_payload`` is split into chunks; chunk ``i`` goes to
        ``chunk_topic(i)`` when given, else to ``topic``.

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

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""
        ...

    def deliveries(self) -> AsyncIterator[Delivery | BadDelivery]:
        """Every message received, in arrival order; ends when the transport closes."""
        ...


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


# --------------------------------------------------------------------------- topics


def check_topic(topic: str) -> str:
    """A topic one may publish to: non-empty, no wildcards, no NUL.

    Raises:
        ValueError: the topic cannot be published to.
    """
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"cannot publish to topic {topic!r}")
    if len(topic.encode()) > 65535:
        raise ValueError("topic is longer than 65535 bytes")
    return topic


def check_filter(topic_filter: str) -> str:
    """A valid subscription filter (``+`` and ``#`` whole levels, ``#`` last; ``$share/g/f``).

    Raises:
        ValueError: the filter is malformed.
    """
    inner = topic_filter
    if topic_filter.startswith("$share/"):
        _, group, *rest = topic_filter.split("/", 2)
        if not group or "+" in group or "#" in group or not rest:
            raise ValueError(f"malformed shared subscription {topic_filter!r}")
        inner = rest[0]
    if not inner or "\0" in inner or len(topic_filter.encode()) > 65535:
        raise ValueError(f"malformed topic filter {topic_filter!r}")
    levels = inner.split("/")
    for position, level in enumerate(levels):
        if "#" in level and (level != "#" or position != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` by MQTT rules (``$share/g/`` is ignored).

    Wildcards at the first level never match topics that start with ``$``.
    """
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for position, level in enumerate(filter_levels):
        if level == "#":
            return True
        if position >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[position]):
            return False
    return len(filter_levels) == len(topic_levels)


def _check_qos(qos: int) -> int:
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS must be 0, 1 or 2, not {qos}")
    return qos


# --------------------------------------------------------------------------- shared paths


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
    chunks = chunking.split_payload(memoryview(data), max_payload=max_payload)
    del data
    topics = [check_topic(chunk_topic(c.index)) if chunk_topic else topic for c in chunks]
    return ((t, codec.encode(c)) for t, c in zip(topics, chunks, strict=True))


@dataclass
class _Transfer:
    """What is known about a chunked transfer besides its bytes."""

    last_seen: float
    last_topic: str
    first_topic: str | None = None
    wire_bytes: int = 0


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
        try:
            message = codec.decode(payload, max_size=self._max)
        except CodecError as exc:
            return BadDelivery(topic, exc, size)
        if isinstance(message, Chunk):
            return self._add_chunk(topic, message, size)
        return Delivery(topic, message, size)

    def expire(self) -> list[BadDelivery]:
        """Drop transfers idle for the TTL; each becomes a ``BadDelivery``."""
        now = self._clock()
        expired: list[BadDelivery] = []
        for error in self._reassembler.expire():
            transfer = self._transfers.pop(error.transfer_id, None)
            if transfer is None:
                expired.append(BadDelivery("", error, 0))
            else:
                topic = transfer.first_topic or transfer.last_topic
                expired.append(BadDelivery(topic, error, transfer.wire_bytes))
        # Safety net: bookkeeping idle far longer than the reassembler keeps a transfer.
        for transfer_id, transfer in list(self._transfers.items()):
            if now - transfer.last_seen > 2 * self._ttl:
                del self._transfers[transfer_id]
        while self._completed and now - next(iter(self._completed.values())) > self._ttl:
            self._completed.popitem(last=False)
        return expired

    def _add_chunk(self, topic: str, chunk: Chunk, size: int) -> Delivery | BadDelivery | None:
        if chunk.transfer_id in self._completed:
            log.debug("duplicate chunk %d of completed transfer %s", chunk.index, chunk.transfer_id)
            return None
        now = self._clock()
        transfer = self._transfers.get(chunk.transfer_id)
        if transfer is None:
            transfer = self._transfers[chunk.transfer_id] = _Transfer(now, topic)
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
            return BadDelivery(transfer.first_topic or topic, exc, transfer.wire_bytes)
        if whole is None:
            return None
        self._transfers.pop(chunk.transfer_id, None)
        self._completed[chunk.transfer_id] = now
        if len(self._completed) > 4096:
            self._completed.popitem(last=False)
        delivered_topic = transfer.first_topic or topic
        try:
            message = codec.decode(whole, max_size=self._max)
        except CodecError as exc:
            return BadDelivery(delivered_topic, exc, transfer.wire_bytes)
        if isinstance(message, Chunk):
            error = CodecError(f"transfer {chunk.transfer_id} holds a chunk, not a message")
            return BadDelivery(delivered_topic, error, transfer.wire_bytes)
        return Delivery(delivered_topic, message, transfer.wire_bytes)


class _Closed:
    """Marks the end of the delivery stream."""


_CLOSED: Final = _Closed()


class _DeliveryQueue:
    """Deliveries waiting for the consumer; closing ends every iterator."""

    def __init__(self, stats: TransportStats) -> None:
        self._queue: asyncio.Queue[Delivery | BadDelivery | _Closed] = asyncio.Queue()
        self._stats = stats

    def put(self, item: Delivery | BadDelivery) -> None:
        if isinstance(item, BadDelivery):
            self._stats.bad_deliveries += 1
            log.warning(
                "dropped a bad message on %r (%d bytes): %s", item.topic, item.size, item.error
            )
        else:
            self._stats.deliveries += 1
        self._queue.put_nowait(item)

    def close(self) -> None:
        self._queue.put_nowait(_CLOSED)

    async def iterate(self) -> AsyncIterator[Delivery | BadDelivery]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Closed):
                self._queue.put_nowait(item)  # so every other iterator ends too
                return
            yield item


class Backoff:
    """Jittered exponential backoff: each pause is uniform between ``min_s`` and a cap that doubles.

    Full jitter keeps a fleet that lost its broker at once from reconnecting in lockstep.
    """

    def __init__(self, min_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        self._min = min_s
        self._max = max_s
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The pause before the next attempt."""
        cap = min(self._max, self._min * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return self._rng.uniform(self._min, cap)

    def reset(self) -> None:
        """Start again from the smallest pause (after a successful connection)."""
        self._attempt = 0


@contextlib.contextmanager
def map_transport_errors(action: str = "MQTT operation") -> Iterator[None]:
    """Re-raise the MQTT library's and the network's errors as ``TransportError``."""
    try:
        yield
    except aiomqtt.MqttError as exc:
        raise TransportError(f"{action} failed: {exc}") from exc
    except OSError as exc:  # socket, TLS and websocket errors
        raise TransportError(f"{action} failed: {exc}") from exc


# --------------------------------------------------------------------------- MQTT


class _ConnectionLost(Exception):
    """The connection an operation was using went away; retry on the next one."""


@dataclass(eq=False)
class _Connection:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)


def _reason_value(code: object) -> int:
    value = getattr(code, "value", code)
    return value if isinstance(value, int) else -1


def _close_socket(client: aiomqtt.Client) -> None:
    """Close the socket of a failed connection attempt, which aiomqtt leaves open.

    paho's ``_sock_close`` also tells aiomqtt to stop watching the socket, so closing
    it this way never leaves a dead descriptor registered with the event loop.
    """
    paho_client = client._client
    close = getattr(paho_client, "_sock_close", None)
    if callable(close):
        close()


def _retryable(exc: aiomqtt.MqttError) -> bool:
    """Network failures and a busy broker are retried; a refused identity is not."""
    if isinstance(exc, MqttConnectError):
        return _reason_value(exc.rc) in _RETRYABLE_CONNACK
    return True


class MqttTransport:
    """The :class:`Transport` over a real broker, as an async context manager.

    ``async with MqttTransport(config) as transport:`` connects (retrying with backoff
    until ``connect_timeout_s``; a broker that refuses the credentials fails at once)
    and starts a background task that owns the connection: it receives, reconnects
    after a loss, and re-subscribes. Leaving the block disconnects cleanly.

    It speaks MQTT 3.1.1. ``deliveries()`` is meant for one consumer. Messages are
    decoded on the event loop (checking and decoding a 64 MiB message holds it for
    about 0.1 s), and their tensors share memory with the received bytes: clone them
    before writing in place.
    A frame re-sent after a connection loss may arrive twice; chunks are deduplicated,
    whole messages are not (updates carry idempotent ids).
    """

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.stats = TransportStats()
        self._url = config.broker
        self._username, self._password = resolve_credentials(config)
        self._will_payload: bytes | None = None
        if config.will is not None:
            check_topic(config.will.topic)
            self._will_payload = codec.encode(config.will.message)
            if len(self._will_payload) > config.max_payload:
                raise ConfigError(
                    f"the last will encodes to {len(self._will_payload)} bytes, "
                    f"more than max_payload {config.max_payload}: wills cannot be chunked"
                )
        self._subscriptions: dict[str, int] = {}
        self._subscribe_lock = asyncio.Lock()
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._inbound = Inbound(
            max_message_bytes=config.max_message_bytes, chunk_ttl_s=config.chunk_ttl_s
        )
        self._queue = _DeliveryQueue(self.stats)
        self._tasks: list[asyncio.Task[None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._last_error: BaseException | None = None
        self._rng = random.Random()
        # aiomqtt's own limit on waiting for CONNACK and for the DISCONNECT to go out.
        self._op_timeout_s = min(10.0, config.connect_timeout_s)

    def __repr__(self) -> str:
        return f"<MqttTransport {self.config.client_id} {self._url} connected={self.connected}>"

    # -- lifecycle

    async def __aenter__(self) -> Self:
        if self._supervisor is not None:
            raise RuntimeError("an MqttTransport is entered once")
        name = self.config.client_id
        self._supervisor = asyncio.create_task(self._supervise(), name=f"edgefed-mqtt:{name}")
        self._tasks = [
            self._supervisor,
            asyncio.create_task(self._expire_transfers(), name=f"edgefed-mqtt-expiry:{name}"),
        ]
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await self._wait_connection()
        except TimeoutError as exc:
            await self.aclose()
            raise TransportError(
                f"could not connect to {self._url} within {self.config.connect_timeout_s:g} s"
                f" (last error: {self._last_error or 'none'})"
            ) from self._last_error or exc
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect cleanly (no last will), stop the background tasks, end ``deliveries``."""
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.debug("%s: background task ended with %r", self.config.client_id, result)
        self._queue.close()

    # -- state

    @property
    def connected(self) -> bool:
        """Whether a connection is up and subscriptions are in place."""
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until connected (after a loss, until reconnected and re-subscribed).

        Raises:
            TransportError: not connected within ``timeout_s``, or the transport closed.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self._wait_connection()
        except TimeoutError as exc:
            raise TransportError(f"not connected to {self._url} within {timeout_s} s") from exc

    async def drop_connection(self) -> None:
        """Drop the socket without DISCONNECT, as a crash or a lost link would.

        The broker then publishes the last will, and the transport reconnects as after
        any loss. For fault-injection tests and the simulator's dropout emulation.
        """
        conn = self._conn
        if conn is None:
            return
        # aiomqtt keeps paho's client private; its socket is the only handle on the link.
        sock = conn.client._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await conn.lost.wait()

    # -- Transport

    async def publish(
        self,
        topic: str,
        message: Message,
        *,
        retain: bool = False,
        qos: int = 1,
        chunk_topic: Callable[[int], str] | None = None,
        compression: Compression = "none",
    ) -> int:
        """See :meth:`Transport.publish`; chunks go out ``publish_window`` at a time."""
        _check_qos(qos)
        frames = encode_frames(
            topic,
            message,
            retain=retain,
            chunk_topic=chunk_topic,
            compression=compression,
            max_payload=self.config.max_payload,
            max_message_bytes=self.config.max_message_bytes,
        )
        total = 0
        in_flight: deque[asyncio.Task[None]] = deque()
        try:
            for index, (frame_topic, payload) in enumerate(frames):
                if len(in_flight) >= self.config.publish_window:
                    await in_flight.popleft()
                total += len(payload)
                in_flight.append(
                    asyncio.create_task(
                        self._publish_frame(frame_topic, payload, qos=qos, retain=retain),
                        name=f"edgefed-mqtt-publish:{self.config.client_id}:{index}",
                    )
                )
            while in_flight:
                await in_flight.popleft()
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
        return total

    async def clear_retained(self, topic: str) -> None:
        """See :meth:`Transport.clear_retained`."""
        await self._publish_frame(check_topic(topic), b"", qos=1, retain=True)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """See :meth:`Transport.subscribe`; waits for the broker's SUBACK when connected.

        Raises:
            ValueError: a malformed filter or QoS.
            TransportError: the broker refused the subscription or did not answer in time.
        """
        check_filter(topic_filter)
        _check_qos(qos)
        async with self._subscribe_lock:
            self._subscriptions[topic_filter] = qos
            conn = self._conn
            if conn is None:
                return  # sent by the supervisor as soon as it connects
            try:
                async with asyncio.timeout(self.config.publish_timeout_s):
                    granted = await self._on(
                        conn, conn.client.subscribe(topic_filter, qos, timeout=math.inf)
                    )
            except _ConnectionLost:
                return  # the supervisor re-subscribes on the next connection
            except TimeoutError as exc:
                raise TransportError(f"no SUBACK for {topic_filter!r}") from exc
            except aiomqtt.MqttError as exc:
                if conn.lost.is_set():
                    return
                raise TransportError(f"subscribe to {topic_filter!r} failed: {exc}") from exc
        if any(_reason_value(code) >= _SUBACK_FAILURE for code in granted):
            raise TransportError(f"the broker refused the subscription {topic_filter!r}")

    def deliveries(self) -> AsyncIterator[Delivery | BadDelivery]:
        """See :meth:`Transport.deliveries`."""
        return self._queue.iterate()

    # -- connection supervision

    async def _wait_connection(self) -> _Connection:
        """The live connection; waits for one, fails if the supervisor stopped."""
        while True:
            conn = self._conn
            if conn is not None and not conn.lost.is_set():
                return conn
            supervisor = self._supervisor
            if self._closing or supervisor is None or supervisor.done():
                if supervisor is not None and supervisor.done() and not supervisor.cancelled():
                    error = supervisor.exception()
                    if error is not None:
                        raise error
                raise TransportError(f"{self.config.client_id}: the transport is closed")
            waiter = asyncio.create_task(self._connected.wait())
            try:
                await asyncio.wait({waiter, supervisor}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    async def _supervise(self) -> None:
        """Own the connection: connect, re-subscribe, receive; on loss, back off and repeat."""
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s, rng=self._rng)
        ever_connected = False
        while True:
            client = self._new_client()
            try:
                with map_transport_errors(f"connecting to {self._url}"):
                    await self._connect(client)
            except TransportError as exc:
                self._last_error = exc.__cause__ or exc
                cause = exc.__cause__
                if (
                    not ever_connected
                    and isinstance(cause, aiomqtt.MqttError)
                    and not _retryable(cause)
                ):
                    raise
                delay = backoff.next()
                log.info("%s; retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            ever_connected = True
            conn = _Connection(client)
            try:
                await self._on_connected(conn)
                backoff.reset()
                await self._receive(conn)
            except aiomqtt.MqttError as exc:
                self._last_error = exc
                log.warning("%s: connection to %s lost: %s", self.config.client_id, self._url, exc)
            finally:
                self._conn = None
                self._connected.clear()
                conn.lost.set()
                await self._disconnect(client)
            delay = backoff.next()
            log.info("%s: reconnecting in %.2f s", self.config.client_id, delay)
            await asyncio.sleep(delay)

    def _new_client(self) -> aiomqtt.Client:
        config = self.config
        tls = None
        if self._url.tls or config.ca_file or config.cert_file:
            tls = aiomqtt.TLSParameters(
                ca_certs=config.ca_file, certfile=config.cert_file, keyfile=config.key_file
            )
        will = None
        if config.will is not None:
            will = aiomqtt.Will(
                config.will.topic, self._will_payload, qos=1, retain=config.will.retain
            )
        client = aiomqtt.Client(
            self._url.host,
            self._url.port,
            username=self._username,
            password=self._password,
            identifier=config.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=config.clean_session,
            keepalive=config.keepalive,
            timeout=self._op_timeout_s,
            tls_params=tls,
        )
        # aiomqtt warns past 10 pending calls; a full chunk window plus acks is normal here.
        client.pending_calls_threshold = max(10, 4 * config.publish_window)
        return client

    async def _connect(self, client: aiomqtt.Client) -> None:
        """Connect; if cancelled meanwhile, finish or fail the handshake before leaving.

        aiomqtt connects in a worker thread, which cancellation cannot stop: leaving
        early would leave its socket open behind us.
        """
        attempt = asyncio.create_task(
            client.__aenter__(), name=f"edgefed-mqtt-connect:{self.config.client_id}"
        )
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # Bounded: paho's socket timeout, then aiomqtt's CONNACK wait (_op_timeout_s).
            with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                async with asyncio.timeout(self._op_timeout_s + 6.0):
                    await attempt
            if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                await self._disconnect(client)
            else:
                _close_socket(client)
            raise
        except BaseException:
            _close_socket(client)  # e.g. no CONNACK in time: aiomqtt leaves the socket open
            raise

    async def _on_connected(self, conn: _Connection) -> None:
        """Restore every subscription (one SUBSCRIBE), then open the connection for use."""
        async with self._subscribe_lock:
            wanted = list(self._subscriptions.items())
            if wanted:
                granted = await conn.client.subscribe(wanted, timeout=self.config.publish_timeout_s)
                for (topic_filter, _), code in zip(wanted, granted, strict=False):
                    if _reason_value(code) >= _SUBACK_FAILURE:
                        log.error("the broker refused the subscription %r", topic_filter)
            self._conn = conn
            self.stats.connections += 1
            self._connected.set()
        log.info("%s: connected to %s", self.config.client_id, self._url)

    async def _receive(self, conn: _Connection) -> None:
        """Hand every received message to the inbound path until the connection drops."""
        client = conn.client
        try:
            async for message in client.messages:
                self._handle(message)
        finally:
            # Messages already received (and acknowledged) when the link dropped.
            # aiomqtt's iterator drops them once disconnected; its queue still holds them.
            queue = client._queue
            while not queue.empty():
                self._handle(queue.get_nowait())

    def _handle(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes):
            payload = bytes(payload) if isinstance(payload, bytearray) else b""
        self.stats.received_frames += 1
        self.stats.received_bytes += len(payload)
        try:
            item = self._inbound.feed(topic, payload)
        except Exception as exc:
            # A decoder bug on hostile bytes must not take the connection down with it.
            log.exception("unexpected error decoding a message on %r", topic)
            item = BadDelivery(topic, CodecError(f"decoder failed: {exc!r}"), len(payload))
        if item is not None:
            self._queue.put(item)

    async def _expire_transfers(self) -> None:
        """Surface incomplete chunked transfers as ``BadDelivery`` once their TTL passes."""
        interval = min(5.0, max(0.05, self.config.chunk_ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            for bad in self._inbound.expire():
                self._queue.put(bad)

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        """Send DISCONNECT if the link is still up; never hang or raise on the way out."""
        try:
            async with asyncio.timeout(2.0):
                await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            log.debug("%s: disconnect: %r", self.config.client_id, exc)

    async def _on(self, conn: _Connection, operation: Coroutine[object, object, _T]) -> _T:
        """Run ``operation`` on ``conn``; raise ``_ConnectionLost`` if the link drops first.

        aiomqtt only notices a lost link while waiting for an acknowledgement when its
        own timeout runs out, so every acknowledged operation races the loss.
        """
        task = asyncio.ensure_future(operation)
        lost = asyncio.create_task(conn.lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task
        if task.cancelled():
            raise _ConnectionLost
        return task.result()

    async def _publish_frame(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish one frame, waiting for a connection and re-sending after a loss.

        A frame re-sent after a loss may reach subscribers twice; chunks are
        deduplicated on reassembly and updates carry idempotent ids.
        """
        timeout = self.config.publish_timeout_s
        last_error: BaseException | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    conn = await self._wait_connection()
                    try:
                        await self._on(
                            conn,
                            conn.client.publish(
                                topic, payload, qos=qos, retain=retain, timeout=math.inf
                            ),
                        )
                    except _ConnectionLost as exc:
                        last_error = exc
                        continue
                    except aiomqtt.MqttError as exc:
                        # Usually the link died before the supervisor noticed; wait for that.
                        last_error = exc
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(1.0):
                                await conn.lost.wait()
                        continue
                    self.stats.published_frames += 1
                    self.stats.published_bytes += len(payload)
                    return
        except TimeoutError as exc:
            raise TransportError(
                f"{self.config.client_id}: publish to {topic!r} not acknowledged within "
                f"{timeout:g} s (last error: {last_error!r})"
            ) from last_error or exc


# --------------------------------------------------------------------------- in memory


@dataclass(frozen=True)
class Frame:
    """One payload as it crossed the in-memory broker (for assertions in tests)."""

    topic: str
    payload: bytes
    retain: bool
    sender: str


class MemoryBroker:
    """An in-process broker for unit tests of components written against :class:`Transport`.

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
                if topic_filter.startswith("$share/"):
                    group = topic_filter.split("/", 2)[1]
                    shared.setdefault((group, topic_filter.split("/", 2)[2]), []).append(client)
                else:
                    direct = True
            if direct:
                client._receive(topic, payload)
        for key, members in sorted(shared.items()):
            turn = self._share_turn.get(key, 0)
            self._share_turn[key] = turn + 1
            members[turn % len(members)]._receive(topic, payload)

    def _retained_matching(self, topic_filter: str) -> list[tuple[str, bytes]]:
        if topic_filter.startswith("$share/"):
            return []  # shared subscriptions get no retained messages
        return [(t, p) for t, p in self.retained.items() if topic_matches(topic_filter, t)]


class MemoryTransport:
    """The :class:`Transport` over a :class:`MemoryBroker`, with the same encode/chunk/decode path.

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
        self._inbound = Inbound(
            max_message_bytes=max_message_bytes, chunk_ttl_s=chunk_ttl_s, clock=clock
        )
        self._queue = _DeliveryQueue(self.stats)
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
        self._queue.close()

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
        expired = self._inbound.expire()
        for bad in expired:
            self._queue.put(bad)
        return expired

    async def publish(
        self,
        topic: str,
        message: Message,
        *,
        retain: bool = False,
        qos: int = 1,
        chunk_topic: Callable[[int], str] | None = None,
        compression: Compression = "none",
    ) -> int:
        """See :meth:`Transport.publish`."""
        _check_qos(qos)
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
        for frame_topic, payload in frames:
            self._send(frame_topic, payload, retain=retain)
            total += len(payload)
            await asyncio.sleep(0)  # let receivers run between chunks, as a broker would
        return total

    async def clear_retained(self, topic: str) -> None:
        """See :meth:`Transport.clear_retained`."""
        self._require_connected()
        self._send(check_topic(topic), b"", retain=True)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """See :meth:`Transport.subscribe`; matching retained messages arrive at once."""
        check_filter(topic_filter)
        _check_qos(qos)
        self._require_connected()
        self.subscriptions[topic_filter] = qos
        self._send_retained(topic_filter)

    def deliveries(self) -> AsyncIterator[Delivery | BadDelivery]:
        """See :meth:`Transport.deliveries`."""
        return self._queue.iterate()

    def _send(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.stats.published_frames += 1
        self.stats.published_bytes += len(payload)
        self.broker._route(topic, payload, retain=retain, sender=self.client_id)

    def _send_retained(self, topic_filter: str) -> None:
        for topic, payload in self.broker._retained_matching(topic_filter):
            self._receive(topic, payload)

    def _receive(self, topic: str, payload: bytes) -> None:
        for bad in self._inbound.expire():  # time passed before this frame arrived
            self._queue.put(bad)
        self.stats.received_frames += 1
        self.stats.received_bytes += len(payload)
        item = self._inbound.feed(topic, payload)
        if item is not None:
            self._queue.put(item)

    def _taken_over(self) -> None:
        """Another client connected with our id; like a broker, drop this one."""
        self._connected = False

    def _require_connected(self) -> None:
        if not self._connected:
            raise TransportError(f"{self.client_id}: not connected to the memory broker")


# --------------------------------------------------------------------------- broker choice


async def port_answers(host: str, port: int, *, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def broker_for(url: str | None) -> AsyncIterator[str]:
    """The broker URL to use: ``url`` when given, else a local or an embedded broker.

    Without a URL, ``mqtt://127.0.0.1:1883`` is used when something answers there;
    otherwise an embedded broker is started on a free port for the duration of the
    block (MQTT 3.1.1 only, no shared subscriptions).

    Raises:
        ConfigError: ``url`` is not a broker URL.
    """
    if url is not None:
        BrokerURL.parse(url)
        yield url
        return
    local = BrokerURL.parse(LOCAL_BROKER_URL)
    if await port_answers(local.host, local.port):
        yield LOCAL_BROKER_URL
        return
    from edgefed.broker import embedded_broker  # noqa: PLC0415 (amqtt only when needed)

    log.warning("no broker at %s; starting an embedded one", LOCAL_BROKER_URL)
    async with embedded_broker() as embedded_url:
        yield embedded_url
