"""broker_config/durable.conf: retained messages and persistent sessions survive SIGKILL."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from edgefed.transport.broker import (
    DURABLE_CONFIG,
    MosquittoProcess,
    mosquitto_binary,
    with_persistence_dir,
)
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import Status


def test_with_persistence_dir_moves_the_location_only_when_persisting(tmp_path: Path) -> None:
    plain = "listener 1883 127.0.0.1\npersistence false\n"
    assert with_persistence_dir(plain, tmp_path / "a") == plain
    assert not (tmp_path / "a").exists()
    durable = "persistence true\npersistence_location /var/lib/mosquitto/\nautosave_interval 1\n"
    moved = with_persistence_dir(durable, tmp_path / "b")
    assert moved.splitlines() == [
        "persistence true",
        "autosave_interval 1",
        f"persistence_location {tmp_path / 'b'}/",
    ]
    assert (tmp_path / "b").is_dir()


@pytest.mark.broker
@pytest.mark.slow
async def test_durable_broker_keeps_retained_and_queued_messages_across_a_kill() -> None:
    if mosquitto_binary() is None:
        if os.environ.get("EDGEFED_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("the mosquitto binary is not installed, and EDGEFED_REQUIRE_MOSQUITTO=1")
        pytest.skip("the mosquitto binary is not installed")
    fed = f"persist-{uuid.uuid4().hex[:8]}"
    with MosquittoProcess(config=DURABLE_CONFIG) as broker:
        sleeper = TransportConfig(url=broker.url, client_id=f"{fed}-sleeper", clean_session=False)
        async with MqttTransport(sleeper) as transport:
            await transport.subscribe(topics.status_filter(fed))
        publisher = TransportConfig(url=broker.url, client_id=f"{fed}-publisher")
        async with MqttTransport(publisher) as transport:
            await transport.publish(
                topics.status(fed, "kept"), Status(client_id="kept", state="online"), retain=True
            )
            await transport.publish(
                topics.status(fed, "queued"), Status(client_id="queued", state="training")
            )
        saves = broker.log_text.count("Saving in-memory database")
        for _ in range(100):  # autosave_interval 1: Mosquitto saves every 1-2 s
            if broker.log_text.count("Saving in-memory database") > saves:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("Mosquitto did not save its database within 10 s")
        broker.kill()
        broker.start()
        # The sleeper's session comes back with the message queued for it, after the retained one.
        async with MqttTransport(sleeper) as transport:
            await transport.subscribe(topics.status_filter(fed))
            seen: set[str] = set()
            async with asyncio.timeout(10):
                async for item in transport.deliveries():
                    assert isinstance(item, Delivery) and isinstance(item.message, Status)
                    seen.add(item.message.client_id)
                    if seen == {"kept", "queued"}:
                        break
