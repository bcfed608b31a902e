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
from edgefed.data import TokenDataset
from edgefed.datasets import Partition, is_text_spec
from edgefed.transport import MqttTransport, TransportConfig
from schemas.messages import DeviceProfile, LoraMode, LoraSpec, Method, ModelRef, TensorMap
from simulator.attacks import Attack
from simulator.workload import ShardPlan, fleet_shards, shard_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetConfig:
    """One simulated federation."""

    model: str = "tiny"
    agents: int = 4
    method: Method = "lora"
    """The task's method."""
    methods: tuple[Method, ...] = ()
    """Per-agent methods, cycled over the fleet (a mixed fleet); empty: every agent uses
    ``method``. The aggregator accepts all of them."""
    models: tuple[str, ...] = ()
    """Per-agent device models, cycled over the fleet (``kd`` only: same vocabulary, any
    size, e.g. ``("tiny", "tiny-4l")``); empty: every agent runs the task's ``model``."""
    budgets_mb: tuple[float | None, ...] = ()
    """Per-agent memory budgets, cycled over the fleet: an agent with one plans its method
    (among the task's and ``methods``) and step shape to fit it (DESIGN §7); its plan is in
    the results. Agents share this process, so peaks are estimated, not measured."""
    trainer: dict[str, dict[str, bool | int | float | str]] = field(default_factory=dict)
    """Trainer options by method name, e.g. ``{"fwdgrad": {"mode": "jvp"}}``."""
    strategy: StrategyName = "fedbuff"
    staleness: StalenessName | None = None
    lora_mode: LoraMode = "standard"
    max_versions: int = 20
    seed: int = 0
    train_samples: int = 1600
    """Synthetic: sequences in all shards together; text: rows of the train split to use
    (0 = all of them)."""
    dataset: str = "synthetic"
    """Training data: ``synthetic``, or a text source (``rotten-tomatoes``, ``sst2``, a file)
    whose train split is partitioned across the agents."""
    partition: Partition = "iid"
    alpha: float = 0.5
    """Dirichlet concentration for ``partition="dirichlet"`` (smaller = more skewed)."""
    eval_samples: int = 500
    """Held-out rows (the test split) the aggregator scores text tasks on."""
    max_seconds: float = 0.0
    """Stop merging after this long (0 = only ``max_versions``); the global merged by then
    is the result."""
    ack_timeout_s: float = 30.0
    """Agents re-send an unanswered update after this long (real models evaluate slowly)."""
    slowdowns: tuple[float, ...] = (1.0, 1.6, 2.5, 4.0)
    """Per-agent slowdown factors, cycled over the fleet."""
    late_joiners: int = 0
    """How many agents (the last ones) join only after version 2 is published."""
    federation: str = field(default_factory=lambda: f"sim-{uuid.uuid4().hex[:8]}")
    aggregator: dict[str, Any] = field(default_factory=dict)
    """Extra AggregatorConfig fields (e.g. max_staleness, train, strategy parameters)."""
    attack: Attack | None = None
    """Poisoned agents and what they do to their updates (robustness experiments)."""


@dataclass(frozen=True)
class FleetResult:
    """The aggregator's results plus every agent's report."""

    results: dict[str, Any]
    agents: list[AgentReport]
    final_adapter: TensorMap = field(default_factory=dict)
    """The global adapter when the fleet stopped (not in the results file)."""
    final_version: int = 0
    snapshots: dict[int, TensorMap] = field(default_factory=dict)
    """Global adapters seen while running, by version (polled: a version may be missing)."""

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
            "accept_methods": tuple(sorted(set(config.methods) - {config.method})),
            "model": ModelRef(name=config.model),
            "lora": lora,
            "strategy": strategy,
            "seed": config.seed,
            "max_versions": config.max_versions,
            "dataset": config.dataset,
        }
        | _text_eval(config)
        | extra
    )


def _text_eval(config: FleetConfig) -> dict[str, str]:
    """Held-out data for a text task: the source's test split, never trained on."""
    if not is_text_spec(config.dataset):
        return {}
    return {"eval_data": f"{config.dataset}:split=test,n={config.eval_samples}"}


def shard_plan(config: FleetConfig, agg_config: AggregatorConfig) -> ShardPlan:
    """How ``config``'s training data is split across its agents."""
    return ShardPlan(
        dataset=config.dataset,
        agents=config.agents,
        seq_len=agg_config.train.seq_len,
        seed=config.seed,
        samples=config.train_samples,
        partition=config.partition,
        alpha=config.alpha,
    )


async def run_fleet(config: FleetConfig, *, url: str, progress: bool = True) -> FleetResult:
    """Run the fleet until the aggregator reaches ``max_versions``."""
    agg_config = aggregator_config(config)
    shards = fleet_shards(shard_plan(config, agg_config), model=config.model)
    transport_config = TransportConfig(url=url, client_id=f"edgefed-{config.federation}-aggregator")
    threads = torch.get_num_threads()
    # Before any worker thread starts: each thread keeps the count it first saw, and a
    # two-thread team on an oversubscribed CPU starves (DESIGN §8b).
    torch.set_num_threads(1)
    try:
        async with MqttTransport(transport_config) as transport:
            service = AggregatorService(agg_config, transport)
            reports = [AgentReport(client_id=_client_id(i)) for i in range(config.agents)]
            snapshots: dict[int, TensorMap] = {}
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
                await _follow(serving, service, config, snapshots, progress=progress)
                for task in [*agents, serving]:
                    task.cancel()
    finally:
        torch.set_num_threads(threads)
    return FleetResult(
        results=service.results.to_dict(),
        agents=reports,
        final_adapter=service.current,
        final_version=service.version,
        snapshots=snapshots,
    )


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
    slowdown = config.slowdowns[index % len(config.slowdowns)]
    method = config.methods[index % len(config.methods)] if config.methods else config.method
    budget = config.budgets_mb[index % len(config.budgets_mb)] if config.budgets_mb else None
    agent_config = AgentConfig(
        federation=config.federation,
        client_id=_client_id(index),
        data=shard_spec(shard_plan(config, aggregator_config(config)), index),
        seed=config.seed * 7919 + index,
        ack_timeout_s=config.ack_timeout_s,
        slowdown=slowdown,
        profile=DeviceProfile(
            name=f"sim-x{slowdown:g}",
            relative_speed=1 / slowdown,
            memory_budget_mb=budget,
        ),
        shared_process=True,
        method=method if budget is None else None,  # with a budget, the planner chooses
        model=ModelRef(name=config.models[index % len(config.models)]) if config.models else None,
        trainer=config.trainer.get(method, {}) if budget is None else {},
    )
    attack = config.attack if config.attack and index in config.attack.clients else None
    return await run_agent(agent_config, url=url, data=shard, report=report, fit_filter=attack)


async def _follow(
    serving: asyncio.Task[Any],
    service: AggregatorService,
    config: FleetConfig,
    snapshots: dict[int, TensorMap],
    *,
    progress: bool,
) -> None:
    """Wait for the aggregator to finish or the time limit, showing a progress bar.

    The bar counts versions, or seconds when only a time limit bounds the run. Globals
    seen on the way are kept in ``snapshots`` so they can be scored afterwards, when
    scoring no longer competes with training for the cores.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + config.max_seconds if config.max_seconds > 0 else None
    by_time = deadline is not None and config.max_versions == 0
    total = config.max_seconds if by_time else config.max_versions

    def position() -> float:
        return round(loop.time() - started) if by_time else service.version

    # disable=None lets tqdm hide the bar when stderr is not a terminal (CI, pipes).
    with tqdm(
        total=total,
        desc="training" if by_time else "global versions",
        unit="s" if by_time else "v",
        disable=None if progress else True,
    ) as bar:
        while not serving.done() and (deadline is None or loop.time() < deadline):
            snapshots.setdefault(service.version, service.current)
            bar.n = min(position(), total)
            bar.set_postfix_str(_postfix(service), refresh=False)
            bar.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await asyncio.shield(serving)
        bar.n = min(position(), total)
        bar.set_postfix_str(_postfix(service), refresh=False)
        bar.refresh()


def _postfix(service: AggregatorService) -> str:
    """Version and the latest evaluated accuracy, for the progress bar."""
    scored = [h for h in service.results.history if h.eval_accuracy is not None]
    accuracy = f" acc {scored[-1].eval_accuracy:.3f}@v{scored[-1].version}" if scored else ""
    return f"v{service.version}{accuracy}"
