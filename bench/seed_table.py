"""The seed papers' comparison, measured: every local method on the same task and fleet.

For each task in :data:`TASKS` (AG News with MiniLM, the FwdLLM paper's benchmark, and
Rotten Tomatoes with SmolLM2) every method in :data:`SEED_METHODS` runs the fleet a user gets
from ``edgefed simulate --model M --dataset D --method X --agents 2 --max-versions 0
--max-seconds S``: the method's default settings, two equally fast devices, the same data
split and held-out rows, a real broker. Measured per method:

- held-out accuracy of every version, so accuracy can be drawn against bytes and compute;
- bytes per device: updates up and globals down, plus a split device's activations and
  gradients (the split server's records, on the aggregator's clock);
- device compute seconds per update (``compute_s`` of each update, read by a passive MQTT
  observer of the ``update`` topics, which also keeps the task as published);
- device peak memory, measured: one fit in a process of its own
  (:mod:`bench.seed_memory`), beside the planner's estimate for the same step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.progress import track

from edge_agent.memory_estimate import StepShape, estimate, model_shape
from edgefed.ml.models import model_kind
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.errors import ConfigError
from schemas.messages import Method, Task, Update
from simulator.fleet import FleetConfig, aggregator_config, run_fleet, shard_plan, trainer_options
from simulator.workload import shard_spec

log = logging.getLogger(__name__)

SEED_METHODS: tuple[Method, ...] = ("lora", "kd", "fwdgrad", "split")
"""The table's methods, in column order. ``split`` runs on causal LMs only (the device part
is embeddings and blocks of a Llama-style decoder)."""
AGENTS = 2
EVAL_ROWS = 400
"""Held-out rows each version is scored on (the demo's count)."""


@dataclass(frozen=True)
class SeedTask:
    """A dataset, the model that learns it, and how long each method may train on it."""

    dataset: str
    model: str
    budget_s: float


TASKS: tuple[SeedTask, ...] = (
    SeedTask("ag-news", "minilm-l6", 240.0),
    SeedTask("rotten-tomatoes", "smollm2-135m", 360.0),
)
"""About 45 minutes on a 2-core host: 3 MiniLM rows and 4 SmolLM2 rows, each with its
model loads, evaluations and memory process."""


@dataclass(frozen=True)
class SeedPoint:
    """The global at one version, and what the devices had spent by then (per device)."""

    version: int
    time_s: float
    accuracy: float | None
    bytes_up: float
    compute_s: float


@dataclass(frozen=True)
class SeedRow:
    """One method on one task."""

    dataset: str
    model: str
    method: str
    agents: int
    budget_s: float
    versions: int
    accuracy_before: float | None
    accuracy_after: float | None
    accuracy_best: float | None
    updates: int
    bytes_up_per_device: float
    bytes_down_per_device: float
    compute_s_per_update: float | None
    compute_s_per_device: float
    """Device compute of every update each device sent, summed."""
    peak_mb: float | None
    """Measured in a process of its own (one fit, weights included); None if that failed."""
    peak_mb_estimated: float
    wall_s: float
    points: tuple[SeedPoint, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)


class _Observer:
    """A passive MQTT client: each update's device compute time, and the task published."""

    def __init__(self, url: str, federation: str) -> None:
        self.compute_s: dict[str, float] = {}
        self.task: Task | None = None
        self._federation = federation
        self._transport = MqttTransport(
            TransportConfig(url=url, client_id=f"edgefed-{federation}-observer")
        )

    async def __aenter__(self) -> _Observer:
        await self._transport.subscribe(topics.update_filter(self._federation))
        await self._transport.subscribe(topics.task(self._federation))
        await self._transport.__aenter__()
        self._reader = asyncio.create_task(self._read(), name="seed-observer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._transport.aclose()
        await self._reader

    async def _read(self) -> None:
        async for delivery in self._transport.deliveries():
            if not isinstance(delivery, Delivery):
                continue
            message = delivery.message
            if isinstance(message, Update):
                self.compute_s[message.update_id] = message.compute_s
            elif isinstance(message, Task) and self.task is None:
                self.task = message


def fleet_for(task: SeedTask, method: Method) -> FleetConfig:
    """The fleet of one row: ``edgefed simulate``'s defaults, equal devices, a time budget."""
    return FleetConfig(
        model=task.model,
        agents=AGENTS,
        method=method,
        dataset=task.dataset,
        eval_samples=EVAL_ROWS,
        slowdowns=(1.0,),
        max_versions=0,
        max_seconds=task.budget_s,
        ack_timeout_s=600.0,
        federation=f"seed-{uuid.uuid4().hex[:8]}",
    )


def points(results: dict[str, Any], compute_s: dict[str, float], agents: int) -> list[SeedPoint]:
    """Per version: accuracy, and bytes up and compute per device until that moment."""
    ups = [
        (u["time_s"], u["bytes"], compute_s.get(u["update_id"], 0.0)) for u in results["updates"]
    ]
    ups += [(r["time_s"], r["bytes_up"], 0.0) for r in results["split"]]
    found: list[SeedPoint] = []
    for record in results["history"]:
        until = record["time_s"]
        found.append(
            SeedPoint(
                version=record["version"],
                time_s=until,
                accuracy=record["eval_accuracy"],
                bytes_up=sum(n for t, n, _ in ups if t <= until) / agents,
                compute_s=round(sum(c for t, _, c in ups if t <= until) / agents, 3),
            )
        )
    return found


def measured_peak_mb(config: FleetConfig, task: Task) -> float:
    """One fit of device 0 of ``config`` in a fresh process (:mod:`bench.seed_memory`).

    Raises:
        ConfigError: The process failed (its error output is in the message).
    """
    data = shard_spec(shard_plan(config, aggregator_config(config)), 0)
    options = trainer_options(config, 0, config.method)
    with tempfile.TemporaryDirectory(prefix="edgefed-seed-") as folder:
        path = Path(folder) / "task.json"
        path.write_text(task.model_dump_json())
        command = [
            sys.executable, "-m", "bench.seed_memory", "--task", str(path),
            "--method", config.method, "--data", data, "--trainer", json.dumps(options),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"measuring {config.method}'s memory failed:\n{done.stderr[-2000:]}")
    row: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return row["peak_mb"]


def _estimated_mb(config: FleetConfig, task: Task) -> float:
    train = task.train
    proxy_rows = len(task.proxy.indices) if task.proxy is not None else 0
    split = trainer_options(config, 0, "split") if config.method == "split" else {}
    step = StepShape(
        batch=train.batch_size,
        seq_len=train.seq_len,
        proxy_rows=proxy_rows,
        cut=int(split.get("cut", 1)) if config.method == "split" else None,
    )
    return round(estimate(model_shape(config.model), step, config.method).total_mb, 1)


async def run_row(task: SeedTask, method: Method, *, url: str) -> SeedRow:
    """Run one method on one task and measure it.

    Raises:
        ConfigError: The aggregator never published its task.
    """
    config = fleet_for(task, method)
    started = time.perf_counter()
    async with _Observer(url, config.federation) as observer:
        result = await run_fleet(config, url=url, progress=False)
    if observer.task is None:
        raise ConfigError(f"the aggregator of {config.federation} published no task")
    results = result.to_dict()
    found = points(results, observer.compute_s, AGENTS)
    scored = [p.accuracy for p in found if p.accuracy is not None]
    computes = list(observer.compute_s.values())
    try:
        peak: float | None = await asyncio.to_thread(measured_peak_mb, config, observer.task)
    except ConfigError as exc:
        log.warning("%s", exc)
        peak = None
    return SeedRow(
        dataset=task.dataset,
        model=task.model,
        method=method,
        agents=AGENTS,
        budget_s=task.budget_s,
        versions=result.final_version,
        accuracy_before=scored[0] if scored else None,
        accuracy_after=scored[-1] if scored else None,
        accuracy_best=max(scored) if scored else None,
        updates=len(results["updates"]),
        bytes_up_per_device=(
            sum(u["bytes"] for u in results["updates"])
            + sum(r["bytes_up"] for r in results["split"])
        )
        / AGENTS,
        bytes_down_per_device=(
            sum(a.bytes_down for a in result.agents)
            + sum(r["bytes_down"] for r in results["split"])
        )
        / AGENTS,
        compute_s_per_update=round(statistics.median(computes), 3) if computes else None,
        compute_s_per_device=round(sum(computes) / AGENTS, 2),
        peak_mb=peak,
        peak_mb_estimated=_estimated_mb(config, observer.task),
        wall_s=round(time.perf_counter() - started, 1),
        points=tuple(found),
    )


def rows_to_run(
    tasks: tuple[SeedTask, ...] = TASKS, methods: tuple[Method, ...] = SEED_METHODS
) -> list[tuple[SeedTask, Method]]:
    """Every (task, method) pair the table has; split only on causal LMs."""
    return [
        (task, method)
        for task in tasks
        for method in methods
        if method != "split" or model_kind(task.model) == "causal"
    ]


async def run_table(
    *,
    url: str,
    tasks: tuple[SeedTask, ...] = TASKS,
    methods: tuple[Method, ...] = SEED_METHODS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every task x method in turn; a failing row is reported with its error, not dropped."""
    pairs = rows_to_run(tasks, methods)
    rows: list[dict[str, Any]] = []
    for task, method in track(pairs, description="seed table", disable=not progress):
        try:
            row = await run_row(task, method, url=url)
        except Exception as exc:  # noqa: BLE001 (one failing method must not hide the others)
            rows.append(
                {"dataset": task.dataset, "model": task.model, "method": method, "error": repr(exc)}
            )
            continue
        rows.append(row.to_json())
    return rows
