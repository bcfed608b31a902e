"""A private NATS server with its MQTT listener (and the JetStream it needs), on free ports.

NATS keeps MQTT sessions and retained messages in JetStream, so each node gets a store of
its own in a temporary folder; the machine's own NATS server is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgefed.transport.broker import free_port
from tests.listening import listening


def nats_binary() -> str | None:
    """The ``nats-server`` executable (Debian's package puts it in /usr/sbin)."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")


@contextlib.contextmanager
def nats_node(start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run a NATS server for the block; yields its MQTT URL."""
    binary = nats_binary()
    if binary is None:
        raise RuntimeError("nats-server is not installed")
    mqtt_port, client_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="edgefed-nats-") as folder:
        root = Path(folder)
        (root / "nats.conf").write_text(
            f'server_name: "edgefed-{mqtt_port}"\n'
            f"listen: 127.0.0.1:{client_port}\n"
            f'jetstream {{ store_dir: "{root / "js"}" }}\n'
            f"mqtt {{ listen: 127.0.0.1:{mqtt_port} }}\n"
        )
        with listening(
            [binary, "-c", str(root / "nats.conf")], mqtt_port, log=root / "server.log",
            start_timeout_s=start_timeout_s,
        ):  # fmt: skip
            yield f"mqtt://127.0.0.1:{mqtt_port}"
