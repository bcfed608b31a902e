"""Private NATS servers with their MQTT listeners (and the JetStream they need), on free ports:
one node, or a three-node cluster started from broker_config/nats-cluster.conf.

NATS keeps MQTT sessions and retained messages in JetStream, so each node gets a store of
its own in a temporary folder; the machine's own NATS server is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from edgefed.transport.broker import free_port
from edgefed.transport.raw import raw_client
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


SETTLE_S = 5.0
"""How long every node must pass its health check before a restart counts as done."""
CLUSTER_CONFIG = Path(__file__).resolve().parents[1] / "broker_config" / "nats-cluster.conf"


@dataclass
class NatsNode:
    """One node of a :class:`NatsCluster`; killed and started again by its own PID."""

    name: str
    env: dict[str, str]
    mqtt_port: int
    monitor_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self, binary: str) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [binary, "-c", str(CLUSTER_CONFIG)], env=os.environ | self.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL, as a crashed machine: no goodbye to clients or to the other nodes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@dataclass
class NatsCluster:
    """Three NATS nodes routed to each other (broker_config/nats-cluster.conf), MQTT on each."""

    nodes: list[NatsNode] = field(default_factory=list)
    binary: str = ""

    @property
    def url(self) -> str:
        """Every node's MQTT URL, separated by commas, as a client is given them."""
        return ",".join(node.url for node in self.nodes)

    async def restart(self, node: NatsNode, timeout_s: float = 120.0) -> None:
        """Start a killed node again; wait until it has been healthy for ``SETTLE_S``.

        Only then does the restarted node count toward a quorum: in a rolling restart the
        next node is taken down once the one before it has caught up.
        """
        node.start(self.binary)
        await _until_ready(node, timeout_s)
        deadline = time.monotonic() + timeout_s
        healthy_since = time.monotonic()
        while time.monotonic() - healthy_since < SETTLE_S:
            if not await asyncio.to_thread(_healthy, node):
                healthy_since = time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} did not stay healthy within {timeout_s} s")
            await asyncio.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(
            f"--- {node.name}\n{node.log.read_text(errors='replace')[-3000:]}"
            for node in self.nodes
        )


async def _until_ready(node: NatsNode, timeout_s: float) -> None:
    """Wait until ``node``'s JetStream copies are current and an MQTT client gets a CONNACK.

    A node's port opens before JetStream has leaders and current copies of the MQTT
    streams; until then it refuses MQTT clients, and does not count toward a quorum.
    """
    deadline = time.monotonic() + timeout_s
    while not (await asyncio.to_thread(_healthy, node) and await _connects(node)):
        if time.monotonic() > deadline or (node.proc is not None and node.proc.poll() is not None):
            raise RuntimeError(f"{node.name} was not ready within {timeout_s} s")
        await asyncio.sleep(0.5)


def _healthy(node: NatsNode) -> bool:
    url = f"http://127.0.0.1:{node.monitor_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:  # refused, or an HTTP error status: not ready yet
        return False


async def _connects(node: NatsNode) -> bool:
    try:
        async with raw_client(node.url, f"probe-{node.name}"):
            return True
    except (aiomqtt.MqttError, OSError):
        return False


@contextlib.asynccontextmanager
async def nats_cluster(
    root: Path, size: int = 3, start_timeout_s: float = 90.0
) -> AsyncIterator[NatsCluster]:
    """Run a NATS cluster of ``size`` nodes on free ports for the block; files under ``root``."""
    binary = nats_binary()
    if binary is None:
        raise RuntimeError("nats-server is not installed")
    routes = [free_port() for _ in range(size)]
    cluster = NatsCluster(binary=binary)
    shared = {
        f"EDGEFED_ROUTE_{i + 1}": f"nats-route://127.0.0.1:{port}" for i, port in enumerate(routes)
    }
    for i, route in enumerate(routes):
        name, mqtt_port, monitor_port = f"n{i + 1}", free_port(), free_port()
        env = shared | {
            "EDGEFED_NODE_NAME": name, "EDGEFED_NODE_CLIENT": f"127.0.0.1:{free_port()}",
            "EDGEFED_NODE_MONITOR": f"127.0.0.1:{monitor_port}",
            "EDGEFED_NODE_MQTT": f"127.0.0.1:{mqtt_port}",
            "EDGEFED_NODE_ROUTE": f"127.0.0.1:{route}", "EDGEFED_NODE_STORE": str(root / name),
        }  # fmt: skip
        log = root / f"{name}.log"
        cluster.nodes.append(NatsNode(name, env, mqtt_port, monitor_port, log))
    try:
        for node in cluster.nodes:
            node.start(binary)
        for node in cluster.nodes:
            await _until_ready(node, start_timeout_s)
        yield cluster
    finally:
        for node in cluster.nodes:
            node.kill()
