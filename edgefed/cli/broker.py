"""``edgefed broker``: a development MQTT broker (Mosquitto with the development config, or embedded)."""

from __future__ import annotations

import argparse

HELP = "run a development MQTT broker"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed broker``."""
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--ws-port",
        type=int,
        default=9001,
        help="MQTT over WebSockets on the same host, for `edgefed dashboard` (default 9001)",
    )
    parser.add_argument(
        "--embedded", action="store_true", help="use the embedded broker even if mosquitto exists"
    )


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from edgefed.transport import broker  # noqa: PLC0415

    return broker.run(args)
