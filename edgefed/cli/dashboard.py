"""``edgefed dashboard``: a live page of one federation, served on this machine."""

from __future__ import annotations

import argparse
import contextlib

HELP = "serve a live web page of a federation (an MQTT client over the broker's WebSockets)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed dashboard``."""
    parser.add_argument("--federation", required=True, help="the federation to show")
    parser.add_argument(
        "--ws-url",
        default="ws://127.0.0.1:9001",
        help="the broker's WebSocket listener as the browser reaches it (default: the "
        "loopback listener of broker_config/dev.conf and `edgefed broker`)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on")
    parser.add_argument("--port", type=int, default=8080, help="port to serve the page on")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM."""
    import threading  # noqa: PLC0415

    from edgefed.dashboard.server import DashboardServer  # noqa: PLC0415

    with DashboardServer(args.federation, args.ws_url, host=args.host, port=args.port) as server:
        print(f"dashboard of {args.federation} on {server.url} (broker {args.ws_url})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0
