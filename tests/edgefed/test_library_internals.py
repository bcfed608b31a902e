"""Each non-public library attribute edgefed relies on still exists in the installed release.

A release that drops one fails here, naming the package and the attribute, before any
run trips over it (``make test-latest`` runs this against the newest allowed releases).
"""

import socket

import aiomqtt
import pytest
import transformers

from edgefed.library_internals import (
    attention_implementation,
    close_mqtt_socket,
    cpu_bf16_native,
    mqtt_socket,
)
from edgefed.transport.config import BrokerURL
from schemas.errors import IncompatibleLibrary


@pytest.mark.broker
async def test_mqtt_socket_is_the_live_connection_and_closing_it_drops_the_link(
    mosquitto_url: str,
):
    broker = BrokerURL.parse(mosquitto_url)
    client = aiomqtt.Client(broker.host, broker.port, identifier="internals-probe")
    assert mqtt_socket(client) is None  # not connected yet
    async with client:
        sock = mqtt_socket(client)
        assert isinstance(sock, socket.socket)
        assert sock.getpeername()[1] == broker.port
        close_mqtt_socket(client)
        assert sock.fileno() == -1
        assert mqtt_socket(client) is None


def test_mqtt_internals_name_the_library_when_an_attribute_is_gone():
    with pytest.raises(IncompatibleLibrary, match=r"aiomqtt \S+ has no object\._client") as info:
        mqtt_socket(object())
    assert info.value.package == "aiomqtt"
    assert info.value.found != "not installed"


@pytest.mark.parametrize("chosen", ["eager", "sdpa"])
def test_attention_implementation_reads_what_the_config_chose(chosen: str):
    config = transformers.LlamaConfig(attn_implementation=chosen)  # type: ignore[call-arg]
    assert attention_implementation(config) == chosen


def test_cpu_bf16_native_answers_a_bool():
    assert isinstance(cpu_bf16_native(), bool)
