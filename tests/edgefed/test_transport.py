"""The MQTT transport against real brokers, and its error mapping.

Tests marked ``broker`` talk to Mosquitto (the system one on 127.0.0.1:1883, or a private
one they may kill) or to the embedded amqtt broker.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
import torch

from edgefed.transport.base import Transport
from edgefed.transport.broker import MosquittoProcess, free_port, mosquitto_binary
from edgefed.transport.config import BrokerURL, TransportConfig, Will
from edgefed.transport.frames import BadDelivery, Delivery
from edgefed.transport.memory import MemoryBroker
from edgefed.transport.mqtt import MqttTransport, map_transport_errors
from schemas import codec, topics
from schemas.errors import CodecError, TransportError
from schemas.messages import GlobalModel, Status, Update
from tests.edgefed.transport_helpers import (
    MiB,
    assert_silent,
    config,
    make_status,
    make_update,
    receive,
    receive_message,
    tensor_bytes,
    until,
)


@pytest.fixture(params=["mosquitto_url", "embedded_broker_url"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each kind of broker in turn: the system Mosquitto, then an embedded amqtt broker."""
    url: str = request.getfixturevalue(request.param)
    return url


def test_map_transport_errors_wraps_library_errors() -> None:
    with pytest.raises(TransportError, match="subscribing failed") as caught:  # noqa: SIM117
        with map_transport_errors("subscribing"):
            raise aiomqtt.MqttError("boom")
    assert isinstance(caught.value.__cause__, aiomqtt.MqttError)
    with pytest.raises(TransportError), map_transport_errors():
        raise ConnectionRefusedError("refused")
    with pytest.raises(ValueError, match="mine"), map_transport_errors():
        raise ValueError("mine")


def test_the_mqtt_module_exports_only_what_it_defines() -> None:
    """Callers import each name from the module that defines it (base, config, frames...)."""
    from edgefed.transport import mqtt

    assert {getattr(mqtt, name).__module__ for name in mqtt.__all__} == {mqtt.__name__}


def test_memory_and_mqtt_transports_satisfy_protocol() -> None:
    memory: Transport = MemoryBroker().transport("a")
    mqtt: Transport = MqttTransport(TransportConfig(url="mqtt://h", client_id="b"))
    assert memory is not mqtt


# --------------------------------------------------------------------------- real brokers


@pytest.mark.broker
async def test_large_update_roundtrip(broker_url: str, federation: str) -> None:
    update = make_update("dev-1", nbytes=5 * MiB, seed=7)
    async with (
        MqttTransport(config(broker_url, "aggregator")) as aggregator,
        MqttTransport(config(broker_url, "dev-1")) as device,
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
async def test_before_send_is_told_the_bytes_sent_before_any_leave(
    mosquitto_url: str, federation: str
) -> None:
    """An emulated uplink delays exactly what goes out: every chunk, headers included."""
    update = make_update("dev-1", nbytes=MiB, seed=3)
    told: list[tuple[int, int]] = []
    async with MqttTransport(config(mosquitto_url, "dev-1")) as device:

        async def before_send(nbytes: int) -> None:
            told.append((nbytes, device.stats.published_frames))

        sent = await device.publish(
            topics.update(federation, "dev-1"), update, before_send=before_send
        )
    assert device.stats.published_frames > 1  # chunked
    assert told == [(sent, 0)]
    assert sent > len(codec.encode(update))  # the chunks' own headers count too


@pytest.mark.broker
async def test_retained_chunked_global_for_late_subscriber(
    broker_url: str, federation: str
) -> None:
    model = GlobalModel(task_id="t", version=2, tensors={"w": torch.randn(300 * 1024)})
    async with MqttTransport(config(broker_url, "aggregator")) as aggregator:
        await aggregator.publish(
            topics.global_model(federation, 2),
            model,
            retain=True,
            chunk_topic=lambda index: topics.global_model(federation, 2, index),
        )
        chunks = aggregator.stats.published_frames
        assert chunks > 3
        async with MqttTransport(config(broker_url, "late")) as late:
            await late.subscribe(topics.global_filter(federation))
            delivered = await receive_message(late)
        assert delivered.topic == topics.global_model(federation, 2, 0)
        assert isinstance(delivered.message, GlobalModel)
        assert tensor_bytes(delivered.message.tensors["w"]) == tensor_bytes(model.tensors["w"])
        for index in range(chunks):
            await aggregator.clear_retained(topics.global_model(federation, 2, index))
        async with MqttTransport(config(broker_url, "later")) as later:
            await later.subscribe(topics.global_filter(federation))
            await assert_silent(later)


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
async def test_a_client_given_several_brokers_moves_to_the_next_when_its_own_dies(
    mosquitto_process: MosquittoProcess, federation: str, fast_reconnect: dict[str, float]
) -> None:
    nobody = f"mqtt://127.0.0.1:{free_port()}"
    with MosquittoProcess() as spare:
        urls = ",".join([nobody, mosquitto_process.url, spare.url])
        async with (
            MqttTransport(config(urls, "aggregator", **fast_reconnect)) as aggregator,
            MqttTransport(config(spare.url, "dev-1", **fast_reconnect)) as device,
        ):
            # Nothing listens on the first: it connected to the second.
            assert f"{mosquitto_process.url} connected=True" in repr(aggregator)
            await aggregator.subscribe(topics.update_filter(federation))
            mosquitto_process.kill()
            await until(lambda: f"{spare.url} connected=True" in repr(aggregator))
            # Its subscription came along to the spare broker.
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
