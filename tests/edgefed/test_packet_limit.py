"""Chunks shrink to fit a broker that refuses large packets, down to the smallest chunk."""

from __future__ import annotations

import pytest

from edgefed.transport.config import MIN_MAX_PAYLOAD, BrokerURL
from edgefed.transport.packet_limit import smaller_payload
from schemas.errors import TransportError

BROKER = BrokerURL.parse("mqtt://127.0.0.1:1883")


def test_a_refused_packet_halves_the_chunk_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    assert smaller_payload("dev0", BROKER, 262144, 34434) == 17217
    assert smaller_payload("dev0", BROKER, 17217, 17300) == 8608
    assert smaller_payload("dev0", BROKER, 8608, 8700) == 4304
    assert smaller_payload("dev0", BROKER, 4304, 4400) == MIN_MAX_PAYLOAD  # the floor
    assert "34,434-byte packet" in caplog.text and "max_payload" in caplog.text


def test_a_broker_that_refuses_the_smallest_chunk_stops_with_the_reason() -> None:
    with pytest.raises(TransportError, match="4,096 bytes is the smallest chunk"):
        smaller_payload("dev0", BROKER, MIN_MAX_PAYLOAD, 4200)
