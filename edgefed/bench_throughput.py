"""End-to-end update throughput against the raw broker, measured side by side.

Raw: bare MQTT clients publish 1 MiB payloads at QoS 1 to a topic one subscriber
reads; no codec, no chunking. End to end: agents publish 1 MiB LoRA updates through
:class:`~edgefed.transport.MqttTransport` (encode, chunk), and a real
:class:`~aggregator.service.AggregatorService` reassembles, decodes, validates, merges
(FedBuff) and acks them; the clock stops when the last one is merged. Both sides use the
same publishers, payload size and broker, and alternate trial by trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from dataclasses import dataclass

import torch
from tqdm import tqdm

from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from edgefed.broker import MosquittoProcess
from edgefed.transport import MqttTransport, TransportConfig, raw_client
from schemas import topics
from schemas.messages import LoraSpec, ModelRef, TensorMap, Update

PAYLOAD_BYTES = 1024 * 1024
LORA_RANK = 512
"""The tiny model's q,v adapter at this rank is exactly 1 MiB of float32 (2 layers x 2
modules x (r x 64 + 64 x r) x 4 bytes)."""


@dataclass(frozen=True)
class ThroughputResult:
    """Median MB/s of both paths over the trials, and their ratio."""

    payload_bytes: int
    updates: int
    publishers: int
    buffer_size: int
    trials: int
    raw_mbps: float
    e2e_mbps: float
    """End to end with the default ``max_payload`` (256 KiB chunks)."""
    e2e_whole_mbps: float
    """End to end with ``max_payload`` raised above the update size (one frame each)."""
    raw_trials: tuple[float, ...]
    e2e_trials: tuple[float, ...]
    e2e_whole_trials: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """End-to-end throughput (chunked) as a fraction of the raw broker's."""
        return self.e2e_mbps / self.raw_mbps

    @property
    def ratio_whole(self) -> float:
        """End-to-end throughput (unchunked) as a fraction of the raw broker's."""
        return self.e2e_whole_mbps / self.raw_mbps

    def to_json(self) -> dict[str, object]:
        """The documented JSON row."""
        return {
            "payload_bytes": self.payload_bytes,
            "updates": self.updates,
            "publishers": self.publishers,
            "buffer_size": self.buffer_size,
            "trials": self.trials,
            "raw_mbps": round(self.raw_mbps, 1),
            "e2e_mbps": round(self.e2e_mbps, 1),
            "e2e_whole_mbps": round(self.e2e_whole_mbps, 1),
            "ratio": round(self.ratio, 3),
            "ratio_whole": round(self.ratio_whole, 3),
            "raw_trials": [round(x, 1) for x in self.raw_trials],
            "e2e_trials": [round(x, 1) for x in self.e2e_trials],
            "e2e_whole_trials": [round(x, 1) for x in self.e2e_whole_trials],
        }


async def raw_trial(url: str, *, count: int, publishers: int) -> float:
    """MB/s of ``count`` 1 MiB QoS 1 payloads from ``publishers`` clients to one reader."""
    run = uuid.uuid4().hex[:8]
    topic = f"edgefed/bench-{run}/raw"
    payload = bytes(PAYLOAD_BYTES)
    async with contextlib.AsyncExitStack() as stack:
        reader = await stack.enter_async_context(raw_client(url, f"bench-{run}-reader"))
        senders = [
            await stack.enter_async_context(raw_client(url, f"bench-{run}-pub{i}"))
            for i in range(publishers)
        ]
        await reader.subscribe(topic, qos=1)
        done = asyncio.Event()

        async def read() -> None:
            received = 0
            async for _ in reader.messages:
                received += 1
                if received == count:
                    done.set()
                    return

        reading = asyncio.create_task(read())
        started = time.perf_counter()

        async def send(client_index: int) -> None:
            for _ in range(client_index, count, publishers):
                await senders[client_index].publish(topic, payload, qos=1)

        await asyncio.gather(*(send(i) for i in range(publishers)))
        await done.wait()
        elapsed = time.perf_counter() - started
        await reading
    return count * PAYLOAD_BYTES / elapsed / 1e6


async def e2e_trial(
    url: str, *, count: int, publishers: int, buffer_size: int, max_payload: int = 256 * 1024
) -> float:
    """MB/s of ``count`` 1 MiB updates from publish until the aggregator merged them all.

    Frames above ``max_payload`` are chunked (the product's default is 256 KiB).
    """
    federation = f"bench-{uuid.uuid4().hex[:8]}"
    config = AggregatorConfig(
        federation=federation,
        model=ModelRef(name="tiny"),
        lora=LoraSpec(rank=LORA_RANK),
        strategy=StrategySettings(name="fedbuff", buffer_size=buffer_size),
        max_staleness=count // buffer_size + 2,
        eval_every=1_000_000,
        eval_data="synthetic:n=8,seed=999",  # scored once at start; not what is measured
        max_message_bytes=8 * PAYLOAD_BYTES,
        max_payload=max_payload,
    )
    agg = MqttTransport(
        TransportConfig(url=url, client_id=f"{federation}-aggregator", max_payload=max_payload)
    )
    async with agg, contextlib.AsyncExitStack() as stack:
        service = AggregatorService(config, agg)
        serving = asyncio.create_task(service.run())
        await service.ready.wait()
        shapes = service.current
        senders = [
            await stack.enter_async_context(
                MqttTransport(
                    TransportConfig(
                        url=url, client_id=f"{federation}-dev{i}", max_payload=max_payload
                    )
                )
            )
            for i in range(publishers)
        ]
        delta = _delta(shapes)
        if sum(t.numel() * 4 for t in delta.values()) != PAYLOAD_BYTES:
            raise AssertionError("the benchmark adapter is not 1 MiB")
        updates = [
            Update(
                client_id=f"dev{i % publishers}",
                task_id=config.task_id,
                base_version=0,
                num_samples=1,
                delta=delta,
            )
            for i in range(count)
        ]
        started = time.perf_counter()

        async def send(client_index: int) -> None:
            transport = senders[client_index]
            for update in updates[client_index::publishers]:
                await transport.publish(topics.update(federation, update.client_id), update)

        await asyncio.gather(*(send(i) for i in range(publishers)))
        while len(service.results.merges) < count:
            if serving.done():
                serving.result()
                raise AssertionError("the aggregator stopped before merging every update")
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - started
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    if sorted(service.results.merges.values()) != [1] * count:
        raise AssertionError("an update was not merged exactly once")
    return count * PAYLOAD_BYTES / elapsed / 1e6


def _delta(shapes: TensorMap) -> TensorMap:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(t.shape, generator=generator) * 1e-3 for name, t in shapes.items()}


async def bench_throughput(
    url: str, *, count: int = 64, publishers: int = 4, buffer_size: int = 8, trials: int = 3
) -> ThroughputResult:
    """Alternate raw and end-to-end trials against the broker at ``url``."""
    raw: list[float] = []
    e2e: list[float] = []
    whole: list[float] = []
    for _ in tqdm(range(trials), desc="raw vs end-to-end trials", unit="trial"):
        raw.append(await raw_trial(url, count=count, publishers=publishers))
        e2e.append(
            await e2e_trial(url, count=count, publishers=publishers, buffer_size=buffer_size)
        )
        whole.append(
            await e2e_trial(
                url,
                count=count,
                publishers=publishers,
                buffer_size=buffer_size,
                max_payload=2 * PAYLOAD_BYTES,
            )
        )
    return ThroughputResult(
        payload_bytes=PAYLOAD_BYTES,
        updates=count,
        publishers=publishers,
        buffer_size=buffer_size,
        trials=trials,
        raw_mbps=statistics.median(raw),
        e2e_mbps=statistics.median(e2e),
        e2e_whole_mbps=statistics.median(whole),
        raw_trials=tuple(raw),
        e2e_trials=tuple(e2e),
        e2e_whole_trials=tuple(whole),
    )


def throughput_run(*, count: int = 64, trials: int = 3) -> ThroughputResult:
    """Run against a private Mosquitto (``broker_config/dev.conf``) on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with MosquittoProcess() as broker:
            return asyncio.run(bench_throughput(broker.url, count=count, trials=trials))
    finally:
        torch.set_num_threads(threads)
