"""``edgefed bench hierarchy``: a root and two sites against the same fleet federated flat.

Three Mosquitto processes (the root's and one per site), a root aggregator, one site
aggregator per site (``role = "site"``) and three agents of the tiny model behind each site,
all real MQTT clients in this process. The same agents, seeds and data then federate flat
through one aggregator on the root broker, for the same number of device updates. The
sites merge their three devices' updates into one site update each; the root merges one
update per site into each version; flat, one version merges all six devices' updates, so
both runs take the same steps. Printed: the evaluation losses of both, and the audit logs
checked against the devices' outboxes: every update a device saw acked merged exactly once
at its site, in a site update the root merged exactly once. The brokers run on loopback
(no network namespaces or ``tc netem`` link: they need root here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from aggregator.audit import MergeEntry, UpdateEntry, read_audit
from aggregator.config import AggregatorConfig
from aggregator.connections import aggregator_transport, upstream_transport
from aggregator.service import AggregatorService
from aggregator.site import SiteAggregator
from edge_agent.agent import run_agent
from edge_agent.config import AgentConfig
from edge_agent.outbox import OUTBOX_FILE, Outbox
from edgefed.transport.broker import MosquittoProcess
from edgefed.transport.mqtt import MqttTransport

console = Console(stderr=True)

FEDERATION = "bench-hierarchy"
TRAIN: dict[str, Any] = {"local_steps": 4, "batch_size": 8, "seq_len": 16, "lr": 5e-3}


@dataclass(frozen=True)
class HierarchyConfig:
    """The fleet both runs federate: ``sites`` x ``agents_per_site`` tiny-model devices."""

    sites: int = 2
    agents_per_site: int = 3
    updates_per_agent: int = 8
    seed: int = 0

    @property
    def agents(self) -> int:
        """Devices in all sites together."""
        return self.sites * self.agents_per_site

    @property
    def versions(self) -> int:
        """Root versions: one per update of every device, in both runs."""
        return self.updates_per_agent


@dataclass
class Tally:
    """Device updates acked, merged exactly once through every level, lost, merged twice."""

    acked: int = 0
    merged_once: int = 0
    lost: int = 0
    doubled: int = 0


def _root_config(config: HierarchyConfig, folder: Path, *, sites: list[str]) -> AggregatorConfig:
    buffer = len(sites) if sites else config.agents
    return AggregatorConfig(
        federation=FEDERATION,
        sites=frozenset(sites),
        max_versions=config.versions,
        strategy={"name": "fedbuff", "buffer_size": buffer, "schedule": "constant"},
        train=TRAIN,
        eval_data="synthetic:n=128,seed=999",
        max_staleness=config.versions,
        checkpoint_dir=str(folder / "root"),
        seed=config.seed,
    )


def _site_config(
    config: HierarchyConfig, folder: Path, site: str, root_url: str
) -> AggregatorConfig:
    return AggregatorConfig(
        federation=FEDERATION,
        role="site",
        site_id=site,
        upstream={"url": root_url},
        max_versions=config.versions,
        strategy={"name": "fedbuff", "buffer_size": config.agents_per_site},
        checkpoint_dir=str(folder / site),
    )


def _agent_config(config: HierarchyConfig, folder: Path, index: int) -> AgentConfig:
    return AgentConfig(
        federation=FEDERATION,
        client_id=f"dev{index}",
        data=f"synthetic:n=64,seed={config.seed * 101 + index + 1}",
        seed=config.seed * 7919 + index,
        max_updates=config.updates_per_agent,
        once_per_version=True,
        state_dir=str(folder / f"dev{index}"),
        shared_process=True,
        torch_threads=1,
    )


async def _site(config: AggregatorConfig, url: str) -> None:
    async with (
        MqttTransport(aggregator_transport(config, url=url)) as down,
        MqttTransport(upstream_transport(config)) as up,
    ):
        await SiteAggregator(config, down=down, up=up).run()


async def _federate(
    config: HierarchyConfig, folder: Path, root_url: str, site_urls: list[str]
) -> AggregatorService:
    """One run: sites between devices and root when ``site_urls`` are given, else flat."""
    sites = [f"site{i}" for i in range(len(site_urls))]
    root_config = _root_config(config, folder, sites=sites)
    async with MqttTransport(aggregator_transport(root_config, url=root_url)) as transport:
        service = AggregatorService(root_config, transport)
        parts: list[asyncio.Task[Any]] = [asyncio.create_task(service.run())]
        await service.ready.wait()
        for site, url in zip(sites, site_urls, strict=True):
            site_config = _site_config(config, folder, site, root_url)
            parts.append(asyncio.create_task(_site(site_config, url)))
        for index in range(config.agents):
            url = site_urls[index // config.agents_per_site] if site_urls else root_url
            agent = _agent_config(config, folder, index)
            parts.append(asyncio.create_task(run_agent(agent, url=url)))
        await asyncio.gather(*parts)
    return service


def _tally(config: HierarchyConfig, folder: Path, sites: list[str]) -> Tally:
    """Compare what the devices saw acked with what each level merged, from the audit logs."""
    acked: set[str] = set()
    for index in range(config.agents):
        with Outbox(Path(folder) / f"dev{index}" / OUTBOX_FILE) as outbox:
            acked |= {a.update_id for a in outbox.answers() if a.accepted}
    root_merges = Counter(
        uid for e in read_audit(folder / "root" / "audit.jsonl") if isinstance(e, MergeEntry)
        for uid in e.update_ids
    )  # fmt: skip
    merged: Counter[str] = Counter()
    if not sites:
        merged = root_merges
    for site in sites:
        for entry in read_audit(folder / site / "audit.jsonl"):
            if isinstance(entry, MergeEntry) and entry.sent_as is not None:
                times_at_root = root_merges[entry.sent_as]
                for uid in entry.update_ids:
                    merged[uid] += times_at_root
    return Tally(
        acked=len(acked),
        merged_once=sum(1 for uid in acked if merged[uid] == 1),
        lost=sum(1 for uid in acked if merged[uid] == 0),
        doubled=sum(1 for count in merged.values() if count > 1),
    )


def _losses(service: AggregatorService) -> tuple[float | None, float | None]:
    scored = [r.eval_loss for r in service.results.history if r.eval_loss is not None]
    return (scored[0], scored[-1]) if scored else (None, None)


def _accepted_at_root(folder: Path) -> int:
    entries = read_audit(folder / "root" / "audit.jsonl")
    return sum(1 for e in entries if isinstance(e, UpdateEntry) and e.decision == "accepted")


def hierarchy_run(config: HierarchyConfig) -> dict[str, Any]:
    """Both runs, side by side; the figures ``bench hierarchy --json`` prints."""
    with contextlib.ExitStack() as stack:
        brokers = [stack.enter_context(MosquittoProcess()) for _ in range(config.sites + 1)]
        root, site_brokers = brokers[0], brokers[1:]
        tree = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefed-tree-")))
        flat = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefed-flat-")))
        sites = [f"site{i}" for i in range(config.sites)]
        started = time.monotonic()
        console.print(f"hierarchy: root + {config.sites} sites, {config.agents} agents")
        service = asyncio.run(_federate(config, tree, root.url, [b.url for b in site_brokers]))
        tree_s = time.monotonic() - started
        console.print("flat: the same agents through one aggregator")
        started = time.monotonic()
        flat_service = asyncio.run(_federate(config, flat, root.url, []))
        flat_s = time.monotonic() - started
        tally, flat_tally = _tally(config, tree, sites), _tally(config, flat, [])
        first, last = _losses(service)
        _, flat_last = _losses(flat_service)
        return {
            "sites": config.sites,
            "agents": config.agents,
            "versions": service.version,
            "eval_loss_first": first,
            "eval_loss_last": last,
            **asdict(tally),
            "flat_eval_loss_last": flat_last,
            "flat_versions": flat_service.version,
            "flat_merged_once": flat_tally.merged_once,
            "root_updates": _accepted_at_root(tree),
            "flat_root_updates": _accepted_at_root(flat),
            "seconds": round(tree_s, 1),
            "flat_seconds": round(flat_s, 1),
        }


def run(args: argparse.Namespace) -> int:
    """``edgefed bench hierarchy [--json]``; exit 1 when anything acked is lost or doubled."""
    config = HierarchyConfig()
    result = hierarchy_run(config)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            console.print(f"{key:>22}: {value}")
    ok = result["lost"] == 0 and result["doubled"] == 0 and result["merged_once"] == result["acked"]
    return 0 if ok else 1
