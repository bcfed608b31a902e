"""``edgefed clear``: delete a federation's retained messages from its broker."""

from __future__ import annotations

import argparse

from edgefed.cli.options import broker_option

HELP = "delete the retained task, globals, metrics and statuses of a federation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed clear``."""
    broker_option(parser, default="the [mqtt] url of --config, else 127.0.0.1:1883")
    parser.add_argument(
        "--federation", default=None, help="the federation (default: the --config's)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="an aggregator's TOML file: its federation, and its [mqtt] url, TLS and login "
        "(the aggregator's identity may delete what it published)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what is retained, delete nothing"
    )


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    import asyncio  # noqa: PLC0415

    from aggregator.clear import clear_federation  # noqa: PLC0415
    from edgefed.operator_login import operator_login  # noqa: PLC0415

    login = operator_login(args, role="clear")
    cleared = asyncio.run(clear_federation(login.transport, login.federation, dry_run=args.dry_run))
    verb = "retained" if args.dry_run else "deleted"
    for topic in cleared.found:
        print(f"{verb}: {topic}" if args.dry_run or topic not in cleared.left else f"kept: {topic}")
    gone = len(cleared.found) - (0 if args.dry_run else len(cleared.left))
    print(f"{login.federation} on {login.url}: {len(cleared.found)} retained, {gone} {verb}")
    if cleared.left and not args.dry_run:
        print("the broker kept the topics marked 'kept': its ACL refuses this login to delete them")
        return 1
    return 0
