"""Nothing lost, nothing doubled: SIGKILL the aggregator, the broker or an agent mid-run.

Every test runs ``edgefed aggregator`` and ``edgefed agent`` as subprocesses against a
private Mosquitto with persistence on, kills one of them with SIGKILL, starts it again, and
then compares what the agents recorded as acked (their outboxes) with what the aggregator
merged (its audit log and final checkpoint): every acked update merged exactly once, the
version sequence 1, 2, ... without a repeat or a step back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from aggregator.audit import MergeEntry, UpdateEntry
from edgefed.ml.models import adapter_shapes, attach_lora, build_model
from edgefed.transport.broker import MosquittoProcess, embedded_broker
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import codec, topics
from schemas.messages import LoraSpec, Metrics, ModelRef, Status, Update
from tests.system.conftest import Federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# max_payload at its floor: updates (16 KB) and globals travel as 4 KB chunks, so a broker
# killed mid-transfer leaves partial transfers behind that must be re-sent whole.
AGGREGATOR: dict[str, object] = {
    "eval_data": "synthetic:n=16,seed=9",
    "eval_every": 1000,
    "max_staleness": 20,
    "max_payload": 4096,
    "train": {"local_steps": 3, "batch_size": 4, "seq_len": 16},
}
AGENT: dict[str, object] = {
    "ack_timeout_s": 2.0,
    "max_resends": 100,
    "slowdown": 5.0,
    "max_payload": 4096,
}

MakeFederation = Callable[..., Any]


@dataclass
class Seen:
    """What an outside observer saw on the broker."""

    versions: list[int] = field(default_factory=list)
    metrics: list[Metrics] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)


@contextlib.asynccontextmanager
async def observe(url: str, federation: str, *, updates: bool = False) -> AsyncIterator[Seen]:
    """Watch published versions (Metrics) and, if asked, updates; reconnects like anyone."""
    config = TransportConfig(
        url=url, client_id=f"{federation}-observer", reconnect_max_s=0.5, publish_timeout_s=5
    )
    seen = Seen()
    async with MqttTransport(config) as transport:
        await transport.subscribe(topics.metrics(federation))
        if updates:
            await transport.subscribe(topics.update_filter(federation))

        async def collect() -> None:
            async for item in transport.deliveries():
                if isinstance(item, Delivery) and isinstance(item.message, Metrics):
                    seen.versions.append(item.message.version)
                    seen.metrics.append(item.message)
                elif isinstance(item, Delivery) and isinstance(item.message, Update):
                    seen.updates.append(item.message)

        task = asyncio.create_task(collect())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _first_sightings(seen: Seen) -> list[int]:
    """The versions of the metrics published, each report counted where it first appeared.

    Metrics are retained: a reconnect hands over the latest report again, and a broker
    restarted after ``kill -9`` may hand over an older one (what its last autosave held).
    Those are replays of a report already seen, not a version going backwards.
    """
    first = {(m.version, m.time_s, m.merged_updates): m.version for m in seen.metrics}
    return list(first.values())


def after_last_start(broker: MosquittoProcess) -> str:
    return broker.log_text.rsplit("starting", 1)[-1]


async def test_aggregator_killed_mid_run_resumes_and_merges_each_acked_update_once(
    durable_broker: MosquittoProcess, federation_of: MakeFederation
) -> None:
    strategy = {"strategy": {"name": "fedbuff", "buffer_size": 2}}
    fed = federation_of(durable_broker, AGGREGATOR | strategy, AGENT)
    clients = ["dev0", "dev1"]
    async with observe(durable_broker.url, fed.name) as seen:
        aggregator = fed.aggregator(max_versions=5).start()
        agents = [fed.agent(c, max_updates=5, seed=i).start() for i, c in enumerate(clients)]
        # Kill with an odd number accepted: one acked update sits in the FedBuff buffer.
        await fed.until("5 updates accepted", lambda: fed.accepted_in_audit() >= 5)
        aggregator.kill()
        at_kill = fed.manifest()
        assert aggregator.starts == 1
        aggregator.start()
        assert await aggregator.exited(90) == 0, fed.logs()
        for agent in agents:
            assert await agent.exited(60) == 0, fed.logs()
    result = fed.check_exactly_once(clients)
    assert len(result.acked) == len(result.merged) == 10
    assert result.versions == (1, 2, 3, 4, 5)
    assert result.buffered == frozenset()
    assert "resumed" in aggregator.text()
    assert isinstance(at_kill["version"], int) and at_kill["version"] >= 2
    assert _first_sightings(seen) == sorted(_first_sightings(seen)), seen.versions
    assert seen.versions[-1] == 5
    print(
        f"aggregator kill: killed at version {at_kill['version']}, acked {len(result.acked)}, "
        f"merged {len(result.merged)}, duplicates re-acked {result.duplicates}"
    )


async def test_broker_killed_mid_run_everyone_reconnects_and_nothing_is_lost(
    durable_broker: MosquittoProcess, federation_of: MakeFederation
) -> None:
    fed = federation_of(durable_broker, AGGREGATOR | {"strategy": {"name": "fedasync"}}, AGENT)
    clients = ["dev0", "dev1"]
    async with observe(durable_broker.url, fed.name) as seen:
        aggregator = fed.aggregator(max_versions=6).start()
        agents = [fed.agent(c, max_updates=3, seed=i).start() for i, c in enumerate(clients)]
        await fed.until("2 updates merged", lambda: fed.accepted_in_audit() >= 2)
        durable_broker.kill()
        merged_while_up = fed.accepted_in_audit()
        await asyncio.sleep(1.0)
        durable_broker.start()
        assert await aggregator.exited(90) == 0, fed.logs()
        for agent in agents:
            assert await agent.exited(60) == 0, fed.logs()
    result = fed.check_exactly_once(clients)
    assert len(result.acked) == len(result.merged) == 6
    assert result.versions == (1, 2, 3, 4, 5, 6)
    assert merged_while_up < 6
    reconnected = after_last_start(durable_broker)
    for client in ("aggregator", *clients):
        assert f"as edgefed-{fed.name}-{client}" in reconnected, reconnected
    assert _first_sightings(seen) == sorted(_first_sightings(seen)), seen.versions
    print(
        f"broker kill: {merged_while_up} merged before the kill, acked {len(result.acked)}, "
        f"merged {len(result.merged)}, duplicates re-acked {result.duplicates}"
    )


async def test_agent_killed_after_publishing_before_its_ack_is_merged_once(
    durable_broker: MosquittoProcess, federation_of: MakeFederation
) -> None:
    # A slow device (about 1.3 s between getting the global and publishing) leaves time to
    # pause the aggregator once it is up: the update is then published, and no ack can come.
    slow = AGENT | {"slowdown": 20.0}
    fed = federation_of(durable_broker, AGGREGATOR | {"strategy": {"name": "fedasync"}}, slow)
    async with observe(durable_broker.url, fed.name, updates=True) as seen:
        aggregator = fed.aggregator(max_versions=3).start()
        agent = fed.agent("dev0", max_updates=3).start()
        await fed.until("the aggregator is up", lambda: bool(seen.versions))
        aggregator.pause()
        assert not seen.updates
        await fed.until("dev0 published", lambda: bool(seen.updates), timeout_s=60)
        agent.kill()
        first = seen.updates[0].update_id
        assert fed.pending("dev0") == [first]
        assert fed.answers("dev0") == []
        aggregator.resume()
        await fed.until("the update merged", lambda: fed.accepted_in_audit() >= 1)
        agent.start()
        assert await agent.exited(60) == 0, fed.logs()
        assert await aggregator.exited(60) == 0, fed.logs()
    result = fed.check_exactly_once(["dev0"])
    assert len(result.acked) == len(result.merged) == 3
    assert result.merged.count(first) == 1
    repeats = [e for e in fed.audit() if isinstance(e, UpdateEntry) and e.decision == "duplicate"]
    assert first in {e.update_id for e in repeats}
    [answer] = [a for a in fed.answers("dev0") if a.update_id == first]
    assert answer.accepted and answer.duplicate and answer.version == 1
    assert fed.pending("dev0") == []
    assert "re-sending unanswered" in agent.text()
    print(f"agent kill: acked {len(result.acked)}, merged {len(result.merged)}")


def garbage(federation: str) -> list[tuple[str, bytes]]:
    """Hostile payloads for the update topics: (client id of the topic, payload)."""
    shapes = adapter_shapes(attach_lora(build_model(ModelRef(name="tiny")), LoraSpec()))
    names = sorted(shapes)

    def update(**changes: object) -> bytes:
        delta = {n: torch.full(s, 0.01) for n, s in shapes.items()}
        fields: dict[str, object] = {
            "client_id": "dev0",
            "task_id": "task-1",
            "base_version": 0,
            "num_samples": 2,
            "delta": delta,
        }
        return codec.encode(Update.model_validate(fields | changes))

    nan = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
    wrong_shape = {n: torch.zeros(3, 3) for n in names}
    good = update()
    huge_chunk = msgpack.packb(
        {
            "kind": "chunk",
            "schema_version": 1,
            "transfer_id": "t",
            "index": 0,
            "total": 2,
            "size": 2**60,
            "xxh3": "0" * 16,
            "data": b"xy",
        }
    )
    return [
        ("dev0", os.urandom(600)),
        ("dev0", b"\x93not msgpack at all"),
        ("dev0", good[: len(good) // 2]),
        ("dev0", update(delta=nan)),
        ("dev0", update(delta=wrong_shape)),
        ("dev0", update(base_version=999)),
        ("dev0", update(task_id="another")),
        ("dev0", good[:40] + b"\xc6" + struct.pack(">I", 0xFFFFFFF0)),
        ("dev0", huge_chunk),
        ("dev0", codec.encode(Status(client_id="dev0", state="online"))),
        ("dev0", update(client_id="dev1")),
        ("mallory", update(client_id="mallory")),
        ("dev0", os.urandom(100_000)),
    ]


async def test_garbage_from_mosquitto_pub_is_refused_while_good_updates_merge(
    durable_broker: MosquittoProcess, federation_of: MakeFederation, tmp_path: Path
) -> None:
    settings = AGGREGATOR | {
        "strategy": {"name": "fedasync"},
        "known_clients": ["dev0"],
        "max_message_bytes": 65536,
    }
    if shutil.which("mosquitto_pub") is None:
        message = "mosquitto_pub (mosquitto-clients) is not installed"
        if os.environ.get("EDGEFED_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(f"{message}, and EDGEFED_REQUIRE_MOSQUITTO=1")
        pytest.skip(message)
    fed = federation_of(durable_broker, settings, AGENT)
    aggregator = fed.aggregator(max_versions=5).start()
    agent = fed.agent("dev0", max_updates=5).start()
    payloads = garbage(fed.name)
    await fed.until("a first merge", lambda: fed.accepted_in_audit() >= 1)
    for index, (client, payload) in enumerate(payloads):
        path = tmp_path / f"garbage-{index}.bin"
        path.write_bytes(payload)
        publish = await asyncio.create_subprocess_exec(
            "mosquitto_pub",
            *("-h", durable_broker.host, "-p", str(durable_broker.port)),
            *("-q", "1", "-t", topics.update(fed.name, client), "-f", str(path)),
        )
        assert await asyncio.wait_for(publish.wait(), 10) == 0
    assert await aggregator.exited(90) == 0, fed.logs()
    assert await agent.exited(60) == 0, fed.logs()
    entries = fed.audit()
    refused = [e for e in entries if isinstance(e, UpdateEntry) and e.decision == "rejected"]
    assert len(refused) == len(payloads), refused
    assert {e.reason for e in refused} == {
        "malformed",
        "too_large",
        "non_finite",
        "wrong_shape",
        "future_version",
        "wrong_task",
        "unknown_client",
    }
    last_refusal = max(i for i, e in enumerate(entries) if e in refused)
    merges_after = [e for e in entries[last_refusal:] if isinstance(e, MergeEntry)]
    result = fed.check_exactly_once(["dev0"])
    assert len(result.merged) == 5
    assert merges_after, "no good update merged after the garbage"
    print(f"garbage: {len(refused)} refused, {len(result.merged)} merged")


async def test_an_update_the_embedded_broker_lost_is_sent_again_when_the_aggregator_returns(
    tmp_path: Path, federation: str
) -> None:
    """amqtt drops what it queued for the aggregator's session while the aggregator was down;
    the agent sends its unanswered update again as soon as the task comes back, not after
    its ack timeout (here two minutes)."""
    async with embedded_broker() as url:
        fed = Federation(
            tmp_path,
            url,
            federation,
            AGGREGATOR | {"strategy": {"name": "fedbuff", "buffer_size": 1}},
            AGENT | {"ack_timeout_s": 120.0, "slowdown": 1.0},
        )
        try:
            aggregator = fed.aggregator(max_versions=0).start()
            fed.agent("dev0", max_updates=0).start()
            await fed.until("2 updates accepted", lambda: fed.accepted_in_audit() >= 2, 120)
            aggregator.kill()
            await fed.until("an update sent into the outage", lambda: bool(fed.pending("dev0")))
            waiting = fed.pending("dev0")
            aggregator.start()
            await fed.until(
                "the aggregator back", lambda: aggregator.text().count(" ready at ") >= 2
            )
            back = time.monotonic()
            answered = lambda: {a.update_id for a in fed.answers("dev0")} >= set(waiting)  # noqa: E731
            await fed.until("the waiting update answered", answered, 30)
            took = time.monotonic() - back
        finally:
            for proc in fed.procs:
                proc.cleanup()
    assert took < 10, f"answered {took:.1f} s after the aggregator was back"
    assert all(a.accepted for a in fed.answers("dev0") if a.update_id in waiting)
    print(f"embedded broker: an update sent during the outage answered {took:.1f} s after")
