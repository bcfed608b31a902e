"""``edgefed status`` carried out: connect, read the federation, print it (or keep it live)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Final

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.live import Live

from edgefed.settings import load_settings
from edgefed.transport.config import TransportConfig
from edgefed.transport.connection import MqttSettings
from edgefed.transport.mqtt import MqttTransport
from edgefed.watch import FederationWatch, render

REFRESH_S: Final = 1.0


class StatusSettings(BaseModel):
    """What ``edgefed status`` reads of an agent's or aggregator's config file."""

    model_config = ConfigDict(extra="ignore")

    federation: str
    mqtt: MqttSettings = MqttSettings()


def show(args: argparse.Namespace) -> int:
    """Print the federation once (table or JSON), or keep it on screen with ``--watch``."""
    settings = load_settings(StatusSettings, args.config, federation=args.federation)
    url = settings.mqtt.broker_url(args.broker) or "mqtt://127.0.0.1:1883"
    login = settings.mqtt.transport_config(
        url=url, client_id=f"edgefed-status-{uuid.uuid4().hex[:8]}"
    )
    return asyncio.run(_show(login, settings.federation, as_json=args.json, watch=args.watch))


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
