"""Devices behind a site broker bridged to the root broker (broker_config/bridge.conf).

``edgefed aggregator`` runs against the root Mosquitto, two ``edgefed agent`` processes
against a site Mosquitto started from broker_config/bridge.conf (its bridge pointed at the
root). The site broker is killed (SIGKILL) mid-run and started again: the run completes, and
every update the devices saw acked is merged exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgefed.transport.broker import CONFIG_DIR, MosquittoProcess
from tests.system.conftest import FEDASYNC_AGGREGATOR, PATIENT_AGENT, Federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# Globals and updates travel in 4 KB chunks through the bridge.
AGGREGATOR = FEDASYNC_AGGREGATOR | {"max_payload": 4096}
AGENT = PATIENT_AGENT | {"max_payload": 4096, "ask_after_s": 2.0}
UPDATES_EACH = 4


def site_config(folder: Path, root: MosquittoProcess) -> Path:
    """broker_config/bridge.conf with its bridge pointed at ``root``."""
    text = (CONFIG_DIR / "bridge.conf").read_text()
    text = text.replace("address root.example.org:1883", f"address {root.host}:{root.port}")
    site_id = f"edgefed-bridge-{uuid.uuid4().hex[:8]}"
    text = text.replace("remote_clientid edgefed-bridge-site-1", f"remote_clientid {site_id}")
    path = folder / "site.conf"
    path.write_text(text)
    return path


async def test_devices_behind_a_bridged_site_broker_federate_through_its_crash(
    durable_broker: MosquittoProcess, federation_of: Callable[..., Any], tmp_path: Path
) -> None:
    root = durable_broker
    with MosquittoProcess(config=site_config(tmp_path, root)) as site:
        fed: Federation = federation_of(root, AGGREGATOR, AGENT)
        clients = ["dev0", "dev1"]
        total = UPDATES_EACH * len(clients)
        fed.aggregator(max_versions=total).start()
        for seed, client in enumerate(clients):
            fed.agent(client, max_updates=UPDATES_EACH, seed=seed, url=site.url).start()
        await fed.until("2 updates accepted", lambda: fed.accepted_in_audit() >= 2, 120)
        site.kill()
        at_kill = fed.accepted_in_audit()
        await asyncio.sleep(1.0)
        site.start()
        codes = {proc.name: await proc.exited(180) for proc in fed.procs}
        assert codes == dict.fromkeys(["aggregator", *clients], 0), fed.logs() + site.log_text
        bridged = "Connecting bridge" in site.log_text
    result = fed.check_exactly_once(clients)
    assert len(result.acked) == len(result.merged) == total
    assert result.versions == tuple(range(1, total + 1))
    assert bridged
    assert at_kill < total
    for proc in fed.procs[1:]:  # the devices lost the site broker and came back to it
        assert f"connection to {site.url} lost" in proc.text(), proc.text()
    print(
        f"bridged site: {at_kill} accepted when the site broker was killed, acked "
        f"{len(result.acked)}, re-acked duplicates {result.duplicates}"
    )
