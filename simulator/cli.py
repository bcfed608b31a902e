"""``edgefed simulate``: a fleet of agents and an aggregator over a real broker."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import cast, get_args

from edgefed.transport import broker_for
from schemas.errors import ConfigError
from schemas.messages import Method
from simulator.fleet import FleetConfig, FleetResult, run_fleet
from simulator.report import plot_loss, print_summary, save_json


def run(args: argparse.Namespace) -> int:
    """Run the fleet, print the summary, write the results file (and its plot)."""
    config = FleetConfig(
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
    )
    result = simulate(config, broker=args.broker)
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


def simulate(config: FleetConfig, *, broker: str | None) -> FleetResult:
    """Run ``config`` against ``broker`` (or the default broker) and return its results."""

    async def main() -> FleetResult:
        async with broker_for(broker) as url:
            return await run_fleet(config, url=url)

    return asyncio.run(main())
