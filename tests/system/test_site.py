"""A site aggregator between its devices and the root, killed with its broker mid-run.

``edgefed aggregator`` runs as the root on one Mosquitto and, with ``role = "site"``, as a
site aggregator on a second one; two ``edgefed agent`` processes train behind the site. The
site merges two device updates into each site update. The site aggregator and the site
broker are killed (SIGKILL) together mid-run and started again: the run completes, every
update a device saw acked is merged exactly once at the site, and every site update the
root acked is merged exactly once at the root.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.audit import MergeEntry, UpdateEntry
from edgefed.transport.broker import DURABLE_CONFIG, MosquittoProcess
from tests.system.conftest import FEDASYNC_AGGREGATOR, PATIENT_AGENT, Federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SITE = "site-a"
ROOT = FEDASYNC_AGGREGATOR | {"sites": [SITE]}
SITE_SETTINGS: dict[str, object] = {"strategy": {"name": "fedbuff", "buffer_size": 2}}
AGENT = PATIENT_AGENT | {"ask_after_s": 2.0}
UPDATES_EACH = 3


def accepted(entries: list[UpdateEntry | MergeEntry]) -> list[str]:
    return [
        e.update_id
        for e in entries
        if isinstance(e, UpdateEntry) and e.decision == "accepted" and e.update_id
    ]


def merges(entries: list[UpdateEntry | MergeEntry]) -> list[MergeEntry]:
    return [e for e in entries if isinstance(e, MergeEntry)]


async def test_a_site_aggregator_and_its_broker_killed_mid_run_lose_and_double_nothing(
    durable_broker: MosquittoProcess, federation_of: Callable[..., Any], tmp_path: Path
) -> None:
    clients = ["dev0", "dev1"]
    total = UPDATES_EACH * len(clients)
    root_versions = total // 2  # the site sends one update per two of its devices'
    with MosquittoProcess(config=DURABLE_CONFIG) as site_broker:
        fed: Federation = federation_of(durable_broker, ROOT, AGENT)
        fed.aggregator(max_versions=root_versions).start()
        site = fed.site(
            SITE, url=site_broker.url, max_versions=root_versions, settings=SITE_SETTINGS
        ).start()
        for seed, client in enumerate(clients):
            fed.agent(client, max_updates=UPDATES_EACH, seed=seed, url=site_broker.url).start()
        site_dir = tmp_path / SITE
        await fed.until(
            "3 updates accepted at the site", lambda: len(accepted(fed.audit(site_dir))) >= 3, 120
        )
        site.kill()
        site_broker.kill()
        at_kill = len(accepted(fed.audit(site_dir)))
        await asyncio.sleep(1.0)
        site_broker.start()
        site.start()
        # A quiet spell once the site is back: it must wait for its devices, not stop.
        await fed.until("the site back", lambda: site.text().count("ready at root") == 2, 120)
        devices = [proc for proc in fed.procs if proc.name in clients]
        for proc in devices:
            proc.pause()
        await asyncio.sleep(2.5)
        for proc in devices:
            proc.resume()
        codes = {proc.name: await proc.exited(180) for proc in fed.procs}
        assert codes == dict.fromkeys(["aggregator", SITE, *clients], 0), fed.logs()

    # At the site: what the devices saw acked was accepted once and merged once.
    site_audit = fed.audit(site_dir)
    site_accepted = accepted(site_audit)
    assert len(site_accepted) == len(set(site_accepted)) == total
    acked = {a.update_id for c in clients for a in fed.answers(c) if a.accepted}
    assert acked == set(site_accepted)
    site_merged = [uid for m in merges(site_audit) for uid in m.update_ids]
    assert sorted(site_merged) == sorted(acked), "a device update merged twice or never"
    sent = [m.sent_as for m in merges(site_audit)]
    assert None not in sent and len(set(sent)) == len(sent) == root_versions

    # At the root: every site update it acked was merged once, one version each.
    root_audit = fed.audit()
    assert set(accepted(root_audit)) == set(sent)
    root_merged = [uid for m in merges(root_audit) for uid in m.update_ids]
    assert sorted(root_merged) == sorted(sent)
    assert [m.version for m in merges(root_audit)] == list(range(1, root_versions + 1))
    assert at_kill < total
    assert site.text().count("resumed at root version") == 1, site.text()
    print(
        f"site: {at_kill} device updates accepted when it was killed; {total} acked, merged "
        f"once into {len(sent)} site updates, each merged once at the root"
    )
