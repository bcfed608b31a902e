"""``edgefed demo``: SmolLM2 fine-tuned with LoRA across a simulated fleet."""

from __future__ import annotations

import argparse

from edgefed.cli.options import broker_option, max_payload_option

HELP = "the main job: SmolLM2 fine-tuned with LoRA across a simulated fleet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed demo``."""
    broker_option(parser)
    max_payload_option(parser)
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny Llama on a synthetic task (mechanics only)"
    )
    parser.add_argument(
        "--seconds", type=float, default=0.0, help="training window (default: the demo's)"
    )
    parser.add_argument(
        "--curve-points",
        type=int,
        default=0,
        help="versions scored between the base and the final one for the accuracy plot "
        "(about 40 s each on 2 cores)",
    )


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from simulator import demo  # noqa: PLC0415

    return demo.run(args)
