"""A private NATS server with its MQTT listener (and the JetStream it needs), on free ports.

NATS keeps MQTT sessions and retained messages in JetStream, so each node gets a store of
its own in a temporary folder; the machine's own NATS server is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgefed.transport.broker import free_port, port_open


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
        log = (root / "server.log").open("wb")
        server = subprocess.Popen(
            [binary, "-c", str(root / "nats.conf")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + start_timeout_s
            while not port_open("127.0.0.1", mqtt_port):
                if server.poll() is not None or time.monotonic() > deadline:
                    text = (root / "server.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"nats-server did not listen on {mqtt_port}:\n{text}")
                time.sleep(0.05)
            yield f"mqtt://127.0.0.1:{mqtt_port}"
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
