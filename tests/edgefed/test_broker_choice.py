"""Choosing a broker: the given URL, a local one, or an embedded one."""

from __future__ import annotations

import pytest

from edgefed.transport import broker_choice
from edgefed.transport.broker import free_port
from edgefed.transport.broker_choice import broker_for
from edgefed.transport.config import BrokerURL
from edgefed.transport.mqtt import MqttTransport
from schemas.errors import ConfigError
from tests.edgefed.transport_helpers import config, make_status, receive_message


async def test_broker_for_prefers_the_given_url() -> None:
    async with broker_for("mqtt://example.invalid:1999") as url:
        assert url.urls == (BrokerURL(scheme="mqtt", host="example.invalid", port=1999),)
    async with broker_for("mqtt://a.invalid:1,b.invalid") as urls:
        assert [str(url) for url in urls.urls] == ["mqtt://a.invalid:1", "mqtt://b.invalid:1883"]
    with pytest.raises(ConfigError):
        async with broker_for("http://nope"):
            pass


@pytest.mark.broker
async def test_broker_for_falls_back_to_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = BrokerURL.parse(f"mqtt://127.0.0.1:{free_port()}")
    monkeypatch.setattr(broker_choice, "LOCAL_BROKER", nobody)
    async with broker_for(None) as url:
        assert url.first.port != nobody.port
        async with MqttTransport(config(url, "probe")) as probe:
            await probe.subscribe("probe/#")
            await probe.publish("probe/1", make_status("probe"))
            assert (await receive_message(probe)).topic == "probe/1"
