"""``edgefed aggregator``: merges updates as they arrive and publishes global versions."""

from __future__ import annotations

import argparse

from edgefed.cli.options import broker_option

HELP = "run the aggregator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed aggregator``."""
    broker_option(parser, service=True)
    parser.add_argument(
        "--federation", default=None, help="federation name (config key: federation)"
    )
    parser.add_argument("--config", default=None, help="aggregator TOML file")
    parser.add_argument(
        "--max-versions", type=int, default=0, help="stop at version V (0 = run on)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=0.0, help="stop merging after S seconds (0 = no)"
    )
    parser.add_argument("--json-out", default=None, help="results file")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="crash-safe checkpoints and audit log; resumes"
    )


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from aggregator import cli  # noqa: PLC0415

    return cli.run(args)
