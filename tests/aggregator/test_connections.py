"""The aggregator's broker session: persistent for ``edgefed aggregator`` and the simulator."""

from __future__ import annotations

from typing import Any

import pytest

import simulator.fleet
from aggregator.config import AggregatorConfig
from aggregator.connections import aggregator_client_id, aggregator_transport, split_transport
from edgefed.transport.config import TransportConfig
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import Update
from simulator.fleet import FleetConfig, aggregator_config, run_fleet
from tests.edgefed.transport_helpers import config, make_update, receive_message

pytestmark = pytest.mark.broker


async def test_session_updates_sent_while_the_aggregator_is_away_wait_for_it(
    mosquitto_url: str, federation: str
) -> None:
    settings = aggregator_transport(AggregatorConfig(federation=federation), url=mosquitto_url)
    assert settings.client_id == aggregator_client_id(federation)
    assert not settings.clean_session
    async with MqttTransport(settings) as aggregator:
        await aggregator.subscribe(topics.update_filter(federation))
    sent = make_update("dev-1")
    async with MqttTransport(config(mosquitto_url, "dev")) as device:
        await device.publish(topics.update(federation, "dev-1"), sent)
    async with MqttTransport(settings) as aggregator:  # no subscribe: the session kept it
        received = await receive_message(aggregator)
        assert isinstance(received.message, Update)
        assert received.message.update_id == sent.update_id
    async with MqttTransport(split_transport(settings)) as split:
        assert split.config.clean_session
        assert split.config.client_id == f"{settings.client_id}-split"
    # Leave no session behind on the shared broker.
    async with MqttTransport(TransportConfig(url=mosquitto_url, client_id=settings.client_id)):
        pass


@pytest.mark.slow
async def test_session_simulator_aggregator_connects_like_the_cli(
    mosquitto_url: str, federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[TransportConfig] = []

    class RecordingTransport(MqttTransport):
        """The real transport, remembering how the simulator configured it."""

        def __init__(self, settings: TransportConfig, *args: Any, **kwargs: Any) -> None:
            opened.append(settings)
            super().__init__(settings, *args, **kwargs)

    monkeypatch.setattr(simulator.fleet, "MqttTransport", RecordingTransport)
    fleet = FleetConfig(agents=1, max_versions=1, federation=federation)
    result = await run_fleet(fleet, url=mosquitto_url, progress=False)
    assert result.to_dict()["history"][-1]["version"] == 1
    expected = aggregator_transport(aggregator_config(fleet), url=mosquitto_url)
    assert opened == [expected]
    assert not opened[0].clean_session
    async with MqttTransport(TransportConfig(url=mosquitto_url, client_id=expected.client_id)):
        pass  # a clean connect under the same id drops the session the run left
