"""Development brokers: the derived Mosquitto config and the ``edgefed broker`` command."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefed.transport.broker import (
    DEV_CONFIG,
    DURABLE_CONFIG,
    MosquittoProcess,
    derive_config,
    mosquitto_binary,
)
from edgefed.transport.broker import run as broker_command
from edgefed.transport.config import BrokerURL
from schemas.errors import ConfigError


def test_derive_config_moves_the_listener(tmp_path: Path) -> None:
    base = tmp_path / "base.conf"
    base.write_text("port 1883\nlistener 1883 127.0.0.1\nallow_anonymous true\n")
    derived = derive_config(base, host="127.0.0.1", port=4242)
    assert derived.splitlines() == ["listener 4242 127.0.0.1", "allow_anonymous true"]
    with pytest.raises(ConfigError):
        derive_config(tmp_path / "missing.conf", host="h", port=1)


@pytest.mark.broker
def test_broker_command_refuses_a_taken_port(mosquitto_url: str) -> None:
    taken = BrokerURL.parse(mosquitto_url)
    args = argparse.Namespace(host=taken.host, port=taken.port, embedded=True)
    assert broker_command(args) == 1


@pytest.mark.broker
@pytest.mark.parametrize("config", [DEV_CONFIG, DURABLE_CONFIG], ids=["dev", "durable"])
def test_an_mqtt_v5_client_connects_to_our_broker_configs(config: Path) -> None:
    """The CONNACK's Maximum Packet Size must fit MQTT v5, or v5 clients refuse it."""
    if mosquitto_binary() is None:
        pytest.skip("the mosquitto binary is not installed")
    with MosquittoProcess(config=config) as broker:
        url = BrokerURL.parse(broker.url)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        answers: list[tuple[bool, int | None]] = []

        def on_connect(*args: Any) -> None:
            reason, properties = args[3], args[4]
            answers.append((reason.is_failure, getattr(properties, "MaximumPacketSize", None)))

        client.on_connect = on_connect
        client.connect(url.host, url.port)
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        client.disconnect()
    assert answers == [(False, 268_435_455)]
