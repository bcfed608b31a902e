"""The brokers edgefed is tested against, each started privately on free ports.

Mosquitto (Debian's), amqtt (the embedded broker, run as ``edgefed broker --embedded``),
RabbitMQ's MQTT plugin (Debian's) and NATS's MQTT listener (Debian's). A :class:`BrokerPool`
starts each kind the first time a test asks for it and stops them all at the end of the
session, so the matrix costs one start per broker.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from edgefed.transport.broker import MosquittoProcess, free_port, mosquitto_binary
from tests.listening import listening
from tests.nats_broker import nats_binary, nats_node
from tests.rabbitmq_broker import rabbitmq_installed, rabbitmq_node

BrokerKind = Literal["mosquitto", "amqtt", "rabbitmq", "nats"]
BROKERS: tuple[BrokerKind, ...] = ("mosquitto", "amqtt", "rabbitmq", "nats")


def missing(kind: BrokerKind) -> str | None:
    """Why ``kind`` cannot run on this machine, or None when it can."""
    if kind == "mosquitto" and mosquitto_binary() is None:
        return "the mosquitto binary is not installed"
    if kind == "rabbitmq" and not rabbitmq_installed():
        return "Debian's rabbitmq-server (with its MQTT plugin) is not installed"
    if kind == "nats" and nats_binary() is None:
        return "nats-server is not installed"
    return None


@contextlib.contextmanager
def embedded_node(start_timeout_s: float = 30.0) -> Iterator[str]:
    """``edgefed broker --embedded`` in a process of its own; yields its URL."""
    port, ws_port = free_port(), free_port()
    command = [sys.executable, "-m", "edgefed.cli", "broker", "--embedded", "--port", str(port),
               "--ws-port", str(ws_port)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgefed-amqtt-") as folder:
        log = Path(folder) / "broker.log"
        with listening(command, port, log=log, start_timeout_s=start_timeout_s):
            yield f"mqtt://127.0.0.1:{port}"


@contextlib.contextmanager
def _node(kind: BrokerKind) -> Iterator[str]:
    if kind == "mosquitto":
        with MosquittoProcess() as broker:
            yield broker.url
    elif kind == "amqtt":
        with embedded_node() as url:
            yield url
    elif kind == "rabbitmq":
        with rabbitmq_node() as url:
            yield url
    else:
        with nats_node() as url:
            yield url


class BrokerPool:
    """Brokers started on first use, all stopped by :meth:`close`."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._urls: dict[BrokerKind, str] = {}

    def url(self, kind: BrokerKind) -> str:
        """The URL of a running ``kind`` broker (started now if it is not yet)."""
        if kind not in self._urls:
            self._urls[kind] = self._stack.enter_context(_node(kind))
        return self._urls[kind]

    def close(self) -> None:
        """Stop every broker started."""
        self._stack.close()
