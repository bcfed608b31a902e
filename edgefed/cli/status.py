"""``edgefed status``: one federation as its broker shows it."""

from __future__ import annotations

import argparse

from edgefed.cli.options import broker_option

HELP = "show a federation's run, version, evaluation and devices, read from its broker"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed status``."""
    broker_option(parser, default="the [mqtt] url of --config, else 127.0.0.1:1883")
    parser.add_argument(
        "--federation", default=None, help="the federation (default: the --config's)"
    )
    parser.add_argument(
        "--config", default=None, help="an agent or aggregator TOML file: federation and [mqtt]"
    )
    parser.add_argument("--json", action="store_true", help="print the view as JSON, for scripts")
    parser.add_argument(
        "--watch", action="store_true", help="keep the screen up to date until Ctrl-C"
    )


def run(args: argparse.Namespace) -> int:
    """Imported only now: the transport imports the wire schemas (torch)."""
    from edgefed.watch_cli import show  # noqa: PLC0415

    return show(args)
