"""``edgefed bench codec``: the wire codec against a plain memory copy, side by side.

Absolute GB/s depend on the machine and on what else runs on it; the ratio of the codec to
a plain memory copy of the same bytes, measured in the same process and interleaved
sample by sample, is what carries over (docs/architecture.md §11).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from schemas.codec import decode, encode
from schemas.messages import Update

SIZES = (64 * 1024, 1024 * 1024, 16 * 1024 * 1024)
_SAMPLE_BYTES = 4 * 1024 * 1024
"""Small payloads are timed in batches of about this many bytes, so a sample is not noise."""


@dataclass(frozen=True, slots=True)
class CodecResult:
    """Throughput of one payload size: codec round trip against a plain copy."""

    size_bytes: int
    roundtrip_gbps: float
    memcpy_gbps: float
    memcpy_method: str

    @property
    def ratio_vs_memcpy(self) -> float:
        """Round-trip throughput as a fraction of copy throughput (1.0 = as fast as memcpy)."""
        return self.roundtrip_gbps / self.memcpy_gbps

    def to_json(self) -> dict[str, float | int]:
        """The documented JSON row."""
        return {
            "size_bytes": self.size_bytes,
            "roundtrip_gbps": round(self.roundtrip_gbps, 3),
            "memcpy_gbps": round(self.memcpy_gbps, 3),
            "ratio_vs_memcpy": round(self.ratio_vs_memcpy, 3),
        }


def _roundtrip(message: Update) -> torch.Tensor:
    decoded = decode(encode(message))
    if not isinstance(decoded, Update):
        raise TypeError(f"decoded a {decoded.kind} message, expected an update")
    return decoded.delta["w"]


def _copies(src: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Ways to copy ``src``'s bytes into a preallocated buffer; the fastest is the baseline."""
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    src_view = src.numpy().data.cast("B")
    dst_view = dst.numpy().data.cast("B")
    src_ptr, dst_ptr = src.data_ptr(), dst.data_ptr()

    def slice_assign() -> None:
        dst_view[:] = src_view

    return {
        "torch copy_ (1 thread)": lambda: dst.copy_(src),
        "ctypes.memmove": lambda: ctypes.memmove(dst_ptr, src_ptr, nbytes),
        "memoryview slice": slice_assign,
    }


def _timed(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``fn``, over ``inner`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def bench_codec(size_bytes: int, *, repeat: int) -> CodecResult:
    """Median round-trip and copy throughput for one float32 update of ``size_bytes``."""
    generator = torch.Generator().manual_seed(size_bytes)
    tensor = torch.randn(size_bytes // 4, generator=generator)
    message = Update(
        client_id="bench", task_id="bench", base_version=0, num_samples=1, delta={"w": tensor}
    )
    if not torch.equal(_roundtrip(message), tensor):
        raise AssertionError("codec round trip changed the tensor")
    copies = _copies(tensor)
    inner = max(1, _SAMPLE_BYTES // size_bytes)
    for fn in (lambda: _roundtrip(message), *copies.values()):  # warm caches and allocator
        _timed(fn, inner)

    roundtrip: list[float] = []
    copy_times: dict[str, list[float]] = {name: [] for name in copies}
    for _ in range(repeat):  # interleaved, so drift and neighbours hit both sides alike
        roundtrip.append(_timed(lambda: _roundtrip(message), inner))
        for name, fn in copies.items():
            copy_times[name].append(_timed(fn, inner))
    method, best = min(
        ((name, statistics.median(times)) for name, times in copy_times.items()),
        key=lambda item: item[1],
    )
    return CodecResult(
        size_bytes=size_bytes,
        roundtrip_gbps=size_bytes / statistics.median(roundtrip) / 1e9,
        memcpy_gbps=size_bytes / best / 1e9,
        memcpy_method=method,
    )


def _print_table(results: list[CodecResult]) -> None:
    table = Table(title="codec round trip (encode + decode of one float32 Update) vs memcpy")
    for column in ("payload", "round trip GB/s", "memcpy GB/s", "ratio", "fastest copy"):
        table.add_column(column, justify="left" if column == "fastest copy" else "right")
    for r in results:
        table.add_row(
            f"{r.size_bytes / 1024:,.0f} KiB",
            f"{r.roundtrip_gbps:.2f}",
            f"{r.memcpy_gbps:.2f}",
            f"{r.ratio_vs_memcpy:.2f}x",
            r.memcpy_method,
        )
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """``edgefed bench codec``: the table, or one JSON object with ``--json``."""
    repeat = args.repeat if args.repeat > 0 else 15
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the codec copies on one thread, so the baseline does too
    try:
        results = [bench_codec(size, repeat=repeat) for size in SIZES]
    finally:
        torch.set_num_threads(threads)
    data = {"results": [r.to_json() for r in results]}
    if args.json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        _print_table(results)
    if args.save:
        from bench import suite  # noqa: PLC0415  # only when asked

        suite.save_entry("codec", data | {"load_avg_1m": round(os.getloadavg()[0], 2)})
    return 0
