"""Development MQTT brokers: Mosquitto from ``broker_config/dev.conf``, or an embedded one.

``edgefed broker`` runs Mosquitto with the development config (docs/architecture.md §8b limits
raised) on the requested address, or, when the binary is missing or ``--embedded`` is given, an
embedded amqtt broker: MQTT 3.1.1 only, no shared subscriptions, no persistence. It is
enough for demos and tests on a machine without Mosquitto, not for a fleet.

:class:`MosquittoProcess` starts and stops a private Mosquitto on a free port (tests use
it to kill and restart a broker); :func:`embedded_broker` does the same with amqtt inside
the running event loop. amqtt is imported only when an embedded broker is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from schemas.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_DIR: Final = Path(__file__).resolve().parents[2] / "broker_config"
DEV_CONFIG: Final = CONFIG_DIR / "dev.conf"
DURABLE_CONFIG: Final = CONFIG_DIR / "durable.conf"
"""Like dev.conf, with persistence on: retained messages and sessions survive a restart."""
FALLBACK_MOSQUITTO: Final = "/usr/sbin/mosquitto"
EMBEDDED_LIMITS: Final = "MQTT 3.1.1 only, no shared subscriptions, nothing persisted"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, *, timeout_s: float = 0.25) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    """Path of the ``mosquitto`` executable, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return FALLBACK_MOSQUITTO if os.access(FALLBACK_MOSQUITTO, os.X_OK) else None


def _url(host: str, port: int) -> str:
    return f"mqtt://[{host}]:{port}" if ":" in host else f"mqtt://{host}:{port}"


def derive_config(
    base: str | os.PathLike[str], *, host: str, port: int, websockets_port: int | None = None
) -> str:
    """The text of ``base`` with its (first) listener moved to ``host:port``.

    Its WebSocket listener (a ``listener`` line followed by ``protocol websockets``) moves
    to ``host:websockets_port``, or is left out when that is None. Mosquitto has no option
    to override a listener from the command line, so tools that need other ports write this
    derived copy instead of editing the original. Deprecated global ``port``/``bind_address``
    lines are dropped.

    Raises:
        ConfigError: ``base`` cannot be read.
    """
    try:
        lines = Path(base).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read broker config {base}: {exc}") from exc
    out: list[str] = []
    replaced = False
    for index, line in enumerate(lines):
        words = line.split()
        keyword = words[0] if words else ""
        following = lines[index + 1].split() if index + 1 < len(lines) else []
        if keyword in ("port", "bind_address"):
            continue
        if keyword == "listener" and following == ["protocol", "websockets"]:
            if websockets_port is not None:
                out.append(f"listener {websockets_port} {host}")
            continue
        if words == ["protocol", "websockets"]:
            if websockets_port is not None:
                out.append(line)
            continue
        if keyword == "listener" and not replaced:
            out.append(f"listener {port} {host}")
            replaced = True
            continue
        out.append(line)
    if not replaced:
        out.append(f"listener {port} {host}")
    return "\n".join(out) + "\n"


def with_persistence_dir(text: str, folder: Path) -> str:
    """``text`` with its ``persistence_location`` moved to ``folder`` when it persists at all.

    Mosquitto started as root drops to the ``mosquitto`` user before it saves, so the
    folder is handed to that user then (and its parent made traversable).
    """
    lines = text.splitlines()
    persists = any(line.split()[:2] == ["persistence", "true"] for line in lines)
    if not persists:
        return text
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            import pwd  # noqa: PLC0415 (POSIX only, and only needed as root)

            user = pwd.getpwnam("mosquitto")
        except (ImportError, KeyError):
            pass  # no such user: mosquitto then keeps running as root
        else:
            os.chown(folder, user.pw_uid, user.pw_gid)
            folder.parent.chmod(0o711)
    kept = [line for line in lines if line.split()[:1] != ["persistence_location"]]
    return "\n".join([*kept, f"persistence_location {folder}/"]) + "\n"


class MosquittoProcess:
    """A private Mosquitto on a free port, started from a config file (default ``dev.conf``).

    ``with MosquittoProcess() as broker:`` starts it and waits until it accepts
    connections; ``broker.url`` is where it listens. :meth:`kill` ends it abruptly as a
    crash would and :meth:`start` brings it back on the same port. Its log, and its
    persistence database when the config persists (``DURABLE_CONFIG``), are kept in a
    temporary folder that lives until :meth:`close`, so a restarted broker finds them.
    """

    def __init__(
        self,
        *,
        config: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        websockets: bool = False,
    ) -> None:
        self.config = Path(config) if config is not None else DEV_CONFIG
        self.host = host
        self.port = port or free_port(host)
        self.websockets_port = free_port(host) if websockets else None
        """The config's WebSocket listener on a free port (``websockets``); else left out."""
        self.binary = binary or mosquitto_binary()
        self.start_timeout_s = start_timeout_s
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of this broker."""
        return _url(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """Process id of the running broker (for RSS readings), None when stopped."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_text(self) -> str:
        """What Mosquitto logged so far."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Self:
        """Start the broker and wait until its port answers.

        Raises:
            ConfigError: Mosquitto is not installed, or it exited or never listened.
        """
        if self.running:
            return self
        if self.binary is None:
            raise ConfigError("mosquitto is not installed (try: edgefed broker --embedded)")
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="edgefed-mosquitto-")
        folder = Path(self._dir.name)
        conf = folder / "mosquitto.conf"
        text = derive_config(
            self.config, host=self.host, port=self.port, websockets_port=self.websockets_port
        )
        conf.write_text(with_persistence_dir(text, folder / "data"))
        conf.chmod(0o644)  # readable after mosquitto drops root privileges
        with (folder / "mosquitto.log").open("ab") as log_file:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not port_open(self.host, self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._reap()
                raise ConfigError(
                    f"mosquitto did not start on {self.url}:\n{self.log_text.strip()}"
                )
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the broker to exit (SIGTERM); kill it when it does not in time."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def kill(self) -> None:
        """End the broker abruptly (SIGKILL), as a crash would; clients see the link drop."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._reap()

    def close(self) -> None:
        """Stop the broker and remove its temporary folder."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _amqtt_config(host: str, port: int, ws_port: int | None) -> dict[str, object]:
    listeners: dict[str, object] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if ws_port is not None:
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{ws_port}"}
    return {
        "listeners": listeners,
        # Anonymous access only: no $SYS publisher, no packet logging.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


@contextlib.asynccontextmanager
async def embedded_broker(
    host: str = "127.0.0.1", port: int = 0, *, ws_port: int | None = None
) -> AsyncIterator[str]:
    """Run an amqtt broker in this event loop for the block; yields its ``mqtt://`` URL.

    With ``ws_port`` it also speaks MQTT over WebSockets there (``edgefed dashboard``).

    With ``port=0`` a free port is chosen (retrying if another process takes it first).
    MQTT 3.1.1 only, no shared subscriptions, nothing persisted.

    Raises:
        ConfigError: the broker could not listen on ``host:port``.
    """
    from amqtt.broker import Broker  # noqa: PLC0415 (heavy; only when an embedded broker runs)
    from amqtt.errors import BrokerError  # noqa: PLC0415

    class ClosingBroker(Broker):  # type: ignore[misc]
        """amqtt 0.12 leaks the socket of a client that hung up first; close it here."""

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                writer.close()

    attempts = 3 if port == 0 else 1
    for attempt in range(attempts):
        chosen = port or free_port(host)
        broker = ClosingBroker(_amqtt_config(host, chosen, ws_port))
        try:
            await broker.start()
        except BrokerError as exc:
            if attempt + 1 < attempts:
                continue
            raise ConfigError(f"embedded broker cannot listen on {host}:{chosen}: {exc}") from exc
        break
    try:
        log.info("embedded broker on %s (%s)", _url(host, chosen), EMBEDDED_LIMITS)
        yield _url(host, chosen)
    finally:
        await _let_clients_leave(broker)
        await broker.shutdown()


async def _let_clients_leave(broker: object, timeout_s: float = 1.0) -> None:
    """Give DISCONNECTs already sent a moment to be processed before shutting down.

    amqtt's shutdown cancels sessions that are still closing; letting them finish
    first keeps a client that left just before the block ended from being cut off.
    """
    sessions = getattr(broker, "sessions", {})
    step = 0.01
    for _ in range(int(timeout_s / step)):
        if not any(session.transitions.is_connected() for session, _ in sessions.values()):
            return
        await asyncio.sleep(step)


async def _serve_embedded(host: str, port: int, ws_port: int) -> None:
    async with embedded_broker(host, port, ws_port=ws_port) as url:
        log.warning(
            "embedded amqtt broker on %s, WebSockets on ws://%s:%d: %s",
            url, host, ws_port, EMBEDDED_LIMITS,
        )  # fmt: skip
        await asyncio.Event().wait()


def run(args: argparse.Namespace) -> int:
    """``edgefed broker``: run a development broker in the foreground until Ctrl-C."""
    host: str = args.host
    port: int = args.port
    if port_open(host, port):
        log.error("something already listens on %s:%d; choose --port", host, port)
        return 1
    binary = None if args.embedded else mosquitto_binary()
    if binary is None:
        try:
            asyncio.run(_serve_embedded(host, port, args.ws_port))
        except KeyboardInterrupt:
            return 0
        except ConfigError as exc:
            log.error("%s", exc)  # noqa: TRY400 (the message says it all)
            return 1
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefed-broker-") as folder:
        conf = Path(folder) / "mosquitto.conf"
        try:
            conf.write_text(
                derive_config(DEV_CONFIG, host=host, port=port, websockets_port=args.ws_port)
            )
        except ConfigError as exc:
            log.error("%s", exc)  # noqa: TRY400
            return 1
        conf.chmod(0o644)
        log.warning(
            "mosquitto on %s, WebSockets on ws://%s:%d (config derived from %s)",
            _url(host, port), host, args.ws_port, DEV_CONFIG,
        )  # fmt: skip
        proc = subprocess.Popen([binary, "-c", str(conf)])
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()  # a terminal's Ctrl-C reached it already; a lone SIGINT did not
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return 0
