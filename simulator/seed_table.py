"""The seed-paper comparison: local methods side by side on one task, each on a short budget.

For every (dataset, model) in :data:`TASKS` and every method in :data:`SEED_METHODS`, the
same small fleet (same agents, data split, local steps, time budget) runs through a real
broker with the existing simulator. Measured per method: held-out accuracy before and after,
bytes per device (updates up, globals down), device compute time per update (the
``compute_s`` each update carries, read by a passive MQTT observer of the ``update`` topics)
and device peak memory. Agents share one process in the simulator, so peak memory per
device is the planner's estimate for the method's step (DESIGN §7), marked as such;
``edgefed bench memory`` measures it in isolated processes for SmolLM2.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from edge_agent.memory_estimate import StepShape, estimate, model_shape
from edgefed.modeling import model_kind
from edgefed.transport import Delivery, MqttTransport, TransportConfig
from schemas import topics
from schemas.messages import Method, Update
from simulator.fleet import FleetConfig, run_fleet

SEED_METHODS: tuple[Method, ...] = ("lora", "kd", "fwdgrad", "split")
"""The table's methods, in column order. ``split`` runs on causal LMs only (the device part
is embeddings and blocks of a Llama-style decoder); its bytes include the activations and
gradients it exchanged with the split server."""
SPLIT_CUT = 2
"""Blocks a split device runs (of SmolLM2's 30)."""
TASKS: tuple[tuple[str, str], ...] = (("ag-news", "minilm-l6"), ("sst2", "smollm2-135m"))
"""(dataset, model): AG News with MiniLM as in FwdLLM, SST-2 with SmolLM2."""

BATCH = 4
SEQ_LEN = 64
LOCAL_STEPS = 2
PROXY_ROWS = 32
TOP_K = 8


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
    updates: int
    bytes_up_per_device: float
    bytes_down_per_device: float
    compute_s_per_update: float | None
    peak_mb_estimated: float
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)


class _UpdateObserver:
    """A passive MQTT client that notes the device compute time of every update seen."""

    def __init__(self, url: str, federation: str) -> None:
        self.compute_s: dict[str, float] = {}
        self._federation = federation
        self._transport = MqttTransport(
            TransportConfig(url=url, client_id=f"edgefed-{federation}-observer")
        )

    async def __aenter__(self) -> _UpdateObserver:
        await self._transport.subscribe(topics.update_filter(self._federation))
        await self._transport.__aenter__()
        self._reader = asyncio.create_task(self._read(), name="seed-observer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._transport.aclose()
        await self._reader

    async def _read(self) -> None:
        async for delivery in self._transport.deliveries():
            if isinstance(delivery, Delivery) and isinstance(delivery.message, Update):
                self.compute_s[delivery.message.update_id] = delivery.message.compute_s


def _peak_mb(dataset: str, model: str, method: str) -> float:
    step = StepShape(
        batch=BATCH,
        seq_len=SEQ_LEN,
        proxy_rows=PROXY_ROWS if method == "kd" else 0,
        cut=SPLIT_CUT if method == "split" else None,
    )
    return round(estimate(model_shape(model), step, method).total_mb, 1)


def fleet_for(
    dataset: str, model: str, method: Method, *, agents: int, versions: int, budget_s: float
) -> FleetConfig:
    """The fleet every method of one task runs with; only ``method`` differs."""
    return FleetConfig(
        model=model,
        agents=agents,
        method=method,
        dataset=dataset,
        train_samples=64 * agents,
        eval_samples=200,
        slowdowns=(1.0,),
        max_versions=versions,
        max_seconds=budget_s,
        ack_timeout_s=600.0,
        federation=f"seed-{uuid.uuid4().hex[:8]}",
        trainer={"split": {"cut": SPLIT_CUT}},
        aggregator={
            "train": {
                "local_steps": LOCAL_STEPS,
                "batch_size": BATCH,
                "seq_len": SEQ_LEN,
                "lr": 2e-3,
            },
            "strategy": {"buffer_size": agents},
            "kd": {
                "proxy_dataset": f"{dataset}:split=train",
                "proxy_size": PROXY_ROWS,
                "server_lr": 2e-3,
                "top_k": TOP_K,  # the aggregator asks a classifier for all its classes
            },
        },
    )


async def run_row(
    dataset: str,
    model: str,
    method: Method,
    *,
    url: str,
    agents: int = 2,
    versions: int = 4,
    budget_s: float = 90.0,
) -> SeedRow:
    """Run one method on one task and measure it."""
    config = fleet_for(dataset, model, method, agents=agents, versions=versions, budget_s=budget_s)
    started = time.perf_counter()
    async with _UpdateObserver(url, config.federation) as observer:
        result = await run_fleet(config, url=url, progress=False)
    results = result.to_dict()
    scored = [h for h in results["history"] if h["eval_accuracy"] is not None]
    updates = results["updates"]
    computes = list(observer.compute_s.values())
    return SeedRow(
        dataset=dataset,
        model=model,
        method=method,
        agents=agents,
        budget_s=budget_s,
        versions=result.final_version,
        accuracy_before=scored[0]["eval_accuracy"] if scored else None,
        accuracy_after=scored[-1]["eval_accuracy"] if scored else None,
        updates=len(updates),
        bytes_up_per_device=(
            sum(u["bytes"] for u in updates) + sum(r["bytes_up"] for r in results["split"])
        )
        / agents,
        bytes_down_per_device=(
            sum(a.bytes_down for a in result.agents)
            + sum(r["bytes_down"] for r in results["split"])
        )
        / agents,
        compute_s_per_update=round(statistics.median(computes), 3) if computes else None,
        peak_mb_estimated=_peak_mb(dataset, model, method),
        wall_s=round(time.perf_counter() - started, 1),
    )


async def run_table(
    *,
    url: str,
    tasks: tuple[tuple[str, str], ...] = TASKS,
    methods: tuple[Method, ...] = SEED_METHODS,
    agents: int = 2,
    versions: int = 4,
    budget_s: float = 90.0,
) -> list[dict[str, Any]]:
    """Every task x method; a failing row is reported with its error, not dropped."""
    rows: list[dict[str, Any]] = []
    for dataset, model in tasks:
        for method in methods:
            if method == "split" and model_kind(model) != "causal":
                continue  # an encoder has no decoder blocks to cut
            try:
                row = await run_row(
                    dataset,
                    model,
                    method,
                    url=url,
                    agents=agents,
                    versions=versions,
                    budget_s=budget_s,
                )
            except Exception as exc:  # noqa: BLE001 (one failing method must not hide the others)
                rows.append(
                    {"dataset": dataset, "model": model, "method": method, "error": repr(exc)}
                )
                continue
            rows.append(row.to_json())
    return rows
