"""Development brokers: the derived Mosquitto config and the ``edgefed broker`` command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edgefed.transport.broker import derive_config
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
