"""``edgefed agent``: an edge agent, which trains on its own data and publishes updates."""

from __future__ import annotations

import argparse

from edgefed.cli.options import broker_option

HELP = "run an edge agent"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed agent``."""
    broker_option(parser, service=True)
    parser.add_argument(
        "--federation", default=None, help="federation name (config key: federation)"
    )
    parser.add_argument(
        "--client-id", default=None, help="this device's id (config key: client_id)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="synthetic:KEY=VALUE,..., a named text source with options "
        "(rotten-tomatoes:parts=6,part=2), or a .csv/.jsonl file",
    )
    parser.add_argument("--config", default=None, help="agent TOML file")
    parser.add_argument(
        "--max-updates", type=int, default=0, help="stop after N updates (0 = run on)"
    )
    parser.add_argument(
        "--state-dir", default=None, help="durable outbox folder; unacked updates survive restarts"
    )


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from edge_agent import cli  # noqa: PLC0415

    return cli.run(args)
