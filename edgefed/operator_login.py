"""Where operators' commands (``edgefed status``, ``edgefed clear``) connect, and as whom.

From flags alone (``--federation``, ``--broker``), or from an agent's or aggregator's config
file, whose ``federation`` and ``[mqtt]`` table (URL, TLS, login) are taken; its other keys
are the services' business and ignored here.
"""

from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from edgefed.settings import load_settings
from edgefed.transport.config import BrokerAddress, TransportConfig
from edgefed.transport.connection import MqttSettings


class OperatorSettings(BaseModel):
    """What an operator's command reads of a config file."""

    model_config = ConfigDict(extra="ignore")

    federation: str
    mqtt: MqttSettings = MqttSettings()


@dataclass(frozen=True)
class OperatorLogin:
    """The federation to look at, the broker URL as given, and the connection to make."""

    federation: str
    url: BrokerAddress
    transport: TransportConfig


def operator_login(args: argparse.Namespace, *, role: str) -> OperatorLogin:
    """``--config``, ``--federation`` and ``--broker`` of ``args``; a client id for ``role``.

    Raises:
        ConfigError: the file cannot be read, or says no federation and no flag does.
    """
    settings = load_settings(OperatorSettings, args.config, federation=args.federation)
    url = settings.mqtt.broker_url(args.broker) or "mqtt://127.0.0.1:1883"
    client_id = f"edgefed-{settings.federation}-{role}-{uuid.uuid4().hex[:8]}"
    transport = settings.mqtt.transport_config(url=url, client_id=client_id)
    return OperatorLogin(settings.federation, url, transport)
