"""Run a whole federation in one process: an aggregator and N agents, each a real MQTT client.

Agents differ in speed (a per-agent slowdown factor) and in how much data they
hold, so updates really arrive stale and out of order. Everything goes through the
broker at ``url``; nothing is short-circuited in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from aggregator.config import AggregatorConfig, StalenessName, StrategyName, StrategySettings
from aggregator.service import AggregatorService
from edge_agent.agent import AgentReport, run_agent
from edge_agent.config import AgentConfig
from edgefed.data import TokenDataset, synthetic_shards
from edgefed.transport import MqttTransport, TransportConfig
from schemas.messages import LoraMode, LoraSpec, Method, ModelRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetConfig:
    """One simulated federation."""

    model: str = "tiny"
    agents: int = 4
    method: Method = "lora"
    strategy: StrategyName = "fedbuff"
    staleness: StalenessName | None = None
    lora_mode: LoraMode = "standard"
    max_versions: int = 20
    seed: int = 0
    train_samples: int = 1600
    slowdowns: tuple[float, ...] = (1.0, 1.6, 2.5, 4.0)
    """Per-agent slowdown factors, cycled over the fleet."""
    late_joiners: int = 0
    """How many agents (the last ones) join only after version 2 is published."""
    federation: str = field(default_factory=lambda: f"sim-{uuid.uuid4().hex[:8]}")
    aggregator: dict[str, Any] = field(default_factory=dict)
    """Extra AggregatorConfig fields (e.g. max_staleness, train, strategy parameters)."""


@dataclass(frozen=True)
class FleetResult:
    """The aggregator's results plus every agent's report."""

    results: dict[str, Any]
    agents: list[AgentReport]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, the layout of the results file."""
        agents = [asdict(report) | {"rejected": dict(report.rejected)} for report in self.agents]
        return self.results | {"agents": agents}


def aggregator_config(config: FleetConfig) -> AggregatorConfig:
    """The aggregator settings a fleet runs with."""
    extra = dict(config.aggregator)
    strategy = StrategySettings.model_validate(
        {"name": config.strategy, "staleness": config.staleness} | extra.pop("strategy", {})
    )
    lora = LoraSpec.model_validate({"mode": config.lora_mode} | extra.pop("lora", {}))
    return AggregatorConfig.model_validate(
        {
            "federation": config.federation,
            "method": config.method,
            "model": ModelRef(name=config.model),
            "lora": lora,
            "strategy": strategy,
            "seed": config.seed,
            "max_versions": config.max_versions,
        }
        | extra
    )


async def run_fleet(config: FleetConfig, *, url: str, progress: bool = True) -> FleetResult:
    """Run the fleet until the aggregator reaches ``max_versions``."""
    agg_config = aggregator_config(config)
    shards = synthetic_shards(
        config.agents,
        total=config.train_samples,
        seq_len=agg_config.train.seq_len,
        seed=config.seed + 1,
    )
    transport_config = TransportConfig(url=url, client_id=f"edgefed-{config.federation}-aggregator")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many trainers share the cores (DESIGN §8b)
    try:
        async with MqttTransport(transport_config) as transport:
            service = AggregatorService(agg_config, transport)
            reports = [AgentReport(client_id=_client_id(i)) for i in range(config.agents)]
            async with asyncio.TaskGroup() as group:
                serving = group.create_task(service.run(), name="aggregator")
                await service.ready.wait()
                agents = [
                    group.create_task(
                        _agent(config, index, service, shards[index], reports[index], url=url),
                        name=f"agent-{index}",
                    )
                    for index in range(config.agents)
                ]
                await _follow(serving, service, config.max_versions, progress=progress)
                for task in agents:
                    task.cancel()
    finally:
        torch.set_num_threads(threads)
    return FleetResult(results=service.results.to_dict(), agents=reports)


def _client_id(index: int) -> str:
    return f"dev{index:03d}"


async def _agent(
    config: FleetConfig,
    index: int,
    service: AggregatorService,
    shard: TokenDataset,
    report: AgentReport,
    *,
    url: str,
) -> AgentReport:
    if index >= config.agents - config.late_joiners:
        await service.wait_for_version(2)
    agent_config = AgentConfig(
        federation=config.federation,
        client_id=_client_id(index),
        data="synthetic",
        seed=config.seed * 7919 + index,
        slowdown=config.slowdowns[index % len(config.slowdowns)],
    )
    return await run_agent(agent_config, url=url, data=shard, report=report)


async def _follow(
    serving: asyncio.Task[Any], service: AggregatorService, target: int, *, progress: bool
) -> None:
    """Wait for the aggregator to finish, showing a progress bar of versions."""
    # disable=None lets tqdm hide the bar when stderr is not a terminal (CI, pipes).
    with tqdm(
        total=target, desc="global versions", unit="v", disable=None if progress else True
    ) as bar:
        while not serving.done():
            bar.n = service.version
            bar.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await asyncio.shield(serving)
        bar.n = service.version
        bar.refresh()
