"""Two intake replicas share the devices' updates; one merger owns the version.

``edgefed aggregator`` runs as the merger (``intake = "replicas"``) and twice as an intake
replica (``role = "intake"``) on one Mosquitto: the replicas share ``update/+`` through an
MQTT shared subscription, check their share and send pre-sums of two device updates each;
the merger merges the pre-sums and acks every device itself. Two devices that re-send
quickly (their acks wait for a pre-sum) often reach the other replica with a repeat, which
the merger refuses in any pre-sum once taken. Every update a device saw acked is merged
exactly once, and both replicas took a share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from aggregator.audit import MergeEntry, UpdateEntry
from edgefed.transport.broker import MosquittoProcess
from tests.system.conftest import FEDASYNC_AGGREGATOR, PATIENT_AGENT, Federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MERGER = FEDASYNC_AGGREGATOR | {"intake": "replicas"}
REPLICA: dict[str, object] = {"presum_size": 2, "presum_delay_s": 1.5, "site_resend_s": 5.0}
AGENT = PATIENT_AGENT | {"ack_timeout_s": 1.0}
UPDATES_EACH = 3


async def test_two_intake_replicas_share_the_updates_and_merge_each_once(
    durable_broker: MosquittoProcess, federation_of: Callable[..., Any]
) -> None:
    clients = ["dev0", "dev1"]
    fed: Federation = federation_of(durable_broker, MERGER, AGENT)
    merger = fed.aggregator(max_versions=0).start()
    replicas = [fed.intake(f"intake-{i}", settings=REPLICA).start() for i in (1, 2)]
    for seed, client in enumerate(clients):
        fed.agent(client, max_updates=UPDATES_EACH, seed=seed).start()
    codes = {client: await fed.procs[3 + i].exited(180) for i, client in enumerate(clients)}
    assert codes == dict.fromkeys(clients, 0), fed.logs()
    for proc in (*replicas, merger):
        proc.stop()
    for proc in (*replicas, merger):
        assert await proc.exited(30) == 0, fed.logs()

    entries = fed.audit()
    accepted = [e for e in entries if isinstance(e, UpdateEntry) and e.decision == "accepted"]
    presums = Counter(e.client_id for e in accepted if e.client_id.startswith("intake-"))
    device_ids = [e.update_id for e in accepted if e.client_id in clients]
    assert len(device_ids) == len(set(device_ids)) == UPDATES_EACH * len(clients)
    acked = {a.update_id for c in clients for a in fed.answers(c) if a.accepted}
    assert acked == set(device_ids)
    merged = [uid for e in entries if isinstance(e, MergeEntry) for uid in e.update_ids]
    assert sorted(merged) == sorted(acked), "a device update merged twice or never"
    assert set(presums) == {"intake-1", "intake-2"}, presums  # both took a share
    refused = sum(
        1 for e in entries if isinstance(e, UpdateEntry) and e.reason == "duplicate" and
        e.client_id.startswith("intake-")
    )  # fmt: skip
    print(f"pre-sums merged by replica: {dict(presums)}; refused as holding repeats: {refused}")
