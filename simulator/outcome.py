"""What a fleet run amounts to: time to target, traffic, staleness, memory, a time series.

``fleet_outcome`` turns one run's results (``FleetResult.to_dict``) into the record that
``edgefed simulate --json-out`` writes and that benchmarks read (``time_to_target_s`` is
null when the target was never reached). All times are simulated seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from edge_agent.budget import Budget
from edge_agent.memory_estimate import StepShape, estimate, model_shape
from edge_agent.planner import Plan, plan_training
from simulator.fleet import FleetConfig, aggregator_config, trainer_options
from simulator.summary import summarize


def target_of(config: FleetConfig) -> dict[str, float] | None:
    """The run's target as ``{"eval_loss": x}`` and/or ``{"eval_accuracy": y}``."""
    target: dict[str, float] = {}
    if config.target_loss is not None:
        target["eval_loss"] = config.target_loss
    if config.target_accuracy is not None:
        target["eval_accuracy"] = config.target_accuracy
    return target or None


def time_to_target(history: list[dict[str, Any]], target: dict[str, float] | None) -> float | None:
    """Simulated seconds until the first global meeting every part of ``target``."""
    if not target:
        return None
    for record in history:
        loss, accuracy = record["eval_loss"], record["eval_accuracy"]
        if "eval_loss" in target and (loss is None or loss > target["eval_loss"]):
            continue
        if "eval_accuracy" in target and (accuracy is None or accuracy < target["eval_accuracy"]):
            continue
        return float(record["time_s"])
    return None


def series(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per version: time, eval loss/accuracy, merged updates, cumulative bytes up and down.

    Bytes up are the updates the aggregator received by then; bytes down are the globals
    the devices had finished downloading by then (emulated links), else an estimate of
    every device fetching each published version.
    """
    ups = sorted((u["time_s"], u["bytes"]) for u in results["updates"])
    downs = sorted(
        (t, n)
        for agent in results.get("agents", [])
        for t, n in agent.get("device", {}).get("downloads", [])
    )
    rows: list[dict[str, Any]] = []
    for record in results["history"]:
        until = record["time_s"]
        rows.append(
            {
                "version": record["version"],
                "time_s": until,
                "eval_loss": record["eval_loss"],
                "eval_accuracy": record["eval_accuracy"],
                "merged_updates": record["merged_updates"],
                "bytes_up": sum(n for t, n in ups if t <= until),
                "bytes_down": sum(n for t, n in downs if t <= until),
            }
        )
    return rows


def fixed_method_plans(config: FleetConfig) -> dict[int, dict[str, Any]]:
    """The memory plan of each device that trains a fixed method (the planner skipped it).

    Devices told their method do not plan, so their peak is estimated here the same way,
    against their profile's budget, for the per-device memory report.
    """
    if not config.devices or not config.methods:
        return {}
    agg = aggregator_config(config)
    shape = model_shape(config.model)
    plans: dict[int, dict[str, Any]] = {}
    for index in range(config.agents):
        budget = config.budgets_mb[index % len(config.budgets_mb)] if config.budgets_mb else None
        if budget is not None:
            continue  # planned by the agent itself
        device = config.devices[index % len(config.devices)]
        method = config.methods[index % len(config.methods)]
        plan = plan_training(
            shape,
            budget=Budget(mb=device.memory_budget_mb, source="config"),
            methods=(method,),
            train=agg.train,
            lora=agg.lora,
            trainer=config.trainer,
        )
        plans[index] = dict(plan.to_status())
        cut = trainer_options(config, index, method).get("cut")
        if isinstance(plan, Plan) and isinstance(cut, int):  # split at the configured cut
            step = StepShape(
                batch=plan.batch_size,
                seq_len=plan.seq_len,
                rank=agg.lora.rank,
                targets=agg.lora.target_modules,
                cut=cut,
            )
            found = estimate(shape, step, "split")
            plans[index] |= {"cut": cut, "estimate_mb": round(found.total_mb, 1)}
    return plans


def device_rows(
    results: dict[str, Any], plans: dict[int, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per device: profile, method, memory (planned peak), work, time spent.

    ``plans`` fills in the plan of devices that did not report one (by agent index).
    """
    rows: list[dict[str, Any]] = []
    for index, agent in enumerate(results.get("agents", [])):
        plan = agent.get("plan") or (plans or {}).get(index) or {}
        device = agent.get("device", {})
        peak = plan.get("measured_mb") or plan.get("estimate_mb") or plan.get("required_mb")
        rows.append(
            {
                "client_id": agent["client_id"],
                "profile": device.get("profile"),
                "method": plan.get("method"),
                "plan_state": plan.get("state"),
                "budget_mb": plan.get("budget_mb"),
                "peak_memory_mb": peak,
                "peak_memory_source": "measured" if plan.get("measured_mb") else "estimated",
                "updates_sent": agent["updates_sent"],
                "accepted": agent["accepted"],
                "rejected": sum(agent["rejected"].values()),
                "dropped_fits": device.get("dropped_fits", 0),
                "host_overruns": device.get("host_overruns", 0),
                "compute_s": round(device.get("compute_s", 0.0), 3),
                "upload_s": round(device.get("upload_s", 0.0), 3),
                "download_s": round(device.get("download_s", 0.0), 3),
                "offline_s": round(device.get("offline_s", 0.0), 3),
                "bytes_down": agent["bytes_down"],
                "split": split_costs(agent),
            }
        )
    return rows


def split_costs(agent: dict[str, Any]) -> dict[str, Any] | None:
    """A split device's cost per step: bytes up/down, device compute, and the peak memory.

    None for devices that trained another way. The peak is the resident memory of the
    process during its fits: with every simulated device in one process, an upper bound.
    """
    fits = agent.get("split") or []
    steps = [step for fit in fits for step in fit["steps"]]
    if not steps:
        return None
    count = len(steps)
    return {
        "steps": count,
        "bytes_up_per_step": round(sum(s["bytes_up"] for s in steps) / count),
        "bytes_down_per_step": round(sum(s["bytes_down"] for s in steps) / count),
        "compute_s_per_step": round(sum(s["compute_s"] for s in steps) / count, 5),
        "wait_s_per_step": round(sum(s["wait_s"] for s in steps) / count, 5),
        "compute_s": round(sum(s["compute_s"] for s in steps), 4),
        "peak_mb": round(max(fit["peak_mb"] for fit in fits), 1),
    }


def split_table(runs: list[dict[str, Any]]) -> str:
    """Per split device of each run: bytes per step, device compute, peak (markdown).

    Empty when no device trained with ``split``.
    """
    lines = [
        "| mode | device | profile | steps | KB up / step | KB down / step "
        "| device compute ms / step | peak MB (process) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        f"| {run['mode']} | {row['client_id']} | {row['profile'] or '-'} | {c['steps']} "
        f"| {c['bytes_up_per_step'] / 1e3:.1f} | {c['bytes_down_per_step'] / 1e3:.1f} "
        f"| {c['compute_s_per_step'] * 1e3:.1f} | {c['peak_mb']:.0f} |"
        for run in runs
        for row in run["devices"]
        if (c := row.get("split"))
    ]
    return "\n".join([*lines, *rows]) + "\n" if rows else ""


def fleet_outcome(
    results: dict[str, Any], config: FleetConfig, *, real_s: float, name: str = ""
) -> dict[str, Any]:
    """The record of one run (see the module docstring)."""
    history = results["history"]
    scored = [h for h in history if h["eval_loss"] is not None]
    last = scored[-1] if scored else None
    target = target_of(config)
    head = summarize(
        results,
        model=config.model,
        dataset=config.dataset,
        base_accuracy=scored[0]["eval_accuracy"] if scored else None,
        final_accuracy=last["eval_accuracy"] if last else None,
        held_out=config.eval_samples,
        device_steps=0,
        train_s=history[-1]["time_s"] if history else 0.0,
        wall_s=real_s,
    )
    accepted = [u["staleness"] for u in results["updates"] if u["accepted"]]
    return {
        "fleet": name,
        "mode": config.mode,
        "strategy": (
            {
                "name": "fedavg",
                "round_size": config.clients_per_round or config.agents,
                "round_deadline_s": config.round_deadline_s,
            }
            if config.mode == "sync"
            else results["config"]["strategy"]
        ),
        "rounds": results.get("rounds", []),
        "agents": config.agents,
        "target": target,
        "time_to_target_s": time_to_target(history, target),
        "reached_target": time_to_target(history, target) is not None,
        "simulated_s": head.train_s,
        "real_s": round(real_s, 2),
        "time_scale": config.time_scale,
        "base_eval_loss": scored[0]["eval_loss"] if scored else None,
        "final_eval_loss": last["eval_loss"] if last else None,
        "final_eval_accuracy": head.final_accuracy,
        "versions": head.versions,
        "accepted": head.accepted,
        "rejected": head.rejected,
        "bytes_up": head.bytes_up,
        "bytes_down": head.bytes_down,
        "staleness": {
            "mean": round(head.mean_staleness, 3),
            "max": head.max_staleness,
            "histogram": {str(k): v for k, v in sorted(Counter(accepted).items())},
        },
        "devices": device_rows(results, fixed_method_plans(config)),
        "series": series(results),
    }


def speedup(async_run: dict[str, Any], sync_run: dict[str, Any]) -> float | None:
    """How many times sooner async reached the target than sync (None if either missed it)."""
    fast: float | None = async_run["time_to_target_s"]
    slow: float | None = sync_run["time_to_target_s"]
    if fast is None or slow is None or fast <= 0:
        return None
    return round(slow / fast, 2)


def save_jsonl(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """One line per version and run: the time series people plot or load into a frame."""
    target = Path(path)
    with target.open("w", encoding="utf-8") as out:
        for run in runs:
            for row in run["series"]:
                out.write(json.dumps({"fleet": run["fleet"], "mode": run["mode"]} | row) + "\n")
    return target
