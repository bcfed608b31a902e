"""``edgefed simulate``: a fleet of agents and an aggregator over a real broker.

With ``--fleet SPEC`` the fleet comes from a spec file (device profiles, data split,
strategy, target); ``--mode sync`` runs it as synchronous FedAvg rounds and ``--mode both``
runs async then sync and draws them on one chart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast, get_args

from rich.console import Console

from edgefed.transport.broker_choice import broker_for
from edgefed.transport.config import BrokerAddress
from schemas.errors import ConfigError
from schemas.messages import Method
from simulator.fleet import FleetConfig, FleetResult, Mode, run_fleet
from simulator.fleet_spec import load_fleet_spec
from simulator.outcome import fleet_outcome, save_jsonl, speedup, split_table
from simulator.report import (
    plot_device_memory,
    plot_loss,
    plot_runs_bytes,
    plot_runs_progress,
    plot_runs_staleness,
    print_summary,
    save_json,
)
from simulator.summary import markdown_table

RUNS_DIR = Path("runs")


def run(args: argparse.Namespace) -> int:
    """Run the fleet, print the summary, write the results file (and its plots)."""
    if args.fleet is None and args.mode == "async":
        return _run_flags(args)
    try:
        rounds = {  # flags over the spec's [sync] table (callers may pass neither)
            "clients_per_round": getattr(args, "clients_per_round", None),
            "round_deadline_s": getattr(args, "round_deadline", None),
        }
        config = (
            load_fleet_spec(args.fleet, **{k: v for k, v in rounds.items() if v is not None})
            if args.fleet
            else _flag_config(args)
        )
    except ConfigError as exc:
        print(f"edgefed simulate: {exc}")
        return 2
    if getattr(args, "max_payload", None) is not None:  # callers may build args without it
        config = replace(config, max_payload=args.max_payload)
    name = Path(args.fleet).stem if args.fleet else "fleet"
    modes: tuple[Mode, ...] = ("async", "sync") if args.mode == "both" else (args.mode,)
    console = Console()
    runs: list[dict[str, Any]] = []
    for mode in modes:
        console.print(f"[bold]{name}[/bold]: {config.agents} devices, {mode} ...")
        one = replace(config, mode=mode, federation=f"sim-{uuid.uuid4().hex[:8]}")
        started = time.monotonic()
        result = simulate(one, broker=args.broker)
        results = result.to_dict()
        print_summary(results, console)
        runs.append(
            fleet_outcome(results, one, real_s=time.monotonic() - started, name=name)
            | {"results": results}
        )
    _write(runs, args, name=name, console=console)
    return 0


def _write(
    runs: list[dict[str, Any]], args: argparse.Namespace, *, name: str, console: Console
) -> None:
    """The JSON file, the JSONL series, the markdown table and the plots, side by side."""
    if args.json_out:
        json_path = Path(args.json_out)
    else:
        folder = RUNS_DIR / f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    outcomes = [{k: v for k, v in run.items() if k != "results"} for run in runs]
    if len(runs) == 1:
        document: dict[str, Any] = runs[0]
    else:
        ratio = speedup(outcomes[0], outcomes[1])
        document = {"fleet": name, "mode": "both", "speedup": ratio} | {
            run["mode"]: run for run in runs
        }
    json_path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    stem = json_path.with_suffix("")
    table = markdown_table(outcomes)
    if len(runs) > 1:
        ratio = speedup(outcomes[0], outcomes[1])
        table += (
            f"\nasync reached the target {ratio}x sooner than sync (simulated time)\n"
            if ratio is not None
            else "\none of the runs never reached the target\n"
        )
    split = split_table(outcomes)
    if split:
        table += "\nsplit devices, per step\n\n" + split
    Path(f"{stem}.md").write_text(table, encoding="utf-8")
    files = [
        json_path,
        save_jsonl(outcomes, f"{stem}.jsonl"),
        Path(f"{stem}.md"),
        plot_runs_progress(outcomes, f"{stem}-progress.png"),
        plot_runs_bytes(outcomes, f"{stem}-bytes.png"),
        plot_runs_staleness(outcomes, f"{stem}-staleness.png"),
        plot_device_memory(outcomes[0], f"{stem}-memory.png"),
    ]
    console.print(table)
    console.print("written: " + ", ".join(str(f) for f in files))


def _flag_config(args: argparse.Namespace) -> FleetConfig:
    cuts = [int(cut) for cut in args.cuts.split(",") if cut.strip()]
    return FleetConfig(
        trainer={"split": {"variant": args.variant}},
        device_trainer=tuple({"split": {"cut": cut}} for cut in cuts),
        clients_per_round=args.clients_per_round,
        round_deadline_s=args.round_deadline,
        model=args.model,
        agents=args.agents,
        method=args.method,
        strategy=args.strategy,
        staleness=args.staleness,
        lora_mode=args.lora_mode,
        methods=_methods(args.methods),
        models=tuple(name.strip() for name in args.device_models.split(",") if name.strip()),
        budgets_mb=tuple(float(mb) for mb in args.budgets.split(",") if mb.strip()),
        max_versions=args.max_versions,
        seed=args.seed,
        dataset=args.dataset,
        partition=args.partition,
        alpha=args.alpha,
        max_seconds=args.max_seconds,
        **({} if args.train_samples is None else {"train_samples": args.train_samples}),
        **({} if args.eval_samples is None else {"eval_samples": args.eval_samples}),
        aggregator={} if args.eval_every is None else {"eval_every": args.eval_every},
        **({} if getattr(args, "max_payload", None) is None else {"max_payload": args.max_payload}),
    )


def _run_flags(args: argparse.Namespace) -> int:
    """One async run configured by flags: the summary, the results file and its loss plot."""
    result = simulate(_flag_config(args), broker=args.broker)
    results = result.to_dict()
    print_summary(results)
    if args.json_out:
        save_json(results, args.json_out)
        plot = plot_loss(results, Path(args.json_out).with_suffix(".png"))
        print(f"results: {args.json_out}, plot: {plot}")
    return 0


def _methods(text: str) -> tuple[Method, ...]:
    """``lora,fwdgrad`` as a tuple of methods; empty text means one method for all."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    known = get_args(Method)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown} in --methods; known: {list(known)}")
    return cast("tuple[Method, ...]", names)


def simulate(config: FleetConfig, *, broker: BrokerAddress | None) -> FleetResult:
    """Run ``config`` against ``broker`` (or the default broker) and return its results."""

    async def main() -> FleetResult:
        async with broker_for(broker) as url:
            return await run_fleet(config, url=url)

    return asyncio.run(main())
