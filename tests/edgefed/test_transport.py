"""Transport tests: URL and config parsing, the in-memory transport, and real brokers.

Tests marked ``broker`` talk to Mosquitto (the system one on 127.0.0.1:1883, or a private
one they may kill) or to the embedded amqtt broker.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
import torch

from edgefed import transport as transport_module
from edgefed.broker import MosquittoProcess, derive_config, free_port, mosquitto_binary
from edgefed.broker import run as broker_command
from edgefed.transport import (
    Backoff,
    BadDelivery,
    BrokerURL,
    Delivery,
    Inbound,
    MemoryBroker,
    MqttTransport,
    Transport,
    TransportConfig,
    Will,
    broker_for,
    check_filter,
    encode_frames,
    map_transport_errors,
    resolve_credentials,
    topic_matches,
)
from schemas import codec, topics
from schemas.errors import ChunkError, CodecError, ConfigError, PayloadTooLarge, TransportError
from schemas.messages import AgentState, GlobalModel, Status, Update

MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def make_update(client_id: str = "dev-1", *, nbytes: int = 1024, seed: int = 0) -> Update:
    generator = torch.Generator().manual_seed(seed)
    delta = {"layer.lora_B": torch.randn(nbytes // 4, generator=generator)}
    return Update(client_id=client_id, task_id="t", base_version=0, num_samples=8, delta=delta)


def make_status(client_id: str, state: AgentState = "online") -> Status:
    return Status(client_id=client_id, state=state)


async def receive(
    transport: Transport, count: int = 1, *, timeout_s: float = 10.0
) -> list[Delivery | BadDelivery]:
    items: list[Delivery | BadDelivery] = []
    async with asyncio.timeout(timeout_s):
        async for item in transport.deliveries():
            items.append(item)
            if len(items) == count:
                break
    return items


async def receive_message(transport: Transport, *, timeout_s: float = 10.0) -> Delivery:
    [item] = await receive(transport, timeout_s=timeout_s)
    assert isinstance(item, Delivery), item
    return item


async def assert_silent(transport: Transport, *, timeout_s: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await receive(transport, timeout_s=timeout_s)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def config(url: str, name: str, **overrides: object) -> TransportConfig:
    client_id = f"{name}-{uuid.uuid4().hex[:8]}"
    return TransportConfig(url=url, client_id=client_id, **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- URLs and config


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local:1884", BrokerURL("mqtt", "broker.local", 1884)),
        ("mqtts://broker.local", BrokerURL("mqtts", "broker.local", 8883)),
        ("mqtt://broker.local", BrokerURL("mqtt", "broker.local", 1883)),
        ("broker.local:2883", BrokerURL("mqtt", "broker.local", 2883)),
        ("127.0.0.1", BrokerURL("mqtt", "127.0.0.1", 1883)),
        ("[::1]:1999", BrokerURL("mqtt", "::1", 1999)),
        ("MQTTS://Broker.Local:9/", BrokerURL("mqtts", "broker.local", 9)),
        ("mqtt://ann:s%40cret@h:1", BrokerURL("mqtt", "h", 1, "ann", "s@cret")),
        ("mqtt://ann@h", BrokerURL("mqtt", "h", 1883, "ann", None)),
    ],
)
def test_broker_url_parse_accepts(url: str, expected: BrokerURL) -> None:
    parsed = BrokerURL.parse(url)
    assert parsed == expected
    assert parsed.password == expected.password


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://h:1883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://h:0",
        "mqtt://h:70000",
        "h:port",
        "mqtt://h/some/path",
        "mqtt://h?x=1",
        "mqtt://h#frag",
    ],
)
def test_broker_url_parse_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        BrokerURL.parse(url)


def test_broker_url_hides_password() -> None:
    url = BrokerURL.parse("mqtts://ann:hunter2@[::1]:8884")
    assert "hunter2" not in repr(url)
    assert str(url) == "mqtts://[::1]:8884"
    assert url.tls


def test_resolve_credentials_config_then_url_then_env() -> None:
    env = {"EDGEFED_MQTT_USERNAME": "env-user", "EDGEFED_MQTT_PASSWORD": "env-pass"}
    bare = TransportConfig(url="mqtt://h", client_id="c")
    assert resolve_credentials(bare, environ=env) == ("env-user", "env-pass")
    assert resolve_credentials(bare, environ={}) == (None, None)
    in_url = TransportConfig(url="mqtt://url-user:url-pass@h", client_id="c")
    assert resolve_credentials(in_url, environ=env) == ("url-user", "url-pass")
    user_only = TransportConfig(url="mqtt://url-user@h", client_id="c")
    assert resolve_credentials(user_only, environ=env) == ("url-user", "env-pass")
    overridden = TransportConfig(
        url="mqtt://url-user:url-pass@h", client_id="c", username="cfg", password="cfg-pass"
    )
    assert resolve_credentials(overridden, environ=env) == ("cfg", "cfg-pass")
    with pytest.raises(ConfigError, match="user name"):
        resolve_credentials(TransportConfig(url="mqtt://h", client_id="c", password="p"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"url": "ftp://h"},
        {"client_id": ""},
        {"max_payload": 100},
        {"max_message_bytes": 0},
        {"reconnect_min_s": 5.0, "reconnect_max_s": 1.0},
        {"publish_window": 0},
        {"key_file": "client.key"},
    ],
)
def test_transport_config_rejects_settings_that_cannot_work(overrides: dict[str, object]) -> None:
    settings: dict[str, object] = {"url": "mqtt://h", "client_id": "c"} | overrides
    with pytest.raises(ConfigError):
        TransportConfig(**settings)  # type: ignore[arg-type]


def test_transport_config_password_not_in_repr() -> None:
    assert "hunter2" not in repr(TransportConfig(url="h", client_id="c", password="hunter2"))


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(0.1, 1.0)
    pauses = [backoff.next() for _ in range(50)]
    assert all(0.1 <= pause <= 1.0 for pause in pauses)
    assert pauses[0] <= 0.1 + 1e-9  # the first cap is the minimum itself
    assert max(pauses[10:]) > 0.5  # the cap has grown to the maximum
    assert len(set(pauses[10:])) > 1  # jittered
    backoff.reset()
    assert backoff.next() <= 0.1 + 1e-9


def test_map_transport_errors_wraps_library_errors() -> None:
    with pytest.raises(TransportError, match="subscribing failed") as caught:  # noqa: SIM117
        with map_transport_errors("subscribing"):
            raise aiomqtt.MqttError("boom")
    assert isinstance(caught.value.__cause__, aiomqtt.MqttError)
    with pytest.raises(TransportError), map_transport_errors():
        raise ConnectionRefusedError("refused")
    with pytest.raises(ValueError, match="mine"), map_transport_errors():
        raise ValueError("mine")


# --------------------------------------------------------------------------- topics


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/+", "a/", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/broker", False),
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("$share/agg/edgefed/f/update/+", "edgefed/f/update/dev-1", True),
        ("edgefed/f/update/+", "edgefed/f/update/dev-1/x", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, *, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(
    "bad", ["", "a/#/b", "a/b#", "a+/b", "$share/g", "$share//a", "$share/+/a"]
)
def test_check_filter_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match=r"malformed|must be"):
        check_filter(bad)


# --------------------------------------------------------------------------- inbound path


def test_encode_frames_small_message_is_one_frame() -> None:
    update = make_update()
    frames = list(
        encode_frames(
            "t",
            update,
            retain=False,
            chunk_topic=None,
            compression="none",
            max_payload=64 * 1024,
            max_message_bytes=MiB,
        )
    )
    assert frames == [("t", codec.encode(update))]


def test_encode_frames_refuses_before_sending() -> None:
    update = make_update(nbytes=300 * 1024)
    common = {"chunk_topic": None, "compression": "none", "max_message_bytes": MiB}
    with pytest.raises(ValueError, match="chunk_topic"):
        encode_frames("t", update, retain=True, max_payload=64 * 1024, **common)  # type: ignore[arg-type]
    with pytest.raises(PayloadTooLarge):
        encode_frames(
            "t",
            update,
            retain=False,
            chunk_topic=None,
            compression="none",
            max_payload=64 * 1024,
            max_message_bytes=100 * 1024,
        )
    with pytest.raises(ValueError, match="publish"):
        encode_frames("t/+", update, retain=False, max_payload=MiB, **common)  # type: ignore[arg-type]


def chunk_frames(update: Update, max_payload: int = 16 * 1024) -> list[tuple[str, bytes]]:
    return list(
        encode_frames(
            "u/0",
            update,
            retain=True,
            chunk_topic=lambda index: f"u/{index}",
            compression="none",
            max_payload=max_payload,
            max_message_bytes=MiB,
        )
    )


def test_inbound_reassembles_reordered_and_duplicated_chunks_under_chunk0_topic() -> None:
    update = make_update(nbytes=100 * 1024)
    frames = chunk_frames(update)
    assert len(frames) > 3
    assert all(len(payload) <= 16 * 1024 for _, payload in frames)
    inbound = Inbound(max_message_bytes=MiB)
    arrivals = [*reversed(frames), frames[1]]  # chunk 0 is not the last to arrive
    results = [inbound.feed(topic, payload) for topic, payload in arrivals]
    [delivered] = [result for result in results if result is not None]
    assert isinstance(delivered, Delivery)
    assert delivered.topic == "u/0"
    assert delivered.size == sum(len(payload) for _, payload in frames)
    assert isinstance(delivered.message, Update)
    assert torch.equal(delivered.message.delta["layer.lora_B"], update.delta["layer.lora_B"])
    assert inbound.feed(*frames[2]) is None  # a late duplicate of a finished transfer
    assert inbound.pending == 0


def test_inbound_without_chunk0_uses_completing_topic() -> None:
    frames = chunk_frames(make_update(nbytes=40 * 1024))
    inbound = Inbound(max_message_bytes=MiB)
    for index, (_, payload) in enumerate(frames):
        topic = "elsewhere" if index == 0 else f"u/{index}"
        result = inbound.feed(topic, payload)
    assert isinstance(result, Delivery)
    assert result.topic == "elsewhere"
    inbound = Inbound(max_message_bytes=MiB)
    results = [inbound.feed(f"late/{i}", payload) for i, (_, payload) in enumerate(frames)]
    assert isinstance(results[-1], Delivery)
    assert results[-1].topic == "late/0"


def test_inbound_expired_transfer_becomes_bad_delivery() -> None:
    now = [0.0]
    inbound = Inbound(max_message_bytes=MiB, chunk_ttl_s=5.0, clock=lambda: now[0])
    frames = chunk_frames(make_update(nbytes=40 * 1024))
    assert inbound.feed(*frames[0]) is None
    assert inbound.feed(*frames[1]) is None
    assert inbound.expire() == []
    now[0] = 6.0
    [expired] = inbound.expire()
    assert isinstance(expired.error, ChunkError)
    assert expired.topic == "u/0"
    assert expired.size == len(frames[0][1]) + len(frames[1][1])
    assert inbound.pending == 0


def test_inbound_refuses_garbage_and_oversize_and_ignores_empty() -> None:
    inbound = Inbound(max_message_bytes=1000)
    assert inbound.feed("t", b"") is None
    garbage = inbound.feed("t", b"\xc1not msgpack")
    assert isinstance(garbage, BadDelivery)
    assert isinstance(garbage.error, CodecError)
    oversize = inbound.feed("t", b"\x00" * 1001)
    assert isinstance(oversize, BadDelivery)
    assert isinstance(oversize.error, PayloadTooLarge)
    assert oversize.size == 1001


# --------------------------------------------------------------------------- memory transport


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


def test_memory_and_mqtt_transports_satisfy_protocol() -> None:
    memory: Transport = MemoryBroker().transport("a")
    mqtt: Transport = MqttTransport(TransportConfig(url="mqtt://h", client_id="b"))
    assert memory is not mqtt


# --------------------------------------------------------------------------- broker choice


def test_derive_config_moves_the_listener(tmp_path: Path) -> None:
    base = tmp_path / "base.conf"
    base.write_text("port 1883\nlistener 1883 127.0.0.1\nallow_anonymous true\n")
    derived = derive_config(base, host="127.0.0.1", port=4242)
    assert derived.splitlines() == ["listener 4242 127.0.0.1", "allow_anonymous true"]
    with pytest.raises(ConfigError):
        derive_config(tmp_path / "missing.conf", host="h", port=1)


async def test_broker_for_prefers_the_given_url() -> None:
    async with broker_for("mqtt://example.invalid:1999") as url:
        assert url == "mqtt://example.invalid:1999"
    with pytest.raises(ConfigError):
        async with broker_for("http://nope"):
            pass


@pytest.mark.broker
async def test_broker_for_falls_back_to_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "LOCAL_BROKER_URL", f"mqtt://127.0.0.1:{free_port()}")
    async with broker_for(None) as url:
        assert url != transport_module.LOCAL_BROKER_URL
        async with MqttTransport(config(url, "probe")) as probe:
            await probe.subscribe("probe/#")
            await probe.publish("probe/1", make_status("probe"))
            assert (await receive_message(probe)).topic == "probe/1"


# --------------------------------------------------------------------------- real brokers


async def _large_update_roundtrip(url: str, federation: str) -> None:
    update = make_update("dev-1", nbytes=5 * MiB, seed=7)
    async with (
        MqttTransport(config(url, "aggregator")) as aggregator,
        MqttTransport(config(url, "dev-1")) as device,
    ):
        await aggregator.subscribe(topics.update_filter(federation))
        sent = await device.publish(topics.update(federation, "dev-1"), update)
        delivered = await receive_message(aggregator)
    assert delivered.topic == topics.update(federation, "dev-1")
    assert isinstance(delivered.message, Update)
    assert delivered.message.update_id == update.update_id
    received = delivered.message.delta["layer.lora_B"]
    assert tensor_bytes(received) == tensor_bytes(update.delta["layer.lora_B"])
    # It travelled as 256 KiB chunks, and every chunk is counted on both sides.
    assert device.stats.published_frames == aggregator.stats.received_frames > 20
    assert delivered.size == sent == device.stats.published_bytes > 5 * MiB


@pytest.mark.broker
async def test_large_update_roundtrip_mosquitto(mosquitto_url: str, federation: str) -> None:
    await _large_update_roundtrip(mosquitto_url, federation)


@pytest.mark.broker
async def test_large_update_roundtrip_embedded(embedded_broker_url: str, federation: str) -> None:
    await _large_update_roundtrip(embedded_broker_url, federation)


async def _retained_global_for_late_subscriber(url: str, federation: str) -> None:
    model = GlobalModel(task_id="t", version=2, tensors={"w": torch.randn(300 * 1024)})
    async with MqttTransport(config(url, "aggregator")) as aggregator:
        await aggregator.publish(
            topics.global_model(federation, 2),
            model,
            retain=True,
            chunk_topic=lambda index: topics.global_model(federation, 2, index),
        )
        chunks = aggregator.stats.published_frames
        assert chunks > 3
        async with MqttTransport(config(url, "late")) as late:
            await late.subscribe(topics.global_filter(federation))
            delivered = await receive_message(late)
        assert delivered.topic == topics.global_model(federation, 2, 0)
        assert isinstance(delivered.message, GlobalModel)
        assert tensor_bytes(delivered.message.tensors["w"]) == tensor_bytes(model.tensors["w"])
        for index in range(chunks):
            await aggregator.clear_retained(topics.global_model(federation, 2, index))
        async with MqttTransport(config(url, "later")) as later:
            await later.subscribe(topics.global_filter(federation))
            await assert_silent(later)


@pytest.mark.broker
async def test_retained_chunked_global_mosquitto(mosquitto_url: str, federation: str) -> None:
    await _retained_global_for_late_subscriber(mosquitto_url, federation)


@pytest.mark.broker
async def test_retained_chunked_global_embedded(embedded_broker_url: str, federation: str) -> None:
    await _retained_global_for_late_subscriber(embedded_broker_url, federation)


@pytest.mark.broker
async def test_garbage_payload_is_bad_delivery_and_stream_goes_on(
    mosquitto_url: str, federation: str
) -> None:
    topic = topics.update(federation, "dev-1")
    broker = BrokerURL.parse(mosquitto_url)
    async with MqttTransport(config(mosquitto_url, "aggregator")) as aggregator:
        await aggregator.subscribe(topics.update_filter(federation))
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            await raw.publish(topic, b"\xde\xad\xbe\xef not msgpack", qos=1)
            await raw.publish(topic, b"", qos=1)  # empty payloads are ignored
            await raw.publish(topic, codec.encode(make_update()), qos=1)
        bad, good = await receive(aggregator, 2)
    assert isinstance(bad, BadDelivery)
    assert isinstance(bad.error, CodecError)
    assert bad.topic == topic
    assert isinstance(good, Delivery)
    assert isinstance(good.message, Update)


@pytest.mark.broker
async def test_last_will_on_dropped_connection(mosquitto_url: str, federation: str) -> None:
    status_topic = topics.status(federation, "dev-1")
    will = Will(status_topic, make_status("dev-1", "offline"))
    async with MqttTransport(config(mosquitto_url, "observer")) as observer:
        await observer.subscribe(topics.status_filter(federation))
        device_config = config(mosquitto_url, "dev-1", will=will, reconnect_min_s=0.05)
        async with MqttTransport(device_config) as device:
            await device.publish(status_topic, make_status("dev-1"), retain=True)
            online = await receive_message(observer)
            assert isinstance(online.message, Status)
            assert online.message.state == "online"
            await device.drop_connection()
            offline = await receive_message(observer)
            assert offline.topic == status_topic
            assert isinstance(offline.message, Status)
            assert offline.message.state == "offline"
            await device.wait_connected(5)
            assert device.stats.connections == 2
            await device.clear_retained(status_topic)


@pytest.fixture
def fast_reconnect() -> Iterator[dict[str, float]]:
    yield {"reconnect_min_s": 0.05, "reconnect_max_s": 0.3}


@pytest.mark.broker
async def test_reconnect_and_resubscribe_after_broker_restart(
    mosquitto_process: MosquittoProcess, federation: str, fast_reconnect: dict[str, float]
) -> None:
    url = mosquitto_process.url
    async with (
        MqttTransport(config(url, "aggregator", **fast_reconnect)) as aggregator,
        MqttTransport(config(url, "dev-1", **fast_reconnect)) as device,
    ):
        await aggregator.subscribe(topics.update_filter(federation))
        mosquitto_process.kill()
        # A publish made while the broker is away waits for the reconnection.
        pending = asyncio.create_task(
            device.publish(topics.task(federation), make_status("dev-1"), retain=True)
        )
        await asyncio.sleep(0.3)
        assert not pending.done()
        assert not aggregator.connected
        mosquitto_process.start()  # same port, fresh broker: no sessions, no subscriptions
        await asyncio.wait_for(pending, 10)
        await aggregator.wait_connected(10)
        await device.publish(topics.update(federation, "dev-1"), make_update())
        delivered = await receive_message(aggregator)
        assert delivered.topic == topics.update(federation, "dev-1")
        assert aggregator.stats.connections == 2


@pytest.mark.broker
async def test_publish_times_out_while_broker_is_away(
    mosquitto_process: MosquittoProcess,
) -> None:
    settings = config(mosquitto_process.url, "dev-1", publish_timeout_s=0.3)
    async with MqttTransport(settings) as device:
        mosquitto_process.kill()
        with pytest.raises(TransportError, match="not acknowledged"):
            await device.publish("x/y", make_status("dev-1"))


@pytest.mark.broker
async def test_persistent_session_keeps_messages_while_away(
    mosquitto_process: MosquittoProcess, federation: str
) -> None:
    url = mosquitto_process.url
    topic = topics.update(federation, "dev-1")
    persistent = TransportConfig(url=url, client_id="aggregator-1", clean_session=False)
    async with MqttTransport(persistent) as aggregator:
        await aggregator.subscribe(topics.update_filter(federation))
    async with MqttTransport(config(url, "dev-1")) as device:
        await device.publish(topic, make_update())
    async with MqttTransport(persistent) as aggregator:
        delivered = await receive_message(aggregator)
    assert delivered.topic == topic


async def test_connect_deadline_raises_transport_error() -> None:
    settings = config(
        f"mqtt://127.0.0.1:{free_port()}", "nobody", connect_timeout_s=0.4, reconnect_min_s=0.05
    )
    with pytest.raises(TransportError, match="could not connect"):
        async with MqttTransport(settings):
            pass


def _secure_broker_config(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, a password file and a TLS-only config."""
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    run = functools.partial(subprocess.run, check=True, capture_output=True, cwd=folder)
    run(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca"])
    run(["openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=x"])
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext"]
    run(["openssl", "x509", "-req", "-in", "server.csr", *sign, "-out", "server.crt", "-days", "2"])
    run(["mosquitto_passwd", "-b", "-c", "passwords", "dev-1", "s3cret"])
    conf = folder / "secure.conf"
    conf.write_text(
        "per_listener_settings false\n"
        "listener 8883 127.0.0.1\n"
        "allow_anonymous false\n"
        f"password_file {folder / 'passwords'}\n"
        f"cafile {folder / 'ca.crt'}\n"
        f"certfile {folder / 'server.crt'}\n"
        f"keyfile {folder / 'server.key'}\n"
    )
    for path in folder.iterdir():
        path.chmod(0o644)  # mosquitto drops root privileges before reading some of these
    return conf


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users may read (pytest's tmp_path is private to its owner)."""
    with tempfile.TemporaryDirectory(prefix="edgefed-test-") as name:
        Path(name).chmod(0o755)
        yield Path(name)


@pytest.mark.broker
async def test_tls_with_password_from_environment(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mosquitto_binary() is None:
        pytest.skip("the mosquitto binary is not installed")
    conf = _secure_broker_config(shared_dir)
    with MosquittoProcess(config=conf) as broker:
        url = f"mqtts://dev-1@127.0.0.1:{broker.port}"
        ca_file = str(shared_dir / "ca.crt")
        monkeypatch.setenv("EDGEFED_MQTT_PASSWORD", "s3cret")
        async with MqttTransport(config(url, "dev-1", ca_file=ca_file)) as device:
            await device.subscribe("secure/#")
            await device.publish("secure/1", make_status("dev-1"))
            assert (await receive_message(device)).topic == "secure/1"
        # A refused identity is not retried until the deadline: it fails at once.
        monkeypatch.setenv("EDGEFED_MQTT_PASSWORD", "wrong")
        started = time.monotonic()
        with pytest.raises(TransportError):
            async with MqttTransport(config(url, "dev-1", ca_file=ca_file, connect_timeout_s=20)):
                pass
        assert time.monotonic() - started < 5


async def test_silent_server_hits_the_connect_deadline() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(TransportError, match="could not connect"):
            async with MqttTransport(
                config(f"mqtt://127.0.0.1:{port}", "x", connect_timeout_s=0.5)
            ):
                pass
        assert time.monotonic() - started < 3
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.broker
async def test_shared_subscription_splits_updates_over_mosquitto(
    mosquitto_process: MosquittoProcess, federation: str
) -> None:
    url = mosquitto_process.url
    shared = topics.update_filter(federation, shared_group="agg")
    async with (
        MqttTransport(config(url, "agg-a")) as agg_a,
        MqttTransport(config(url, "agg-b")) as agg_b,
        MqttTransport(config(url, "dev-1")) as device,
    ):
        await agg_a.subscribe(shared)
        await agg_b.subscribe(shared)
        for _ in range(6):
            await device.publish(topics.update(federation, "dev-1"), make_update())
        got: dict[str, list[str]] = {"a": [], "b": []}
        all_in = asyncio.Event()

        async def collect(name: str, transport: MqttTransport) -> None:
            async for item in transport.deliveries():
                assert isinstance(item, Delivery)
                assert isinstance(item.message, Update)
                got[name].append(item.message.update_id)
                if len(got["a"]) + len(got["b"]) >= 6:
                    all_in.set()

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(collect("a", agg_a)), group.create_task(collect("b", agg_b))]
            await asyncio.wait_for(all_in.wait(), 10)
            await asyncio.sleep(0.1)  # nothing more may arrive: each update went to one member
            for task in tasks:
                task.cancel()
    assert got["a"]
    assert got["b"]
    assert len(set(got["a"]) | set(got["b"])) == len(got["a"]) + len(got["b"]) == 6


@pytest.mark.broker
def test_broker_command_refuses_a_taken_port(mosquitto_url: str) -> None:
    taken = BrokerURL.parse(mosquitto_url)
    args = argparse.Namespace(host=taken.host, port=taken.port, embedded=True)
    assert broker_command(args) == 1
