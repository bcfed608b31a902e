"""Run a whole federation in one process: an aggregator and N agents, each a real MQTT client.

Agents differ in speed (a per-agent slowdown factor, or a whole device profile with
links and availability) and in how much data they hold, so updates really arrive stale
and out of order. Everything goes through the broker at ``url``; nothing is
short-circuited in memory. ``mode="sync"`` runs the same fleet as classic synchronous
FedAvg rounds on the same aggregator (``aggregator.rounds``): the devices selected for a
round train once on its version and the aggregator merges when all of them have answered
or the round's deadline has passed. Split devices reach a split server that runs beside
the aggregator on its own connection, as ``edgefed aggregator`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm import tqdm

from aggregator.config import AggregatorConfig, StalenessName, StrategyName, StrategySettings
from aggregator.connections import aggregator_transport, split_transport
from aggregator.results import VersionRecord
from aggregator.rounds import service_for
from aggregator.service import AggregatorService
from aggregator.split_service import SplitService
from edge_agent.agent import AgentReport, run_agent
from edge_agent.config import AgentConfig
from edgefed.data.sources import Partition, is_text_spec
from edgefed.ml.tokens import TokenDataset
from edgefed.transport.config import BrokerAddress, TransportConfig
from edgefed.transport.mqtt import MqttTransport
from schemas.errors import ConfigError
from schemas.messages import DeviceProfile, LoraMode, LoraSpec, Method, ModelRef, TensorMap
from simulator.attacks import Attack
from simulator.network import EmulatedDevice
from simulator.profiles import DeviceSpec
from simulator.workload import ShardPlan, fleet_shards, shard_spec

log = logging.getLogger(__name__)

Mode = Literal["async", "sync"]
"""``async``: the configured strategy merges updates as they come; ``sync``: FedAvg rounds."""


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
    (among the task's and ``methods``) and step shape to fit it (docs/architecture.md §7); its plan
    is in
    the results. Agents share this process, so peaks are estimated, not measured."""
    trainer: dict[str, dict[str, bool | int | float | str]] = field(default_factory=dict)
    """Trainer options by method name, e.g. ``{"fwdgrad": {"mode": "jvp"}}``."""
    device_trainer: tuple[dict[str, dict[str, bool | int | float | str]], ...] = ()
    """Per-agent trainer options by method name, cycled, laid over ``trainer`` (e.g. each
    split device's ``{"split": {"cut": 2, "variant": "u_shaped"}}``); agents that plan (a
    budget) pick their own shape."""
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
    max_payload: int = 256 * 1024
    """Largest MQTT payload the aggregator and every agent publish (larger ones: chunks)."""
    late_joiners: int = 0
    """How many agents (the last ones) join only after version 2 is published."""
    federation: str = field(default_factory=lambda: f"sim-{uuid.uuid4().hex[:8]}")
    aggregator: dict[str, Any] = field(default_factory=dict)
    """Extra AggregatorConfig fields (e.g. max_staleness, train, strategy parameters)."""
    attack: Attack | None = None
    """Poisoned agents and what they do to their updates (robustness experiments)."""
    mode: Mode = "async"
    """``sync`` overrides the strategy with FedAvg rounds (FedBuff with a buffer of one
    round's devices, constant staleness weight, server step 1, max staleness 0) and makes
    each agent wait for the next round it is selected for after an accepted update."""
    devices: tuple[DeviceSpec, ...] = ()
    """Per-agent device profiles, cycled (overrides ``slowdowns``): compute speed, links and
    availability are emulated (``simulator.network``)."""
    target_loss: float | None = None
    """Stop once a global's eval loss is at most this (``max_seconds`` still caps the run)."""
    target_accuracy: float | None = None
    """Stop once a global's eval accuracy is at least this."""
    time_scale: float = 1.0
    """With device profiles: the run's clock is this many times slower than real time, so
    devices sharing this host's cores still keep their emulated pace. Times in the results
    (and ``max_seconds``) are simulated seconds: real seconds / ``time_scale``."""
    clients_per_round: int | None = None
    """``sync``: devices drawn (with ``seed``) to train in each round; None: all of them."""
    round_deadline_s: float | None = None
    """``sync``: a round closes this many simulated seconds after it opened with whoever
    arrived (at least one); later updates of it are refused as stale. None: no deadline."""

    def __post_init__(self) -> None:
        """Refuse combinations that cannot run (a sync round would wait forever, ...).

        Raises:
            ConfigError: With the reason.
        """
        if self.time_scale <= 0 or (self.time_scale != 1 and not self.devices):
            raise ConfigError(
                f"time_scale {self.time_scale} needs device profiles (devices) and must be > 0"
            )
        if self.mode == "sync" and self.late_joiners:
            raise ConfigError("sync rounds wait for every device: late joiners would stall them")
        if self.mode == "sync" and "kd" in {self.method, *self.methods}:
            raise ConfigError("sync rounds average adapter deltas; kd sends logits instead")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.agents:
            raise ConfigError(
                f"clients_per_round must be 1..{self.agents} (the fleet), "
                f"got {self.clients_per_round}"
            )
        if self.round_deadline_s is not None and not self.round_deadline_s > 0:
            raise ConfigError(f"round_deadline_s must be > 0, got {self.round_deadline_s}")


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
    devices: list[EmulatedDevice] = field(default_factory=list)
    """The emulated devices, by agent (empty without device profiles)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, the layout of the results file."""
        agents = [asdict(report) | {"rejected": dict(report.rejected)} for report in self.agents]
        for agent, device in zip(agents, self.devices, strict=False):
            agent["device"] = {"profile": device.spec.name} | asdict(device.times)
        return self.results | {"agents": agents}


def aggregator_config(config: FleetConfig) -> AggregatorConfig:
    """The aggregator settings a fleet runs with."""
    extra = dict(config.aggregator)
    strategy = StrategySettings.model_validate(
        {"name": config.strategy, "staleness": config.staleness} | extra.pop("strategy", {})
    )
    if config.mode == "sync":  # FedAvg: the sample-weighted mean of one update per device
        strategy = StrategySettings(
            name="fedbuff",
            staleness="constant",
            buffer_size=config.clients_per_round or config.agents,
            server_lr=1.0,
        )
        extra["max_staleness"] = 0  # over what a fleet file sets for its async runs
        extra["sync"] = {  # the roster, and the deadline on the aggregator's (real) clock
            "clients": [_client_id(i) for i in range(config.agents)],
            "clients_per_round": config.clients_per_round,
            "round_deadline_s": (
                None
                if config.round_deadline_s is None
                else config.round_deadline_s * config.time_scale
            ),
        }
    lora = LoraSpec.model_validate({"mode": config.lora_mode} | extra.pop("lora", {}))
    kd = _text_proxy(config) | extra.pop("kd", {})
    return AggregatorConfig.model_validate(
        {
            "federation": config.federation,
            "method": config.method,
            "accept_methods": tuple(sorted(set(config.methods) - {config.method})),
            "model": ModelRef(name=config.model),
            "lora": lora,
            # Only what was set, so the aggregator's model-family defaults fill the rest.
            "strategy": strategy.model_dump(exclude_unset=True),
            "seed": config.seed,
            "max_versions": config.max_versions,
            # The aggregator's clock is real time; its cosine schedule decays over the run.
            "max_seconds": config.max_seconds * config.time_scale,
            "dataset": config.dataset,
            "max_payload": config.max_payload,
        }
        | ({"kd": kd} if kd else {})
        | _text_eval(config)
        | extra
    )


def _text_eval(config: FleetConfig) -> dict[str, str]:
    """Held-out data for a text task: the source's test split, never trained on."""
    if not is_text_spec(config.dataset):
        return {}
    return {"eval_data": f"{config.dataset}:split=test,n={config.eval_samples}"}


PROXY_ROWS = 2000
"""Rows of a text task's train split, beyond the devices' rows, that KD distils on."""


def _text_proxy(config: FleetConfig) -> dict[str, str]:
    """KD's public proxy for a text task: unlabeled rows of its domain no device holds.

    Distilling on random tokens teaches a classifier nothing about news or reviews; the
    train split's rows after the ``train_samples`` the devices share are the same domain
    and never trained on (with every row in training, the proxy is the devices' rows).
    """
    if not is_text_spec(config.dataset):
        return {}
    rows = f"skip={config.train_samples},n={PROXY_ROWS}" if config.train_samples else ""
    return {"proxy_dataset": f"{config.dataset}:{rows}".rstrip(":")}


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


async def run_fleet(
    config: FleetConfig, *, url: BrokerAddress, progress: bool = True
) -> FleetResult:
    """Run the fleet until the aggregator reaches ``max_versions``."""
    agg_config = aggregator_config(config)
    shards = fleet_shards(shard_plan(config, agg_config), model=config.model)
    transport_config = aggregator_transport(agg_config, url=url)  # as `edgefed aggregator`
    threads = torch.get_num_threads()
    # Before any worker thread starts: each thread keeps the count it first saw, and a
    # two-thread team on an oversubscribed CPU starves (docs/architecture.md §8b).
    torch.set_num_threads(1)
    try:
        async with contextlib.AsyncExitStack() as stack:
            transport = await stack.enter_async_context(MqttTransport(transport_config))
            service = service_for(agg_config, transport)
            split = await _split_service(config, service, transport_config, stack)
            reports = [AgentReport(client_id=_client_id(i)) for i in range(config.agents)]
            snapshots: dict[int, TensorMap] = {}
            devices: list[EmulatedDevice] = []
            async with asyncio.TaskGroup() as group:
                serving = group.create_task(service.run(), name="aggregator")
                helpers = [group.create_task(split.run(), name="split-server")] if split else []
                await service.ready.wait()
                if split is not None:  # a request sent before it subscribes would be lost
                    await split.ready.wait()
                devices = _emulated_devices(config, origin=time.monotonic())
                agents = [
                    group.create_task(
                        _agent(
                            config,
                            index,
                            service,
                            shards[index],
                            reports[index],
                            url=url,
                            device=devices[index] if devices else None,
                        ),
                        name=f"agent-{index}",
                    )
                    for index in range(config.agents)
                ]
                await _follow(serving, service, config, snapshots, progress=progress)
                for task in [*agents, *helpers, serving]:
                    task.cancel()
    finally:
        torch.set_num_threads(threads)
    return _fleet_result(config, service, reports, snapshots=snapshots, devices=devices)


def _emulated_devices(config: FleetConfig, *, origin: float) -> list[EmulatedDevice]:
    """One emulated device per agent, profiles cycled; none when the fleet names none.

    ``origin`` is the shared start of every device's availability timeline.
    """
    return [
        EmulatedDevice(
            config.devices[i % len(config.devices)],
            seed=config.seed * 7919 + i,
            origin=origin,
            time_scale=config.time_scale,
        )
        for i in range(config.agents if config.devices else 0)
    ]


def _fleet_result(
    config: FleetConfig,
    service: AggregatorService,
    reports: list[AgentReport],
    *,
    snapshots: dict[int, TensorMap],
    devices: list[EmulatedDevice],
) -> FleetResult:
    """The aggregator's record (sync rounds included, device times simulated) and the rest."""
    results = service.results.to_dict()
    return FleetResult(
        results=_simulated_times(results, config.time_scale) if config.devices else results,
        agents=reports,
        final_adapter=service.current,
        final_version=service.version,
        snapshots=snapshots,
        devices=devices,
    )


async def _split_service(
    config: FleetConfig,
    service: AggregatorService,
    transport_config: TransportConfig,
    stack: contextlib.AsyncExitStack,
) -> SplitService | None:
    """The split server beside ``service`` when any device may train ``split``.

    It has a connection of its own, as ``edgefed aggregator`` runs it, and merges the
    devices' parts through ``service``'s strategy.
    """
    if "split" not in {config.method, *config.methods}:
        return None
    transport = await stack.enter_async_context(MqttTransport(split_transport(transport_config)))
    return SplitService.beside(service, transport)


def _simulated_times(results: dict[str, Any], scale: float) -> dict[str, Any]:
    """The aggregator's times (real seconds) as simulated seconds, and the scale used.

    They count from version 0's record, made just before the devices start, so the
    aggregator's first evaluation is not charged to the fleet and its clock agrees with
    the devices' (``EmulatedDevice`` starts when the aggregator is ready).
    """
    history = results["history"]
    start = history[0]["time_s"] if history else 0.0
    for record in [*history, *results["updates"]]:
        record["time_s"] = round(max(0.0, record["time_s"] - start) / scale, 4)
    for record in results.get("rounds", []):
        for key in ("opened_s", "closed_s"):
            if record[key] is not None:
                record[key] = round(max(0.0, record[key] - start) / scale, 4)
    return results | {"time_scale": scale}


def _client_id(index: int) -> str:
    return f"dev{index:03d}"


async def _agent(
    config: FleetConfig,
    index: int,
    service: AggregatorService,
    shard: TokenDataset,
    report: AgentReport,
    *,
    url: BrokerAddress,
    device: EmulatedDevice | None = None,
) -> AgentReport:
    if index >= config.agents - config.late_joiners:
        await service.wait_for_version(2)
    slowdown = 1.0 if device else config.slowdowns[index % len(config.slowdowns)]
    method = config.methods[index % len(config.methods)] if config.methods else config.method
    budget = config.budgets_mb[index % len(config.budgets_mb)] if config.budgets_mb else None
    name = device.spec.name if device else f"sim-x{slowdown:g}"
    speed = device.spec.relative_speed if device else 1 / slowdown
    agent_config = AgentConfig(
        federation=config.federation,
        client_id=_client_id(index),
        data=shard_spec(shard_plan(config, aggregator_config(config)), index),
        seed=config.seed * 7919 + index,
        ack_timeout_s=config.ack_timeout_s,
        max_payload=config.max_payload,
        slowdown=slowdown,
        once_per_version=config.mode == "sync",
        profile=DeviceProfile(name=name, relative_speed=speed, memory_budget_mb=budget),
        shared_process=True,
        method=method if budget is None else None,  # with a budget, the planner chooses
        model=ModelRef(name=config.models[index % len(config.models)]) if config.models else None,
        trainer=trainer_options(config, index, method) if budget is None else {},
    )
    attack = config.attack if config.attack and index in config.attack.clients else None
    return await run_agent(
        agent_config, url=url, data=shard, report=report, fit_filter=attack, emulation=device
    )


def trainer_options(
    config: FleetConfig, index: int, method: Method
) -> dict[str, bool | int | float | str]:
    """The method's fleet-wide trainer options, with this agent's own laid over them."""
    own = config.device_trainer[index % len(config.device_trainer)] if config.device_trainer else {}
    return config.trainer.get(method, {}) | own.get(method, {})


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
    scale = config.time_scale
    deadline = started + config.max_seconds * scale if config.max_seconds > 0 else None
    by_time = deadline is not None and config.max_versions == 0
    total = config.max_seconds if by_time else config.max_versions

    def position() -> float:
        return round((loop.time() - started) / scale) if by_time else service.version

    # disable=None lets tqdm hide the bar when stderr is not a terminal (CI, pipes).
    with tqdm(
        total=total,
        desc="training" if by_time else "global versions",
        unit="s" if by_time else "v",
        disable=None if progress else True,
    ) as bar:
        while (
            not serving.done()
            and (deadline is None or loop.time() < deadline)
            and not target_reached(service.results.history, config)
        ):
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


def target_reached(history: list[VersionRecord], config: FleetConfig) -> bool:
    """Whether the newest evaluated global meets the fleet's target (False without one)."""
    if config.target_loss is None and config.target_accuracy is None:
        return False
    scored = [h for h in history if h.eval_loss is not None]
    if not scored:
        return False
    last = scored[-1]
    if config.target_loss is not None and (
        last.eval_loss is None or last.eval_loss > config.target_loss
    ):
        return False
    return config.target_accuracy is None or (
        last.eval_accuracy is not None and last.eval_accuracy >= config.target_accuracy
    )


def _postfix(service: AggregatorService) -> str:
    """Version and the latest evaluated accuracy, for the progress bar."""
    scored = [h for h in service.results.history if h.eval_accuracy is not None]
    accuracy = f" acc {scored[-1].eval_accuracy:.3f}@v{scored[-1].version}" if scored else ""
    return f"v{service.version} merged {len(service.results.merges)}{accuracy}"
