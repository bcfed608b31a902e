"""``edgefed demo``: the main job in miniature.

Four agents of different speeds fine-tune a tiny Llama with LoRA, asynchronously,
through a real MQTT broker; FedBuff merges their updates weighted by staleness.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulator.cli import simulate
from simulator.fleet import FleetConfig
from simulator.report import plot_loss, print_summary, save_json

DEMO_DIR = Path("runs/demo")


def run(args: argparse.Namespace) -> int:
    """Run the demo federation and show how the global model learned."""
    print(__doc__.strip().splitlines()[2].strip())
    result = simulate(FleetConfig(agents=4, max_versions=20), broker=args.broker)
    results = result.to_dict()
    print_summary(results)
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    save_json(results, DEMO_DIR / "results.json")
    plot = plot_loss(results, DEMO_DIR / "loss.png")
    print(f"results: {DEMO_DIR / 'results.json'}, plot: {plot}")
    return 0
