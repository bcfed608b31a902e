"""The in-memory transport: the same encode/chunk/decode path as MQTT, without a socket."""

from __future__ import annotations

import pytest
import torch

from edgefed.transport.config import Will
from edgefed.transport.frames import BadDelivery, Delivery
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.errors import ChunkError, TransportError
from schemas.messages import GlobalModel, Status, Update
from tests.edgefed.transport_helpers import (
    assert_silent,
    chunk_frames,
    make_status,
    make_update,
    receive,
    receive_message,
)


async def test_memory_transport_matches_filters() -> None:
    broker = MemoryBroker()
    async with (
        broker.transport("observer") as observer,
        broker.transport("everything") as everything,
        broker.transport("dev-1") as device,
    ):
        await observer.subscribe(topics.status_filter("f"))
        await everything.subscribe("edgefed/f/#")
        await device.publish(topics.status("f", "dev-1"), make_status("dev-1"))
        await device.publish(topics.update("f", "dev-1"), make_update())
        await device.publish(topics.status("other", "dev-1"), make_status("dev-1"))
        status = await receive_message(observer)
        assert status.topic == topics.status("f", "dev-1")
        assert isinstance(status.message, Status)
        await assert_silent(observer, timeout_s=0.05)
        kinds = [item.message.kind for item in await receive(everything, 2)]  # type: ignore[union-attr]
        assert kinds == ["status", "update"]


async def test_memory_transport_retained_and_cleared() -> None:
    broker = MemoryBroker()
    async with broker.transport("aggregator") as aggregator:
        await aggregator.publish(topics.status("f", "a"), make_status("a"), retain=True)
        async with broker.transport("late") as late:
            await late.subscribe(topics.status_filter("f"))
            assert (await receive_message(late)).topic == topics.status("f", "a")
        await aggregator.clear_retained(topics.status("f", "a"))
        assert broker.retained == {}
        async with broker.transport("later") as later:
            await later.subscribe(topics.status_filter("f"))
            await assert_silent(later, timeout_s=0.05)


async def test_memory_transport_chunks_like_mqtt() -> None:
    broker = MemoryBroker()
    update = make_update(nbytes=200 * 1024)
    async with (
        broker.transport("aggregator", max_payload=32 * 1024) as aggregator,
        broker.transport("dev-1", max_payload=32 * 1024) as device,
    ):
        await aggregator.subscribe(topics.update_filter("f"))
        sent = await device.publish(topics.update("f", "dev-1"), update)
        frames = [frame for frame in broker.frames if frame.sender == "dev-1"]
        assert len(frames) > 5
        assert all(len(frame.payload) <= 32 * 1024 for frame in frames)
        assert sent == sum(len(frame.payload) for frame in frames)
        delivered = await receive_message(aggregator)
        assert delivered.size == sent
        assert isinstance(delivered.message, Update)
        assert delivered.message.update_id == update.update_id
        with pytest.raises(ValueError, match="chunk_topic"):
            await device.publish(topics.update("f", "dev-1"), update, retain=True)
        assert len([frame for frame in broker.frames if frame.sender == "dev-1"]) == len(frames)


async def test_memory_transport_retained_chunked_global() -> None:
    broker = MemoryBroker()
    model = GlobalModel(task_id="t", version=3, tensors={"w": torch.randn(64 * 1024)})
    async with broker.transport("aggregator", max_payload=64 * 1024) as aggregator:
        await aggregator.publish(
            topics.global_model("f", 3),
            model,
            retain=True,
            chunk_topic=lambda index: topics.global_model("f", 3, index),
        )
    assert len(broker.retained) > 3
    async with broker.transport("dev-1") as device:
        await device.subscribe(topics.global_filter("f"))
        delivered = await receive_message(device)
    assert delivered.topic == topics.global_model("f", 3, 0)
    assert isinstance(delivered.message, GlobalModel)
    assert torch.equal(delivered.message.tensors["w"], model.tensors["w"])


async def test_memory_transport_will_and_shared_subscriptions() -> None:
    broker = MemoryBroker()
    will = Will(topics.status("f", "dev-1"), make_status("dev-1", "offline"))
    async with (
        broker.transport("agg-a") as agg_a,
        broker.transport("agg-b") as agg_b,
        broker.transport("dev-1", will=will) as device,
    ):
        for aggregator in (agg_a, agg_b):
            await aggregator.subscribe(topics.update_filter("f", shared_group="agg"))
            await aggregator.subscribe(topics.status_filter("f"))
        for _ in range(2):
            await device.publish(topics.update("f", "dev-1"), make_update())
        assert len(await receive(agg_a)) == 1
        assert len(await receive(agg_b)) == 1
        await device.drop_connection()
        for aggregator in (agg_a, agg_b):
            status = await receive_message(aggregator)
            assert isinstance(status.message, Status)
            assert status.message.state == "offline"
        assert device.connected
    assert broker.clients == []


async def test_memory_transport_expiry_and_garbage_do_not_stop_deliveries() -> None:
    now = [0.0]
    broker = MemoryBroker()
    async with (
        broker.transport("rx", clock=lambda: now[0], chunk_ttl_s=5.0) as rx,
        broker.transport("tx", max_payload=16 * 1024) as tx,
    ):
        await rx.subscribe("x/#")
        frames = chunk_frames(make_update(nbytes=40 * 1024))
        broker._route("x/0", frames[0][1], retain=False, sender="raw")
        broker._route("x/bad", b"\x93garbage", retain=False, sender="raw")
        now[0] = 10.0
        await tx.publish("x/good", make_status("tx"))
        bad, expired, good = await receive(rx, 3)
        assert isinstance(bad, BadDelivery)
        assert bad.topic == "x/bad"
        assert isinstance(expired, BadDelivery)
        assert isinstance(expired.error, ChunkError)
        assert isinstance(good, Delivery)
        assert rx.stats.bad_deliveries == 2


async def test_memory_transport_requires_connection() -> None:
    transport = MemoryBroker().transport("idle")
    with pytest.raises(TransportError):
        await transport.publish("t", make_status("idle"))
    async with transport:
        pass
    assert [item async for item in transport.deliveries()] == []
