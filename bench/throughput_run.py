"""``bench throughput``: every variant, alternating trial by trial against one broker.

The variants' trials live in :mod:`bench.throughput` (raw, end to end) and
:mod:`bench.throughput_replicas` (behind intake replicas); this runs them side by side.
"""

from __future__ import annotations

import asyncio
import functools

import torch
from tqdm import tqdm

from bench.throughput import (
    PAYLOAD_BYTES,
    VARIANTS,
    ThroughputResult,
    Trial,
    e2e_trial,
    raw_trial,
)
from bench.throughput_replicas import replicas_trial
from edgefed.transport.broker import MosquittoProcess


async def bench_throughput(
    url: str,
    *,
    count: int = 64,
    publishers: int = 4,
    buffer_size: int = 8,
    trials: int = 3,
    broker_pid: int | None = None,
) -> ThroughputResult:
    """Alternate the raw and end-to-end variants, trial by trial, against ``url``."""
    runs: dict[str, list[Trial]] = {v: [] for v in VARIANTS}
    e2e = functools.partial(
        e2e_trial, url, count=count, publishers=publishers, broker_pid=broker_pid
    )
    for _ in tqdm(range(trials), desc="raw vs end-to-end trials", unit="trial"):
        runs["raw"].append(
            await raw_trial(url, count=count, publishers=publishers, broker_pid=broker_pid)
        )
        runs["e2e"].append(await e2e(buffer_size=buffer_size))
        runs["e2e_encode_first"].append(await e2e(buffer_size=buffer_size, encode_first=True))
        runs["e2e_whole"].append(await e2e(buffer_size=buffer_size, max_payload=2 * PAYLOAD_BYTES))
        runs["e2e_replicas"].append(
            await replicas_trial(url, count=count, publishers=publishers, broker_pid=broker_pid)
        )
    return ThroughputResult(
        payload_bytes=PAYLOAD_BYTES,
        updates=count,
        publishers=publishers,
        buffer_size=buffer_size,
        trials=runs,
    )


def throughput_run(*, count: int = 64, trials: int = 3) -> ThroughputResult:
    """Run against a private Mosquitto (``broker_config/dev.conf``) on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with MosquittoProcess() as broker:
            return asyncio.run(
                bench_throughput(broker.url, count=count, trials=trials, broker_pid=broker.pid)
            )
    finally:
        torch.set_num_threads(threads)
