"""The production broker setup, enforced by a real Mosquitto: TLS, per-device logins, the ACL.

Every test here starts Mosquitto from ``broker_config/production.conf`` as rendered by
``edgefed credentials init`` (certificates and passwords made on the fly) on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from aggregator.audit import UpdateEntry, read_audit
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.agent import AgentReport, run_agent
from edge_agent.config import AgentConfig
from edgefed.data.synthetic import synthetic_shards
from edgefed.security.credentials import (
    AGGREGATOR,
    SPLIT_SERVER,
    CredentialsDir,
    add_device,
    init_credentials,
    revoke_device,
)
from edgefed.security.signing import GlobalVerifier
from edgefed.settings import load_settings
from edgefed.transport.broker import MosquittoProcess, free_port, mosquitto_binary
from edgefed.transport.config import TransportConfig
from edgefed.transport.connection import MqttSettings
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.errors import ConfigError, TransportError
from schemas.messages import Ack, GlobalModel, ModelRef, Status, Task, Update
from tests.edgefed.transport_helpers import assert_silent, receive_message
from tests.system.conftest import Proc, run_to_exit

pytestmark = pytest.mark.broker

DEVICES = ("dev-1", "dev-2")


@dataclass
class SecureBroker:
    """A running production-config Mosquitto and the credentials folder it was made from."""

    layout: CredentialsDir
    process: MosquittoProcess
    url: str

    def mqtt(self, name: str) -> MqttSettings:
        text = (self.layout.identity(name) / "connection.toml").read_text(encoding="utf-8")
        return MqttSettings.model_validate(tomllib.loads(text)["mqtt"])

    def transport(self, name: str, **options: object) -> TransportConfig:
        """Settings for a client logged in as ``name``, as its connection.toml says."""
        client_id = f"{name}-{time.monotonic_ns()}"
        return self.mqtt(name).transport_config(url=self.url, client_id=client_id, **options)

    def aggregator_config(self, federation: str, **overrides: object) -> AggregatorConfig:
        path = self.layout.identity(AGGREGATOR) / "connection.toml"
        return load_settings(AggregatorConfig, path, federation=federation, **overrides)


def _skip_without_tools() -> None:
    if mosquitto_binary() is None:
        pytest.skip("the mosquitto binary is not installed")


@contextlib.contextmanager
def _secure_broker(*, client_certs: bool = False) -> Iterator[SecureBroker]:
    _skip_without_tools()
    # The broker drops root privileges: its folders must be reachable by its own user,
    # which pytest's private tmp_path is not.
    with tempfile.TemporaryDirectory(prefix="edgefed-prod-") as name:
        Path(name).chmod(0o755)
        port = free_port()
        layout = init_credentials(
            Path(name) / "creds",
            broker_hosts=["127.0.0.1", "localhost"],
            port=port,
            client_certs=client_certs,
            days=2,
        )
        for device in DEVICES:
            add_device(layout.root, device, days=2)
        with MosquittoProcess(config=layout.broker_config, port=port) as process:
            yield SecureBroker(layout, process, f"mqtts://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[SecureBroker]:
    """One production-config broker (password logins) shared by this module's tests."""
    with _secure_broker() as broker:
        yield broker


@contextlib.asynccontextmanager
async def _serving(
    broker: SecureBroker, config: AggregatorConfig
) -> AsyncIterator[AggregatorService]:
    """An aggregator service logged in as the aggregator identity, running for the block."""
    settings = broker.transport(AGGREGATOR, max_payload=config.max_payload)
    async with MqttTransport(settings) as transport:
        service = AggregatorService(config, transport)
        task = asyncio.create_task(service.run(), name="aggregator")
        await asyncio.wait_for(service.ready.wait(), 30)
        try:
            yield service
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _audit_updates(path: Path) -> list[UpdateEntry]:
    return [entry for entry in read_audit(path) if isinstance(entry, UpdateEntry)]


def _status(client_id: str) -> Status:
    return Status(client_id=client_id, state="online")


def _odd_update(client_id: str) -> Update:
    """An update the aggregator reads and nacks (wrong shape): proof that it arrived."""
    return Update(
        client_id=client_id,
        task_id="task-1",
        base_version=0,
        num_samples=1,
        delta={"nothing": torch.zeros(2)},
    )


# --------------------------------------------------------------------------- static


def test_production_conf_is_tls_only_authenticated_and_fenced() -> None:
    conf = Path("broker_config/production.conf").read_text(encoding="utf-8")
    lines = [line.split() for line in conf.splitlines() if line and not line.startswith("#")]
    keys = {words[0]: words[1:] for words in lines}
    assert [words for words in lines if words[0] == "listener"] == [["listener", "8883"]]
    for needed in ("cafile", "certfile", "keyfile", "password_file", "acl_file"):
        assert needed in keys, needed
    assert keys["allow_anonymous"] == ["false"]
    assert keys["use_username_as_clientid"] == ["true"]
    acl = Path("broker_config/edgefed.acl").read_text(encoding="utf-8")
    patterns = [line for line in acl.splitlines() if line.startswith("pattern")]
    assert "pattern write edgefed/+/update/%u" in patterns
    assert "pattern read edgefed/+/ack/%u" in patterns
    assert not any("task" in line or "global" in line for line in patterns if "write" in line)
    assert not any("intake" in line for line in patterns if "write" in line)  # replicas only


# --------------------------------------------------------------------------- federating


@pytest.mark.slow
async def test_devices_federate_over_tls_with_signed_globals(
    secure_broker: SecureBroker, federation: str, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    config = secure_broker.aggregator_config(
        federation,
        max_versions=4,
        audit_log=str(audit),
        strategy={"name": "fedbuff", "buffer_size": 2},
    )
    assert config.signing_key is not None
    shards = synthetic_shards(len(DEVICES), total=200, seq_len=config.train.seq_len, seed=5)
    reports = [AgentReport(client_id=device) for device in DEVICES]
    async with _serving(secure_broker, config) as service:
        agents = []
        for index, device in enumerate(DEVICES):
            agent_config = load_settings(
                AgentConfig,
                secure_broker.layout.identity(device) / "connection.toml",
                federation=federation,
                client_id=device,
                data="synthetic",
                seed=index,
            )
            assert agent_config.trusted_global_keys
            url = agent_config.mqtt.broker_url(None)
            assert url is not None and str(url).startswith("mqtts://")
            agents.append(
                asyncio.create_task(
                    run_agent(agent_config, url=url, data=shards[index], report=reports[index])
                )
            )
        try:
            await asyncio.wait_for(service.wait_for_version(4), 90)
        finally:
            for agent in agents:
                agent.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
    assert service.version >= 4
    for report in reports:
        assert report.accepted >= 1, report
        assert report.refused_globals == 0, report
    accepted = {entry.client_id for entry in _audit_updates(audit) if entry.decision == "accepted"}
    assert accepted == set(DEVICES)
    losses = [v.eval_loss for v in service.results.history if v.eval_loss is not None]
    assert losses[-1] < losses[0], losses


# --------------------------------------------------------------------------- the ACL


async def test_acl_device_cannot_impersonate_or_eavesdrop(
    secure_broker: SecureBroker, federation: str, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    config = secure_broker.aggregator_config(
        federation, audit_log=str(audit), strategy={"name": "fedbuff", "buffer_size": 50}
    )
    verifier = GlobalVerifier.from_files([secure_broker.layout.public_key])
    async with (
        _serving(secure_broker, config) as service,
        MqttTransport(secure_broker.transport("dev-1")) as dev1,
    ):
        await dev1.subscribe(topics.ack(federation, "dev-1"))
        # Another device's acks, everyone's updates and statuses: Mosquitto 2.0 grants such
        # subscriptions and checks read access per message, so nothing ever arrives on them
        # (asserted at the end); a broker that checks at subscribe time refuses them here.
        for forbidden in (
            topics.ack(federation, "dev-2"),
            topics.update_filter(federation),
            topics.status_filter(federation),
        ):
            with contextlib.suppress(TransportError):
                await dev1.subscribe(forbidden)

        # Publishing as another device or as the aggregator: the broker drops it silently.
        impostor = _odd_update("dev-2")
        await dev1.publish(topics.update(federation, "dev-2"), impostor)
        evil_task = Task(task_id="evil", federation=federation, version=7, model=ModelRef(name="x"))
        await dev1.publish(topics.task(federation), evil_task, retain=True)
        forged = GlobalModel(task_id="evil", version=99, tensors={"w": torch.ones(3)})
        await dev1.publish(topics.global_model(federation, 99), forged, retain=True)
        fake_ack = Ack(update_id="x", client_id="dev-2", accepted=True, version=5)
        await dev1.publish(topics.ack(federation, "dev-2"), fake_ack)
        # Then its own update, which does reach the aggregator (nacked for its shape). The
        # broker keeps one client's messages in order, so the forged ones were handled first.
        control = _odd_update("dev-1")
        await dev1.publish(topics.update(federation, "dev-1"), control)
        answer = await receive_message(dev1, timeout_s=15)
        assert isinstance(answer.message, Ack)
        assert answer.message.update_id == control.update_id
        assert answer.message.reason == "wrong_shape"

        entries = _audit_updates(audit)
        assert [(e.client_id, e.update_id) for e in entries] == [("dev-1", control.update_id)]
        assert service.rejections == {"wrong_shape": 1}

        # The retained task and global are still the aggregator's (its identity may publish
        # them); dev-2 reads them, and its own acks, but nothing dev-1 tried to plant.
        async with MqttTransport(secure_broker.transport("dev-2")) as dev2:
            await dev2.subscribe(topics.task(federation))
            task = await receive_message(dev2)
            assert isinstance(task.message, Task)
            assert task.message.task_id == config.task_id
            await dev2.subscribe(topics.global_filter(federation))
            current = await receive_message(dev2)
            assert isinstance(current.message, GlobalModel)
            assert current.message.version == 0
            verifier.verify(current.message, federation=federation)
            await assert_silent(dev2, timeout_s=0.5)  # no forged version 99
            await dev2.subscribe(topics.ack(federation, "dev-2"))
            mine = _odd_update("dev-2")
            await dev2.publish(topics.status(federation, "dev-2"), _status("dev-2"))
            await dev2.publish(topics.update(federation, "dev-2"), mine)
            reply = await receive_message(dev2, timeout_s=15)
            assert isinstance(reply.message, Ack)
            assert reply.message.update_id == mine.update_id  # not dev-1's fake ack
        # dev-2's status, update and ack all went through the broker while dev-1 was
        # subscribed to their topics: none of them reached dev-1.
        await assert_silent(dev1, timeout_s=0.5)
        assert [e.client_id for e in _audit_updates(audit)] == ["dev-1", "dev-2"]


async def test_acl_client_id_cannot_take_over_the_aggregator_session(
    secure_broker: SecureBroker, federation: str
) -> None:
    settings = secure_broker.transport(AGGREGATOR)
    async with MqttTransport(settings) as aggregator:
        await aggregator.subscribe(topics.update_filter(federation))
        # dev-1 claims the aggregator's client id; the broker uses dev-1's user name instead,
        # so the aggregator's connection is not dropped in favour of the impostor.
        claim = secure_broker.mqtt("dev-1").transport_config(
            url=secure_broker.url, client_id=settings.client_id
        )
        async with MqttTransport(claim) as impostor:
            await impostor.publish(topics.update(federation, "dev-1"), _odd_update("dev-1"))
            delivered = await receive_message(aggregator)
            assert isinstance(delivered, Delivery)
        assert aggregator.connected
        assert aggregator.stats.connections == 1


async def test_acl_refuses_wrong_password_anonymous_and_plain_tcp(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    port = secure_broker.process.port
    ca = secure_broker.mqtt("dev-1").ca_file
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    refused = {
        "wrong password": TransportConfig(
            url=secure_broker.url, client_id="a", ca_file=ca, username="dev-1", password="nope"
        ),
        "unknown user": TransportConfig(
            url=secure_broker.url, client_id="b", ca_file=ca, username="dev-9", password="x"
        ),
        "wrong password file": MqttSettings(
            ca_file=ca, username="dev-1", password_file=str(wrong)
        ).transport_config(url=secure_broker.url, client_id="c"),
        "anonymous": TransportConfig(url=secure_broker.url, client_id="d", ca_file=ca),
    }
    for what, settings in refused.items():
        started = time.monotonic()
        with pytest.raises(TransportError):
            async with MqttTransport(settings):
                pass
        # The broker's refusal is final: no retrying until the connect deadline.
        assert time.monotonic() - started < 5, what
    # Plain MQTT to the TLS port never gets as far as a login: there is no plain listener.
    plain = TransportConfig(
        url=f"mqtt://127.0.0.1:{port}",
        client_id="e",
        username="dev-1",
        password=secure_broker.mqtt("dev-1").read_password(),
        connect_timeout_s=1.5,
        reconnect_min_s=0.1,
    )
    with pytest.raises(TransportError, match="could not connect"):
        async with MqttTransport(plain):
            pass


# paho leaves the socket of a failed TLS handshake for the garbage collector to close.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_acl_client_without_the_deployment_ca_does_not_connect(
    secure_broker: SecureBroker,
) -> None:
    good = secure_broker.mqtt("dev-1")
    settings = TransportConfig(
        url=secure_broker.url,
        client_id="f",
        username="dev-1",
        password=good.read_password(),
        connect_timeout_s=1.5,
        reconnect_min_s=0.2,
    )
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        async with MqttTransport(settings):
            pass
    gc.collect()  # while the warning filter above still applies


def test_acl_secrets_stay_out_of_urls_and_the_command_line() -> None:
    with pytest.raises(ValueError, match="password_file"):
        MqttSettings(url="mqtts://dev-1:s3cret@broker:8883")
    with pytest.raises(ConfigError, match="--broker"):
        MqttSettings().broker_url("mqtts://dev-1:s3cret@broker:8883")
    assert str(MqttSettings(url="mqtts://broker:8883").broker_url(None)) == "mqtts://broker:8883"
    with pytest.raises(ValueError, match="password_file"):
        MqttSettings(url=["mqtts://broker-1:8883", "mqtts://dev-1:s3cret@broker-2:8883"])
    nodes = MqttSettings(url=["mqtts://broker-1:8883", "mqtts://broker-2:8884"]).broker_url(None)
    assert str(nodes) == "mqtts://broker-1:8883,mqtts://broker-2:8884"


# --------------------------------------------------------------------------- revocation


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
async def test_revoked_password_and_client_certificate_are_refused(
    federation: str, tmp_path: Path
) -> None:
    with _secure_broker() as broker:
        revoke_device(broker.layout.root, "dev-2")
        assert not broker.layout.identity("dev-2").exists()
        # A fresh password for dev-1 (rotation): the old one stops working.
        old = broker.transport("dev-1")
        add_device(broker.layout.root, "dev-1", rotate=True, days=2)
        broker.process.stop()
        broker.process.start()  # or SIGHUP: the broker re-reads its password file
        with pytest.raises(TransportError):
            async with MqttTransport(old):
                pass
        async with MqttTransport(broker.transport("dev-1")):
            pass
        with pytest.raises(TransportError):
            async with MqttTransport(
                TransportConfig(
                    url=broker.url,
                    client_id="x",
                    ca_file=old.ca_file,
                    username="dev-2",
                    password="anything",
                )
            ):
                pass

    with _secure_broker(client_certs=True) as broker:
        device = broker.transport("dev-1", connect_timeout_s=2.0, reconnect_min_s=0.1)
        assert device.cert_file is not None
        # The certificate is the identity: its common name is the user name the ACL sees.
        no_password = TransportConfig(
            url=broker.url,
            client_id="y",
            ca_file=device.ca_file,
            cert_file=device.cert_file,
            key_file=device.key_file,
        )
        async with (
            MqttTransport(broker.transport(AGGREGATOR)) as aggregator,
            MqttTransport(no_password) as dev1,
        ):
            await aggregator.subscribe(topics.update_filter(federation))
            await dev1.publish(topics.update(federation, "dev-2"), _odd_update("dev-2"))
            await dev1.publish(topics.update(federation, "dev-1"), _odd_update("dev-1"))
            delivered = await receive_message(aggregator)
            assert delivered.topic == topics.update(federation, "dev-1")
            await assert_silent(aggregator)
        # The device keeps its files; revocation must make the broker refuse them.
        kept = {}
        for name in ("ca.crt", "client.crt", "client.key"):
            kept[name] = tmp_path / name
            shutil.copyfile(broker.layout.identity("dev-1") / name, kept[name])
        revoke_device(broker.layout.root, "dev-1")
        broker.process.stop()
        broker.process.start()  # the CRL is read at start
        revoked = TransportConfig(
            url=broker.url,
            client_id="z",
            ca_file=str(kept["ca.crt"]),
            cert_file=str(kept["client.crt"]),
            key_file=str(kept["client.key"]),
            connect_timeout_s=2.0,
            reconnect_min_s=0.1,
        )
        with pytest.raises(TransportError):
            async with MqttTransport(revoked):
                pass
        gc.collect()  # while the warning filter above still applies


# --------------------------------------------------------------------------- split learning


@pytest.mark.slow
async def test_split_federation_runs_as_processes_under_production_conf(
    federation: str, tmp_path: Path
) -> None:
    """The split server logs in as its own identity: the broker never closes the
    aggregator's connection for a second ``aggregator`` login, and split steps flow."""
    with _secure_broker() as broker:
        aggregator_file = broker.layout.identity(AGGREGATOR) / "connection.toml"
        split_login = load_settings(AggregatorConfig, aggregator_file, federation=federation)
        assert split_login.split_mqtt is not None
        assert split_login.split_mqtt.username == SPLIT_SERVER
        config = tmp_path / "aggregator.toml"
        config.write_text(
            aggregator_file.read_text(encoding="utf-8").replace(
                "[mqtt]",
                f'federation = "{federation}"\nmethod = "split"\nmax_versions = 2\n'
                f'json_out = "{tmp_path / "results.json"}"\n'
                'eval_data = "synthetic:n=16,seed=9"\n[strategy]\nbuffer_size = 2\n\n[mqtt]',
                1,
            )
        )
        procs = [Proc("aggregator", ["aggregator", "--config", str(config)], tmp_path / "a.log")]
        for index, device in enumerate(DEVICES):
            args = ["agent", "--config", str(broker.layout.identity(device) / "connection.toml")]
            args += ["--federation", federation, "--client-id", device, "--max-updates", "2"]
            args += ["--data", f"synthetic:n=32,seed={index + 1}"]
            procs.append(Proc(device, args, tmp_path / f"{device}.log"))
        codes = await run_to_exit(procs, 150)
        logs = "\n".join(f"--- {p.name}\n{p.text()[-3000:]}" for p in procs)
        assert codes == {"aggregator": 0, "dev-1": 0, "dev-2": 0}, logs
        broker_log = broker.process.log_text
    assert "already connected" not in broker_log, broker_log[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["history"][-1]["version"] == 2
    assert {record["client_id"] for record in results["split"]} == set(DEVICES)
