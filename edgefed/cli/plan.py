"""``edgefed plan``: the method and step shape a memory budget fits, without training."""

from __future__ import annotations

import argparse

HELP = "the method and step shape a budget fits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sizes a device without importing torch here."""
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder")
    parser.add_argument(
        "--budget-mb", type=float, default=None, help="memory budget (default: from the OS)"
    )
    parser.add_argument("--methods", default="lora,fwdgrad", help="allowed, preferred first")
    parser.add_argument("--batch", type=int, default=8, help="largest batch to consider")
    parser.add_argument("--seq", type=int, default=128, help="largest sequence length")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (kept as given)")
    parser.add_argument("--k", type=int, default=16, help="perturbations per step (fwdgrad)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from edge_agent import planner  # noqa: PLC0415

    return planner.run(args)
