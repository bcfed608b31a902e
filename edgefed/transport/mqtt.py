"""The MQTT transport: the only module that talks to the MQTT client library.

Everything above this module sees whole, decoded messages through the
:class:`Transport` protocol. The protocol is :mod:`edgefed.transport.base`; the encode,
chunk and decode path both implementations share is :mod:`edgefed.transport.frames`;
settings are :mod:`edgefed.transport.config`; the in-memory implementation for unit tests
is :mod:`edgefed.transport.memory`.

:class:`MqttTransport` uses aiomqtt (asyncio): paho's own ``select()`` loop fails
quietly past about 340 clients per process (docs/architecture.md §8b), and the simulator runs
many agents in one process. It keeps its connection in a background task,
reconnects with jittered exponential backoff, re-subscribes after every
reconnect, and makes publishes wait (bounded) while the broker is away. Given several
brokers (a cluster's nodes), it moves on to the next whenever a connection is lost or
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self, TypeVar, cast

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from edgefed.library_internals import close_mqtt_socket, mqtt_socket
from edgefed.transport.config import (
    MIN_MAX_PAYLOAD,
    BrokerURL,
    TransportConfig,
    resolve_credentials,
)
from edgefed.transport.failover import BrokerRotation, subscribe_until_granted
from edgefed.transport.frames import (
    BadDelivery,
    Delivery,
    DeliveryStream,
    Inbound,
    TransportStats,
    announce_size,
    encode_frames,
    send_windowed,
)
from edgefed.transport.packet_limit import LOSSES_TO_REFUSE, PacketRefused, smaller_payload
from edgefed.transport.raw import tls_parameters
from edgefed.transport.topic_match import check_filter, check_qos, check_topic
from schemas import codec
from schemas.codec import Compression
from schemas.errors import ConfigError, TransportError
from schemas.messages import Message

__all__ = ["MqttTransport", "map_transport_errors"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# CONNACK refusals worth retrying: the broker is up but cannot take us now. Every other
# refusal (bad credentials, not authorised, invalid client id) will not fix itself.
_RETRYABLE_CONNACK: Final = frozenset({0x88, 0x89, 0x97, 0x9F})
_SUBACK_FAILURE: Final = 0x80


@contextlib.contextmanager
def map_transport_errors(action: str = "MQTT operation") -> Iterator[None]:
    """Re-raise the MQTT library's and the network's errors as ``TransportError``."""
    try:
        yield
    except (aiomqtt.MqttError, OSError) as exc:  # OSError: socket, TLS and websocket errors
        raise TransportError(f"{action} failed: {exc}") from exc


# --------------------------------------------------------------------------- MQTT


class _ConnectionLost(Exception):
    """The connection an operation was using went away; retry on the next one."""


@dataclass(eq=False)
class _Connection:
    client: aiomqtt.Client
    inbox: asyncio.Queue[aiomqtt.Message]
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Future[object] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def mark_lost(self) -> None:
        """Set ``lost`` and resolve ``gone``, which operations await without a task each."""
        self.lost.set()
        if not self.gone.done():
            self.gone.set_result(None)


def _reason_value(code: object) -> int:
    value = getattr(code, "value", code)
    return value if isinstance(value, int) else -1


def _retryable(exc: BaseException | None) -> bool:
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
        self.max_payload = config.max_payload
        """Largest payload sent; halved when the broker turns out to refuse bigger packets."""
        self._subscriptions: dict[str, int] = {}
        self._subscribe_lock = asyncio.Lock()
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        inbound = Inbound(
            max_message_bytes=config.max_message_bytes, chunk_ttl_s=config.chunk_ttl_s
        )
        self._stream = DeliveryStream(self.stats, inbound)
        self._tasks: list[asyncio.Task[None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._last_error: BaseException | None = None
        self._rng = random.Random()
        self._rotation = BrokerRotation(config.brokers, min_s=config.reconnect_min_s,
                                        max_s=config.reconnect_max_s, rng=self._rng)  # fmt: skip
        # aiomqtt's own limit on waiting for CONNACK and for the DISCONNECT to go out.
        self._op_timeout_s = min(10.0, config.connect_timeout_s)

    @property
    def _url(self) -> BrokerURL:
        """The broker connected to, or dialled next."""
        return self._rotation.current

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
                f"could not connect to {self.config.brokers} within "
                f"{self.config.connect_timeout_s:g} s"
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
        self._stream.close()

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
        sock = mqtt_socket(conn.client)
        if sock is not None:
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
        before_send: Callable[[int], Awaitable[None]] | None = None,
    ) -> int:
        """See :meth:`Transport.publish`; chunks go out ``publish_window`` at a time.

        A broker whose packet limit is below ``max_payload`` closes the connection whenever
        a larger packet arrives (MQTT 3.1.1 has no way to say why). When that happens twice
        to one packet, the message is sent again in chunks of half that size, and so on down
        to the smallest chunk; one warning names the sizes and the setting.
        """
        check_qos(qos)
        while True:
            frames = encode_frames(
                topic,
                message,
                retain=retain,
                chunk_topic=chunk_topic,
                compression=compression,
                max_payload=self.max_payload,
                max_message_bytes=self.config.max_message_bytes,
            )
            try:
                return await send_windowed(
                    await announce_size(frames, before_send),
                    functools.partial(self._publish_frame, qos=qos, retain=retain),
                    window=self.config.publish_window,
                    name=f"edgefed-mqtt-publish:{self.config.client_id}",
                )
            except PacketRefused as refused:
                self.max_payload = smaller_payload(
                    self.config.client_id, self._url, self.max_payload, refused.size
                )

    async def clear_retained(self, topic: str) -> None:
        """See :meth:`Transport.clear_retained`."""
        await self._publish_frame(check_topic(topic), b"", qos=1, retain=True)

    async def publish_text(
        self, topic: str, text: str, *, retain: bool = False, qos: int = 1
    ) -> None:
        """See :meth:`Transport.publish_text`."""
        check_qos(qos)
        await self._publish_frame(check_topic(topic), text.encode(), qos=qos, retain=retain)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """See :meth:`Transport.subscribe`; waits for the broker's SUBACK when connected.

        Raises:
            ValueError: a malformed filter or QoS.
            TransportError: the broker refused the subscription or did not answer in time.
        """
        check_filter(topic_filter)
        check_qos(qos)
        async with self._subscribe_lock:
            self._subscriptions[topic_filter] = qos
            conn = self._conn
            if conn is None:
                return  # sent by the supervisor as soon as it connects
            patience_s = self.config.publish_timeout_s / 2
            try:
                async with asyncio.timeout(self.config.publish_timeout_s):
                    refused = await self._on(
                        conn, self._granted(conn.client, [(topic_filter, qos)], patience_s)
                    )
            except _ConnectionLost:
                return  # the supervisor re-subscribes on the next connection
            except TimeoutError as exc:
                raise TransportError(f"no SUBACK for {topic_filter!r}") from exc
            except aiomqtt.MqttError as exc:
                # Usually the link died before the supervisor noticed; it re-subscribes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await conn.lost.wait()
                if conn.lost.is_set():
                    return
                raise TransportError(f"subscribe to {topic_filter!r} failed: {exc}") from exc
        if refused:
            raise TransportError(
                f"the broker refused the subscription {topic_filter!r} for {patience_s:g} s"
            )

    async def unsubscribe(self, topic_filter: str) -> None:
        """See :meth:`Transport.unsubscribe`; a lost connection takes the subscription along."""
        async with self._subscribe_lock:
            self._subscriptions.pop(topic_filter, None)
            conn = self._conn
            if conn is None:
                return
            with contextlib.suppress(_ConnectionLost, TimeoutError, aiomqtt.MqttError):
                async with asyncio.timeout(self.config.publish_timeout_s):
                    await self._on(conn, conn.client.unsubscribe(topic_filter, timeout=math.inf))

    def deliveries(self) -> AsyncIterator[Delivery | BadDelivery]:
        """See :meth:`Transport.deliveries`."""
        return self._stream.iterate()

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
        ever_connected = False
        while True:
            client, inbox = self._new_client()
            try:
                with map_transport_errors(f"connecting to {self._url}"):
                    await self._connect(client)
            except TransportError as exc:
                self._last_error = exc.__cause__ or exc
                if not ever_connected and not _retryable(exc.__cause__):
                    raise
                delay = self._rotation.after_failure()
                # Before the first connection nothing else says what the process waits for.
                level = logging.INFO if ever_connected else logging.WARNING
                log.log(level, "%s; trying %s in %.2f s", exc, self._url, delay)
                await asyncio.sleep(delay)
                continue
            ever_connected = True
            conn = _Connection(client, inbox)
            connected_at = time.monotonic()
            try:
                await self._on_connected(conn)
                await self._receive(conn)
            except aiomqtt.MqttError as exc:
                self._last_error = exc
                log.warning("%s: connection to %s lost: %s", self.config.client_id, self._url, exc)
            finally:
                self._conn = None
                self._connected.clear()
                conn.mark_lost()
                await self._disconnect(client)
            delay = self._rotation.after_loss(time.monotonic() - connected_at)
            log.info("%s: reconnecting to %s in %.2f s", self.config.client_id, self._url, delay)
            await asyncio.sleep(delay)

    def _new_client(self) -> tuple[aiomqtt.Client, asyncio.Queue[aiomqtt.Message]]:
        """A client for one connection, with the queue aiomqtt receives its messages into."""
        config = self.config
        tls = tls_parameters(config)
        will = None
        if config.will is not None:
            will = aiomqtt.Will(
                config.will.topic, self._will_payload, qos=1, retain=config.will.retain
            )
        made: list[asyncio.Queue[aiomqtt.Message]] = []

        class Inbox(asyncio.Queue[aiomqtt.Message]):
            # aiomqtt builds its incoming queue from this (its public ``queue_type``);
            # keeping it lets _receive hand on what arrived just before a disconnect.
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize)
                made.append(self)

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
            queue_type=Inbox,
        )
        # aiomqtt warns past 10 pending calls; a full chunk window plus acks is normal here.
        client.pending_calls_threshold = max(10, 4 * config.publish_window)
        return client, made[0]

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
                close_mqtt_socket(client)
            raise
        except BaseException:
            close_mqtt_socket(client)  # e.g. no CONNACK in time: aiomqtt leaves the socket open
            raise

    async def _on_connected(self, conn: _Connection) -> None:
        """Restore every subscription (one SUBSCRIBE), then open the connection for use."""
        async with self._subscribe_lock:
            wanted = list(self._subscriptions.items())
            patience_s = self.config.publish_timeout_s
            for refused in await self._granted(conn.client, wanted, patience_s):
                log.error("the broker refused the subscription %r for %g s", refused, patience_s)
            self._conn = conn
            self.stats.connections += 1
            self._connected.set()
        log.info("%s: connected to %s", self.config.client_id, self._url)

    async def _granted(
        self, client: aiomqtt.Client, wanted: list[tuple[str, int]], patience_s: float
    ) -> list[str]:
        """Subscribe to ``wanted``; the filters still refused after ``patience_s``."""

        async def subscribe(filters: list[tuple[str, int]]) -> list[bool]:
            codes = await client.subscribe(filters, timeout=self.config.publish_timeout_s)
            return [_reason_value(code) < _SUBACK_FAILURE for code in codes]

        return await subscribe_until_granted(
            subscribe, wanted, patience_s=patience_s, first_pause_s=self.config.reconnect_min_s,
            who=f"{self.config.client_id} on {self._url}",
        )  # fmt: skip

    async def _receive(self, conn: _Connection) -> None:
        """Hand every received message to the inbound path until the connection drops."""
        client = conn.client
        try:
            async for message in client.messages:
                self._handle(message)
        finally:
            # Messages already received (and acknowledged) when the link dropped.
            # aiomqtt's iterator drops them once disconnected; its queue still holds them.
            while not conn.inbox.empty():
                self._handle(conn.inbox.get_nowait())

    def _handle(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes):
            payload = bytes(payload) if isinstance(payload, bytearray) else b""
        self._stream.receive(topic, payload)

    async def _expire_transfers(self) -> None:
        """Surface incomplete chunked transfers as ``BadDelivery`` once their TTL passes."""
        interval = min(5.0, max(0.05, self.config.chunk_ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            self._stream.expire()

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
        try:
            either = {cast("asyncio.Future[object]", task), conn.gone}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
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
        losses = 0
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
                        last_error, losses = exc, losses + 1
                        if losses >= LOSSES_TO_REFUSE and len(payload) > MIN_MAX_PAYLOAD:
                            raise PacketRefused(len(payload)) from exc
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
