"""The ``edgefed`` command: one sub-command per part of the product.

Each sub-command's work lives in its own module and is imported only when that
sub-command runs, so ``edgefed --help`` stays fast (torch is not imported).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Protocol

from edgefed.cli import (
    agent,
    aggregator,
    assets,
    bench,
    broker,
    clear,
    credentials,
    dashboard,
    demo,
    export,
    plan,
    simulate,
    status,
)
from edgefed.heap import reuse_freed_memory
from edgefed.process import exit_cleanly_on_stop_signals
from schemas.errors import ConfigError

_RECEIVES_MANY_UPDATES = frozenset({"aggregator", "bench", "simulate", "demo"})
"""Commands whose process takes in every device's updates (an aggregator, in-process or
not): they keep freed message buffers for reuse (:mod:`edgefed.heap`). A device's agent
keeps the allocator's defaults: one update per round costs little CPU, and its memory
budget is what it plans with."""

_SERVICES = frozenset({"agent", "aggregator"})
"""Commands systemd or ``docker stop`` ends with SIGTERM: they exit 0 on it, at any point."""


class Command(Protocol):
    """What each module of :mod:`edgefed.cli` provides for its sub-command."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the sub-command's options to ``parser``."""
        ...

    def run(self, args: argparse.Namespace) -> int:
        """Carry the sub-command out; the exit code."""
        ...


COMMANDS: dict[str, Command] = {
    "broker": broker,
    "bench": bench,
    "agent": agent,
    "aggregator": aggregator,
    "simulate": simulate,
    "demo": demo,
    "assets": assets,
    "credentials": credentials,
    "plan": plan,
    "export": export,
    "clear": clear,
    "status": status,
    "dashboard": dashboard,
}


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar: each command's module adds its own options."""
    parser = argparse.ArgumentParser(prog="edgefed", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.HELP))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgefed`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in _SERVICES:
        exit_cleanly_on_stop_signals()
    if args.command in _RECEIVES_MANY_UPDATES:
        reuse_freed_memory()
    try:
        code = COMMANDS[args.command].run(args)
    except (ConfigError, BaseExceptionGroup) as exc:
        problem = _config_problem(exc)
        if problem is None or args.verbose >= 2:  # -vv: the whole trace
            raise
        print(f"edgefed {args.command}: {problem}", file=sys.stderr)
        return 2
    return code


def _config_problem(exc: BaseException) -> ConfigError | None:
    """The ConfigError (a missing asset included) behind ``exc``, even inside task groups.

    A setting the user can fix gets one line that names it, not a trace.
    """
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _config_problem(inner)
            if found is not None:
                return found
    return None
