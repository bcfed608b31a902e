"""A private RabbitMQ node with its MQTT plugin, on free ports, for broker tests.

RabbitMQ 3.x keeps retained messages but hands them only to subscriptions that name the
topic exactly, which is what these tests hold edgefed to. The node is Debian's
``rabbitmq-server`` started from its scripts with its own folders, ports and node name, so
the machine's own RabbitMQ is never touched; it is stopped by the process group it runs in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgefed.transport.broker import free_port
from tests.listening import listening

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def rabbitmq_installed() -> bool:
    """Whether Debian's RabbitMQ server and its MQTT plugin are installed."""
    return SERVER.is_file() and any(Path("/usr/lib/rabbitmq/lib").glob("*/plugins/rabbitmq_mqtt-*"))


@contextlib.contextmanager
def rabbitmq_node(start_timeout_s: float = 60.0) -> Iterator[str]:
    """Run a RabbitMQ node for the block; yields its MQTT URL."""
    mqtt_port, amqp_port, dist_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="edgefed-rabbitmq-") as folder:
        root = Path(folder)
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {amqp_port}\n"
            f"mqtt.listeners.tcp.default = {mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
        )
        (root / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        env = os.environ | {
            "HOME": folder,  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"edgefed-{mqtt_port}@localhost",
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "pid"),
        }
        try:
            with listening(
                [str(SERVER)], mqtt_port, log=root / "server.log", env=env, cwd=root,
                group=True, start_timeout_s=start_timeout_s,
            ):  # fmt: skip
                yield f"mqtt://127.0.0.1:{mqtt_port}"
        finally:
            shutil.rmtree(root / "mnesia", ignore_errors=True)
