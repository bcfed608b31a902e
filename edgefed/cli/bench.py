"""``edgefed bench``: the benchmarks (bench/), reported as ratios measured side by side."""

from __future__ import annotations

import argparse

from edgefed.cli.options import broker_option

HELP = "micro-benchmarks, reported as ratios"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed bench``."""
    broker_option(parser)
    parser.add_argument(
        "which",
        choices=[
            "codec", "memory", "bytes", "fwdgrad", "estimate", "scale", "throughput", "merge",
            "all", "split", "seed", "kd", "hierarchy",
        ],
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=0, help="repetitions per size (0 = auto)")
    parser.add_argument("--model", default="smollm2-135m", help="memory, bytes, kd: the model")
    parser.add_argument("--dataset", default="rotten-tomatoes", help="kd: the task")
    parser.add_argument("--versions", type=int, default=3, help="kd: global versions per method")
    parser.add_argument("--batch", type=int, default=8, help="memory: sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="memory: tokens per sequence")
    parser.add_argument("--steps", type=int, default=2, help="local steps per fit")
    parser.add_argument("--k", type=int, default=16, help="perturbations per step")
    parser.add_argument("--rounds", type=int, default=20, help="fwdgrad: fits per variant")
    parser.add_argument(
        "--agents", type=int, default=0, help="scale, all: MQTT agents (1000); kd: devices (2)"
    )
    parser.add_argument("--updates-per-agent", type=int, default=2, help="scale: updates each")
    parser.add_argument("--spread", type=float, default=10.0, help="scale: first-send window (s)")
    parser.add_argument("--quick", action="store_true", help="all: a fast subset")
    parser.add_argument(
        "--budget", type=float, default=None, help="seed: seconds per row (default: per task)"
    )
    parser.add_argument(
        "--task",
        default=None,
        help="seed: rerun only this dataset's rows (ag-news, rotten-tomatoes); with --save the "
        "other rows are kept from bench/seed.json",
    )
    parser.add_argument(
        "--save", action="store_true", help="codec, scale, throughput, merge, seed: into RESULTS.md"
    )
    parser.add_argument("--plot", default=None, help="split: write the memory figure (PNG) here")


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from bench import command  # noqa: PLC0415

    return command.run(args)
