"""``edgefed status`` carried out: connect, read the federation, print it (or keep it live)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Final

from rich.console import Console
from rich.live import Live

from edgefed.operator_login import operator_login
from edgefed.transport.config import TransportConfig
from edgefed.transport.mqtt import MqttTransport
from edgefed.watch import FederationWatch, render

REFRESH_S: Final = 1.0


def show(args: argparse.Namespace) -> int:
    """Print the federation once (table or JSON), or keep it on screen with ``--watch``."""
    login = operator_login(args, role="status")
    return asyncio.run(
        _show(login.transport, login.federation, as_json=args.json, watch=args.watch)
    )


async def _show(login: TransportConfig, federation: str, *, as_json: bool, watch: bool) -> int:
    watcher = FederationWatch(federation)
    async with MqttTransport(login) as transport:
        await watcher.subscribe(transport)
        await watcher.follow(transport)
        if not watch:
            view = watcher.view()
            if as_json:
                sys.stdout.write(view.model_dump_json(indent=2) + "\n")
            else:
                Console().print(render(view))
            return 0
        with Live(render(watcher.view()), refresh_per_second=2) as live:
            while True:
                await watcher.follow(transport, quiet_s=REFRESH_S)
                live.update(render(watcher.view()))
