"""A federation through a three-node NATS cluster outlives losing the nodes it is on.

``edgefed aggregator`` and two ``edgefed agent`` processes are each given every node's MQTT
URL (``--broker a,b,c``), each list starting on a different node. One node is killed with
SIGKILL mid-run (the aggregator's and a device's), started again, then a second one (the
other device's): a quorum of two stays up throughout. The run must complete, each client
having moved to another node, with every update an agent saw acked merged exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.nats_broker import NatsCluster, NatsNode, nats_binary, nats_cluster
from tests.system.conftest import (
    FEDASYNC_AGGREGATOR,
    PATIENT_AGENT,
    REQUIRE_MOSQUITTO,
    Federation,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

UPDATES_EACH = 10


def _order(cluster: NatsCluster, *first: NatsNode) -> str:
    """Every node's URL, ``first`` ones first: where a client starts, then where it goes."""
    rest = [node for node in cluster.nodes if node not in first]
    return ",".join(node.url for node in [*first, *rest])


async def test_a_run_outlives_two_of_three_nats_nodes_killed_in_turn(
    federation_of: Callable[..., Any], tmp_path: Path
) -> None:
    if nats_binary() is None:
        if os.environ.get(REQUIRE_MOSQUITTO) == "1":
            pytest.fail(f"nats-server is not installed, and {REQUIRE_MOSQUITTO}=1")
        pytest.skip("nats-server is not installed")
    async with nats_cluster(tmp_path) as cluster:
        n1, n2, _ = cluster.nodes
        fed: Federation = federation_of(cluster, FEDASYNC_AGGREGATOR, PATIENT_AGENT)
        clients = ["dev0", "dev1"]
        total = UPDATES_EACH * len(clients)
        fed.aggregator(max_versions=total, url=_order(cluster, n1)).start()
        fed.agent("dev0", max_updates=UPDATES_EACH, seed=0, url=_order(cluster, n1)).start()
        fed.agent("dev1", max_updates=UPDATES_EACH, seed=1, url=_order(cluster, n2)).start()

        async def progress(what: str, more: int) -> int:
            start = fed.accepted_in_audit()
            await fed.until(
                f"{what} (+{more} accepted)",
                lambda: fed.accepted_in_audit() >= start + more,
                timeout_s=120,
            )
            return fed.accepted_in_audit()

        await progress("the first updates", 2)
        n1.kill()  # the aggregator's node and dev0's
        at_first_kill = await progress("updates through n2 and n3", 2)
        # Devices hold still while n1 catches up, as in a rolling restart; a node killed
        # before the one restarted is current would leave the streams without a quorum.
        agents = [proc for proc in fed.procs if proc.name in clients]
        for agent in agents:
            agent.pause()
        assert fed.accepted_in_audit() < total - 2, "the run is nearly over before n2's kill"
        await cluster.restart(n1)
        for agent in agents:
            agent.resume()
        n2.kill()  # dev1's node
        await progress("updates with n2 down", 2)
        await cluster.restart(n2)
        codes = {proc.name: await proc.exited(180) for proc in fed.procs}
        assert codes == dict.fromkeys(["aggregator", *clients], 0), fed.logs() + cluster.logs()
    result = fed.check_exactly_once(clients)
    assert len(result.acked) == len(result.merged) == total
    assert result.versions == tuple(range(1, total + 1))
    for name, node in [("aggregator", n1), ("dev0", n1), ("dev1", n2)]:
        log = next(proc for proc in fed.procs if proc.name == name).text()
        # Its node was killed under it, and it connected again (to whichever node answered).
        assert f"connection to {node.url} lost" in log, f"{name}:\n{log[-4000:]}"
        assert log.count(": connected to mqtt://") >= 2, f"{name}:\n{log[-4000:]}"
    print(
        f"NATS cluster: {at_first_kill} accepted by the first kill's recovery, acked "
        f"{len(result.acked)}, merged {len(result.merged)}, re-acked duplicates "
        f"{result.duplicates}"
    )
