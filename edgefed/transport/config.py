"""How a client reaches the MQTT broker: the broker URL, the connection settings, the will.

Pure configuration: everything here is checked when it is built, so a bad setting fails
at start-up with a :class:`~schemas.errors.ConfigError` rather than at the first
connection attempt. Nothing here opens a socket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias
from urllib.parse import unquote, urlsplit

from schemas.codec import DEFAULT_MAX_MESSAGE_BYTES
from schemas.errors import ConfigError
from schemas.messages import Message

Scheme = Literal["mqtt", "mqtts"]
DEFAULT_PORTS: Final[Mapping[str, int]] = {"mqtt": 1883, "mqtts": 8883}
MQTT_MAX_PACKET: Final = 268_435_455
"""The MQTT remaining-length limit; clients refuse larger payloads outright."""
MIN_MAX_PAYLOAD: Final = 4096
"""Below this, chunk headers would dominate every packet."""
USERNAME_ENV: Final = "EDGEFED_MQTT_USERNAME"
PASSWORD_ENV: Final = "EDGEFED_MQTT_PASSWORD"  # noqa: S105 (the variable's name, not a secret)


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

    @classmethod
    def of(cls, url: str | BrokerURL) -> BrokerURL:
        """``url`` as a :class:`BrokerURL`: parsed when it is text, as it is otherwise."""
        return url if isinstance(url, BrokerURL) else cls.parse(url)

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted."""
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class BrokerList:
    """The brokers a client may use, in the order it tries them: one, or a cluster's nodes.

    Written as URLs separated by commas (``mqtt://a:1883,mqtt://b:1883``) or given as a
    sequence. A client connects to the first that answers and, when that connection is lost
    or refused, moves on to the next; a clustered broker (NATS, EMQX, HiveMQ, VerneMQ) keeps
    its persistent sessions and retained messages on every node, so nothing waits for the
    lost node to return.
    """

    urls: tuple[BrokerURL, ...]

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError("no broker URL given")
        if len(set(self.urls)) != len(self.urls):
            raise ConfigError(f"broker list {self} names a broker twice")

    @classmethod
    def parse(cls, text: str) -> BrokerList:
        """Parse URLs separated by commas; each as :meth:`BrokerURL.parse` says.

        Raises:
            ConfigError: one of them is not an MQTT broker address.
        """
        return cls(tuple(BrokerURL.parse(part) for part in text.split(",") if part.strip()))

    @classmethod
    def of(cls, value: BrokerAddress | Sequence[str | BrokerURL]) -> BrokerList:
        """``value`` as a :class:`BrokerList`: parsed when it is text, as it is otherwise."""
        if isinstance(value, BrokerList):
            return value
        if isinstance(value, BrokerURL):
            return cls((value,))
        if isinstance(value, str):
            return cls.parse(value)
        return cls(tuple(BrokerURL.of(url) for url in value))

    @property
    def first(self) -> BrokerURL:
        """The broker tried first."""
        return self.urls[0]

    def __str__(self) -> str:
        return ",".join(str(url) for url in self.urls)


BrokerAddress: TypeAlias = "str | BrokerURL | BrokerList"
"""Where a client connects: one URL, or several separated by commas, as text or parsed."""


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
        url: broker URL, or several to fail over between (see :class:`BrokerList`), parsed
            once into ``brokers``.
        client_id: MQTT client identifier; unique per broker.
        max_payload: encoded messages above this are split into chunks.
        max_message_bytes: largest whole message sent or accepted, checked before decoding.
        keepalive: seconds between pings; a dead link is noticed after about 1.5x this.
        clean_session: ``False`` keeps subscriptions and queued QoS 1 messages while the
            client is away, which the aggregator needs for update subscriptions
            (docs/architecture.md §8b). The broker keys the session by ``client_id``, so that must
            stay the same.
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

    url: BrokerAddress
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
    brokers: BrokerList = field(init=False, repr=False)
    """The parsed broker URLs, in the order they are tried."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "brokers", BrokerList.of(self.url))
        if len({url.scheme for url in self.brokers.urls}) > 1:
            raise ConfigError(f"brokers {self.brokers} mix mqtt:// and mqtts://")
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
        """The broker tried first; its user name and password stand for every node's."""
        return self.brokers.first


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
