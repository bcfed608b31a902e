"""Options several commands share."""

from __future__ import annotations

import argparse


def broker_option(parser: argparse.ArgumentParser) -> None:
    """``--broker URL``: where the command connects."""
    parser.add_argument(
        "--broker",
        default=None,
        help="broker URL, mqtt://host:port or mqtts://host:port; default: 127.0.0.1:1883 "
        "when something answers there, else an embedded broker started for this run",
    )
