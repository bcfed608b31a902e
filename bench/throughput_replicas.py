"""The throughput benchmark's replica variant: the merger behind two intake replicas.

The same 1 MiB updates as the end-to-end variant, published by the same process of devices
(encoded before the clock starts) whole, as devices behind replicas send them (a shared
subscription hands out messages, not updates), now taken in by two intake replicas in processes
of their own (:mod:`aggregator.intake_replica`), each sending pre-sums of eight device updates
to the merger in this process. The clock stops when the merger has merged every device
update. The merger's CPU per device update is what one event loop must sustain; the
replicas' CPU is reported beside it, since a host must supply it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch

from aggregator.config import AggregatorConfig
from aggregator.connections import intake_transport
from aggregator.intake_replica import IntakeReplica
from aggregator.service import AggregatorService
from bench.throughput import (
    PAYLOAD_BYTES,
    REPLICA_PRESUM_SIZE,
    EventLike,
    PublishJob,
    Trial,
    e2e_config,
    merged,
    process_cpu_s,
    publishers_process,
    random_delta,
)
from edgefed.transport.config import TransportConfig
from edgefed.transport.mqtt import MqttTransport

REPLICAS = 2
PRESUM_SIZE = REPLICA_PRESUM_SIZE


def _replica_process(config: dict[str, Any], url: str, ready: EventLike) -> None:
    """Entry point of one replica's process: take updates until killed."""
    torch.set_num_threads(1)  # as the other processes of the benchmark
    asyncio.run(_serve(AggregatorConfig.model_validate(config), url, ready))


async def _serve(config: AggregatorConfig, url: str, ready: EventLike) -> None:
    async with MqttTransport(intake_transport(config, url=url)) as transport:
        replica = IntakeReplica(config, transport)
        serving = asyncio.create_task(replica.run())
        while not replica.taking:
            if serving.done():
                serving.result()
                return
            await asyncio.sleep(0.01)
        ready.set()
        await serving


@contextlib.asynccontextmanager
async def _replicas(merger: AggregatorConfig, url: str) -> AsyncIterator[list[int]]:
    """Start the replicas' processes; yield their pids once each takes its share."""
    spawn = multiprocessing.get_context("spawn")
    processes, readies = [], []
    try:
        for index in range(REPLICAS):  # started together: each imports torch on its own
            config = merger.model_copy(
                update={"role": "intake", "site_id": f"intake-{index}", "intake": "direct",
                        "presum_size": PRESUM_SIZE},
            )  # fmt: skip
            readies.append(ready := spawn.Event())
            args = (config.model_dump(mode="json"), url, ready)
            process = spawn.Process(target=_replica_process, args=args, daemon=True)
            process.start()
            processes.append(process)
        for ready in readies:
            if not await asyncio.to_thread(ready.wait, 120.0):
                raise AssertionError("an intake replica did not start taking updates in 120 s")
        yield [process.pid for process in processes if process.pid is not None]
    finally:
        for process in processes:
            process.kill()
            process.join()


def _cpu_s(pids: list[int]) -> float:
    return sum(process_cpu_s(pid) or 0.0 for pid in pids)


async def replicas_trial(
    url: str, *, count: int, publishers: int, broker_pid: int | None = None
) -> Trial:
    """MB/s and CPU per device update with the intake split over two replicas."""
    federation = f"bench-{uuid.uuid4().hex[:8]}"
    config = e2e_config(federation, count=count, buffer_size=2, max_payload=256 * 1024)
    config = config.model_copy(update={"intake": "replicas"})
    transport = TransportConfig(url=url, client_id=f"{federation}-aggregator")
    async with MqttTransport(transport) as agg:
        service = AggregatorService(config, agg)
        serving = asyncio.create_task(service.run())
        await service.ready.wait()
        job = PublishJob(  # whole updates, as devices send them behind replicas
            url=url, topic_prefix=federation, count=count, publishers=publishers,
            max_payload=2 * PAYLOAD_BYTES, delta=random_delta(service.current),
            task_id=config.task_id, encode_first=True,
        )  # fmt: skip
        async with _replicas(config, url) as pids, _clocked(job, broker_pid, pids) as run:
            await merged(service, serving, count)
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    if sorted(service.results.merges.values()) != [1] * count:
        raise AssertionError("a device update was not merged exactly once")
    return run.trial


class _Clock:
    trial: Trial


@contextlib.asynccontextmanager
async def _clocked(
    job: PublishJob, broker_pid: int | None, pids: list[int]
) -> AsyncIterator[_Clock]:
    """Run the publishers; the trial's figures, the replicas' CPU added, on the way out."""
    clock = _Clock()
    async with publishers_process(job, broker_pid) as run:
        replicas_before = _cpu_s(pids)
        run.go()
        yield clock
        run.stop()
        replicas_s = _cpu_s(pids) - replicas_before
    trial = run.trial(job.count)
    clock.trial = Trial(
        mbps=trial.mbps,
        receiver_cpu_ms=trial.receiver_cpu_ms,
        publishers_cpu_ms=trial.publishers_cpu_ms,
        broker_cpu_ms=trial.broker_cpu_ms,
        replicas_cpu_ms=replicas_s / job.count * 1e3,
    )
