"""End-to-end update throughput against the raw broker, measured side by side.

Raw: bare MQTT clients publish 1 MiB payloads at QoS 1 to a topic one subscriber
reads; no codec, no chunking. End to end: devices publish 1 MiB LoRA updates through
:class:`~edgefed.transport.mqtt.MqttTransport` (encode, chunk), and a real
:class:`~aggregator.service.AggregatorService` reassembles, decodes, validates, merges
(FedBuff), acks them and publishes a new global every ``buffer_size`` updates; the clock
stops when the last one is merged. On both sides the publishers run in a process of their
own, as devices do, and the receiver (bare subscriber or aggregator) in this one; same
publisher count, payload size and broker, alternating trial by trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.results import Results
from aggregator.service import AggregatorService
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import encode_frames
from edgefed.transport.mqtt import MqttTransport
from edgefed.transport.raw import raw_client
from schemas import topics
from schemas.messages import LoraSpec, ModelRef, TensorMap, Update


class EventLike(Protocol):
    """The two calls used of a ``multiprocessing`` event."""

    def set(self) -> None:
        """Signal every waiter."""
        ...

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or ``timeout``; whether it was set."""
        ...


class ValueLike(Protocol):
    """A ``multiprocessing`` shared double."""

    value: float


PAYLOAD_BYTES = 1024 * 1024
REPLICA_PRESUM_SIZE = 8
"""Device updates per pre-sum in the replica variant (:mod:`bench.throughput_replicas`)."""
LORA_RANK = 512
"""The tiny model's q,v adapter at this rank is exactly 1 MiB of float32 (2 layers x 2
modules x (r x 64 + 64 x r) x 4 bytes)."""


@dataclass(frozen=True)
class Trial:
    """One timed run: throughput, and the CPU each process spent per update."""

    mbps: float
    receiver_cpu_ms: float
    """CPU time of this process (the bare subscriber, or the aggregator) per message,
    between the publishers' start and the last message handled."""
    publishers_cpu_ms: float
    """CPU time of the publishers' process per message, from its start to its last ack."""
    broker_cpu_ms: float | None
    """The broker's CPU time per message over the receiver's window; None where the
    broker's process cannot be read (not ours, or no ``/proc``)."""
    replicas_cpu_ms: float | None = None
    """The intake replicas' CPU time per message (the replica variant only)."""

    @property
    def total_cpu_ms(self) -> float | None:
        """CPU per message of every process involved: what a shared host must supply."""
        if self.broker_cpu_ms is None:
            return None
        replicas = self.replicas_cpu_ms or 0.0
        return self.receiver_cpu_ms + self.publishers_cpu_ms + self.broker_cpu_ms + replicas


VARIANTS = ("raw", "e2e", "e2e_encode_first", "e2e_whole", "e2e_replicas")
"""raw broker; end to end with 256 KiB chunks; the same with encoding before the clock
(:attr:`PublishJob.encode_first`); end to end with ``max_payload`` above the update size;
encoded first, taken in by two intake replicas (:mod:`bench.throughput_replicas`)."""


@dataclass(frozen=True)
class ThroughputResult:
    """Every variant's trials, medians, and their ratios to the raw broker."""

    payload_bytes: int
    updates: int
    publishers: int
    buffer_size: int
    trials: dict[str, list[Trial]]

    def mbps(self, variant: str) -> float:
        """Median MB/s of ``variant`` over its trials."""
        return statistics.median(t.mbps for t in self.trials[variant])

    def cpu_ms(self, variant: str, process: str = "receiver") -> float | None:
        """Median CPU ms per update of ``variant`` in one process, or in all of them.

        ``process`` is receiver, publishers, broker or total; None when a trial could not
        read it.
        """
        values = [getattr(t, f"{process}_cpu_ms") for t in self.trials[variant]]
        return None if None in values else round(statistics.median(values), 2)

    @property
    def cpu_bound_ratio(self) -> float | None:
        """The throughput ratio the CPU totals allow when the host's cores are the limit.

        Raw's CPU per update over end to end's (chunked), every process counted.
        """
        raw, e2e = self.cpu_ms("raw", "total"), self.cpu_ms("e2e", "total")
        return None if raw is None or not e2e else round(raw / e2e, 3)

    @property
    def ratio(self) -> float:
        """End-to-end throughput (chunked, the default) as a fraction of the raw broker's."""
        return self.mbps("e2e") / self.mbps("raw")

    def to_json(self) -> dict[str, object]:
        """The documented JSON row."""
        raw = self.mbps("raw")
        return {
            "payload_bytes": self.payload_bytes,
            "updates": self.updates,
            "publishers": self.publishers,
            "buffer_size": self.buffer_size,
            "trials": len(self.trials["raw"]),
            **{f"{v}_mbps": round(self.mbps(v), 1) for v in VARIANTS},
            "ratio": round(self.ratio, 3),
            **{f"ratio_{v}": round(self.mbps(v) / raw, 3) for v in VARIANTS[2:]},
            "ratio_cpu_bound": self.cpu_bound_ratio,
            # The aggregator's CPU per chunked update beside a bare subscriber's, same run.
            "receiver_cpu_ms": self.cpu_ms("e2e"),
            "bare_cpu_ms": self.cpu_ms("raw"),
            # Behind two intake replicas: the merger's CPU per device update, and theirs.
            "merger_cpu_ms": self.cpu_ms("e2e_replicas"),
            "replicas_presum_size": REPLICA_PRESUM_SIZE,
            "replicas_cpu_ms": self.cpu_ms("e2e_replicas", "replicas"),
            **{
                f"{v}_{process}_cpu_ms": self.cpu_ms(v, process)
                for v in VARIANTS
                for process in ("receiver", "publishers", "broker", "total")
            },
            **{f"{v}_trials": [round(t.mbps, 1) for t in self.trials[v]] for v in VARIANTS},
        }


@dataclass(frozen=True)
class PublishJob:
    """What the publishers' process sends: raw payloads, or updates through the product."""

    url: str
    topic_prefix: str
    """Raw: the topic; end to end: the federation."""
    count: int
    publishers: int
    max_payload: int = 256 * 1024
    delta: TensorMap | None = None
    """End to end: the update every publisher sends; None sends raw payloads."""
    task_id: str = ""
    encode_first: bool = False
    """End to end: encode and chunk every update before the clock starts, then send the
    frames with bare clients. In a fleet each device encodes on its own CPU; here all
    publishers share one, so this isolates what the broker and the aggregator sustain."""


def _publisher_process(job: PublishJob, ready: EventLike, go: EventLike, cpu: ValueLike) -> None:
    """Entry point of the publishers' process: connect, say ready, publish on ``go``.

    Leaves the CPU seconds spent from ``go`` to the last publish in ``cpu``.
    """
    torch.set_num_threads(1)
    asyncio.run(_publish(job, ready, go, cpu))


async def _publish(job: PublishJob, ready: EventLike, go: EventLike, cpu: ValueLike) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if job.delta is None:
            clients = [
                await stack.enter_async_context(raw_client(job.url, f"{job.topic_prefix}-pub{i}"))
                for i in range(job.publishers)
            ]
            payload = bytes(PAYLOAD_BYTES)

            async def send(index: int) -> None:
                for _ in range(index, job.count, job.publishers):
                    await clients[index].publish(job.topic_prefix, payload, qos=1)

        elif job.encode_first:
            clients = [
                await stack.enter_async_context(raw_client(job.url, f"{job.topic_prefix}-dev{i}"))
                for i in range(job.publishers)
            ]
            framed = [list(_frames(job, i)) for i in range(job.count)]

            async def send(index: int) -> None:
                for frames in framed[index :: job.publishers]:
                    await asyncio.gather(
                        *(clients[index].publish(topic, data, qos=1) for topic, data in frames)
                    )

        else:
            transports = [
                await stack.enter_async_context(
                    MqttTransport(
                        TransportConfig(
                            url=job.url,
                            client_id=f"{job.topic_prefix}-dev{i}",
                            max_payload=job.max_payload,
                        )
                    )
                )
                for i in range(job.publishers)
            ]
            updates = [_update(job, i) for i in range(job.count)]

            async def send(index: int) -> None:
                for update in updates[index :: job.publishers]:
                    await transports[index].publish(
                        topics.update(job.topic_prefix, update.client_id), update
                    )

        ready.set()
        await asyncio.to_thread(go.wait)
        started = time.process_time()
        await asyncio.gather(*(send(i) for i in range(job.publishers)))
        cpu.value = time.process_time() - started


def _update(job: PublishJob, index: int) -> Update:
    """The ``index``-th update of ``job``; publishers take turns by index."""
    if job.delta is None:
        raise AssertionError("a raw job sends no updates")
    return Update(
        client_id=f"dev{index % job.publishers}",
        task_id=job.task_id,
        base_version=0,
        num_samples=1,
        delta=job.delta,
    )


def _frames(job: PublishJob, index: int) -> Iterator[tuple[str, bytes]]:
    """Update ``index`` of ``job`` as the (topic, payload) frames the transport would send."""
    update = _update(job, index)
    return encode_frames(
        topics.update(job.topic_prefix, update.client_id),
        update,
        retain=False,
        chunk_topic=None,
        compression="none",
        max_payload=job.max_payload,
        max_message_bytes=8 * PAYLOAD_BYTES,
    )


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used; None if it cannot be read."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of stat(5), counted after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Run:
    """The clock of one trial: releases the publishers, then reads every process's CPU."""

    def __init__(self, start: EventLike, publishers_cpu: ValueLike, broker_pid: int | None) -> None:
        self._start = start
        self._publishers_cpu = publishers_cpu
        self._broker_pid = broker_pid
        self._begin: tuple[float, float, float | None] = (0.0, 0.0, None)
        self._measured: tuple[float, float, float | None] = (0.0, 0.0, None)

    def go(self) -> None:
        """Start the clock and release the publishers."""
        self._begin = (time.perf_counter(), time.process_time(), process_cpu_s(self._broker_pid))
        self._start.set()

    def stop(self) -> None:
        """Stop the clock: the receiver handled the last message."""
        wall, cpu, broker = self._begin
        now = process_cpu_s(self._broker_pid)
        self._measured = (
            time.perf_counter() - wall,
            time.process_time() - cpu,
            None if now is None or broker is None else now - broker,
        )

    def trial(self, count: int) -> Trial:
        """The trial's figures; call once the publishers' process has ended."""
        elapsed, receiver, broker = self._measured
        return Trial(
            mbps=count * PAYLOAD_BYTES / elapsed / 1e6,
            receiver_cpu_ms=receiver / count * 1e3,
            publishers_cpu_ms=self._publishers_cpu.value / count * 1e3,
            broker_cpu_ms=None if broker is None else broker / count * 1e3,
        )


@contextlib.asynccontextmanager
async def publishers_process(job: PublishJob, broker_pid: int | None) -> AsyncIterator[_Run]:
    """Start the publishers' process; yield the run's clock once they are connected.

    A separate process, as devices are: the clock then measures what the receiving side
    (a bare subscriber, or the aggregator) and the broker sustain, and the publishers'
    encoding does not share an event loop with the aggregator.
    """
    spawn = multiprocessing.get_context("spawn")
    ready, start, cpu = spawn.Event(), spawn.Event(), spawn.Value("d", 0.0)
    process = spawn.Process(target=_publisher_process, args=(job, ready, start, cpu), daemon=True)
    process.start()
    try:
        if not await asyncio.to_thread(ready.wait, 120.0):
            raise AssertionError("the publishers did not connect within 120 s")
        yield _Run(start, cpu, broker_pid)
        await asyncio.to_thread(process.join, 120.0)
        if process.exitcode != 0:
            raise AssertionError(f"the publishers' process exited with {process.exitcode}")
    finally:
        if process.is_alive():
            process.kill()
            process.join()


async def raw_trial(
    url: str, *, count: int, publishers: int, broker_pid: int | None = None
) -> Trial:
    """MB/s of ``count`` 1 MiB QoS 1 payloads from ``publishers`` clients to one reader.

    ``broker_pid`` (a broker of ours) adds the broker's CPU to the figures.
    """
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    topic = f"edgefed/{run_id}/raw"
    job = PublishJob(url=url, topic_prefix=topic, count=count, publishers=publishers)
    async with (
        raw_client(url, f"{run_id}-reader") as reader,
        publishers_process(job, broker_pid) as run,
    ):
        await reader.subscribe(topic, qos=1)
        received = 0
        run.go()
        async for _ in reader.messages:
            received += 1
            if received == count:
                break
        run.stop()
    return run.trial(count)


async def e2e_trial(
    url: str,
    *,
    count: int,
    publishers: int,
    buffer_size: int,
    max_payload: int = 256 * 1024,
    encode_first: bool = False,
    broker_pid: int | None = None,
) -> Trial:
    """MB/s of ``count`` 1 MiB updates from publish until the aggregator merged them all.

    Frames above ``max_payload`` are chunked (the product's default is 256 KiB). With
    ``encode_first`` the devices' encoding happens before the clock starts (see
    :class:`PublishJob`). ``broker_pid`` as in :func:`raw_trial`.
    """
    federation = f"bench-{uuid.uuid4().hex[:8]}"
    config = e2e_config(federation, count=count, buffer_size=buffer_size, max_payload=max_payload)
    agg = MqttTransport(
        TransportConfig(url=url, client_id=f"{federation}-aggregator", max_payload=max_payload)
    )
    async with agg:
        service = AggregatorService(config, agg)
        serving = asyncio.create_task(service.run())
        await service.ready.wait()
        delta = random_delta(service.current)
        if sum(t.numel() * 4 for t in delta.values()) != PAYLOAD_BYTES:
            raise AssertionError("the benchmark adapter is not 1 MiB")
        job = PublishJob(
            url=url,
            topic_prefix=federation,
            count=count,
            publishers=publishers,
            max_payload=max_payload,
            delta=delta,
            task_id=config.task_id,
            encode_first=encode_first,
        )
        async with publishers_process(job, broker_pid) as run:
            run.go()
            await merged(service, serving, count)
            run.stop()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    if sorted(service.results.merges.values()) != [1] * count:
        raise AssertionError("an update was not merged exactly once")
    return run.trial(count)


def e2e_config(
    federation: str, *, count: int, buffer_size: int, max_payload: int
) -> AggregatorConfig:
    """FedBuff on the 1 MiB tiny adapter, lenient enough that every update merges."""
    return AggregatorConfig(
        federation=federation,
        model=ModelRef(name="tiny"),
        lora=LoraSpec(rank=LORA_RANK),
        strategy=StrategySettings(name="fedbuff", buffer_size=buffer_size),
        max_staleness=count // buffer_size + 2,
        eval_every=0,  # scoring is not what is measured
        eval_data="synthetic:n=8,seed=999",
        max_message_bytes=8 * PAYLOAD_BYTES,
        max_payload=max_payload,
    )


async def merged(service: AggregatorService, serving: asyncio.Task[Results], count: int) -> None:
    """Return once ``count`` updates are merged; fail as soon as the aggregator stops.

    Raises:
        AssertionError: The aggregator ended first (its own error, if any, propagates).
    """
    while len(service.results.merges) < count:
        if serving.done():
            serving.result()
            raise AssertionError("the aggregator stopped before merging every update")
        await asyncio.sleep(0.002)


def random_delta(shapes: TensorMap) -> TensorMap:
    """A fixed small random delta shaped like ``shapes``: every trial sends the same bytes."""
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(t.shape, generator=generator) * 1e-3 for name, t in shapes.items()}
