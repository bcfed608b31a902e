"""Acks published in the background: in order, flushed on demand, failures surfaced."""

from __future__ import annotations

import logging

import pytest

from aggregator.acks import AckSender
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.codec import decode
from schemas.messages import Ack


def _ack(index: int) -> Ack:
    return Ack(update_id=f"u{index}", client_id="dev1", accepted=True, version=index)


async def test_ack_sender_publishes_in_order_and_flush_waits_for_all() -> None:
    broker = MemoryBroker()
    async with broker.transport("agg") as transport:
        sender = AckSender(transport, "fed", max_in_flight=4)
        for index in range(10):
            await sender.send(_ack(index))
        await sender.flush()
        assert sender.in_flight == 0
    sent = [decode(frame.payload) for frame in broker.frames]
    assert [ack.update_id for ack in sent if isinstance(ack, Ack)] == [f"u{i}" for i in range(10)]
    assert {frame.topic for frame in broker.frames} == {topics.ack("fed", "dev1")}


async def test_ack_sender_logs_an_undeliverable_ack_and_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker()
    transport = broker.transport("agg")  # never connected: every publish fails
    sender = AckSender(transport, "fed")
    with caplog.at_level(logging.WARNING, logger="aggregator.acks"):
        await sender.send(_ack(1))
        await sender.flush()
    assert "ack of u1 to dev1 not delivered" in caplog.text
    assert sender.in_flight == 0


async def test_ack_sender_raises_what_is_not_a_transport_failure() -> None:
    class Broken:
        async def publish(self, *args: object, **kwargs: object) -> int:
            raise ValueError("cannot encode")

    sender = AckSender(Broken(), "fed")  # type: ignore[arg-type]
    await sender.send(_ack(1))
    with pytest.raises(ValueError, match="cannot encode"):
        await sender.flush()
    await sender.flush()  # reported once
