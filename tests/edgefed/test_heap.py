"""Freed message buffers are reused instead of being faulted in afresh."""

from __future__ import annotations

import subprocess
import sys

import pytest

_TRANSFERS = """
import resource, sys
from edgefed.heap import reuse_freed_memory
if sys.argv[1] == "tuned" and not reuse_freed_memory():
    print("unsupported")
    raise SystemExit
payload = memoryview(bytes(1024 * 1024))

def transfer() -> int:
    chunks = [payload[i * 262144 : (i + 1) * 262144].tobytes() for i in range(4)]
    whole = b"".join(chunks)  # a reassembled 1 MiB update
    return len(bytearray(whole))  # and a copy of its tensors

for _ in range(3):
    transfer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    transfer()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def _faults_per_transfer(mode: str) -> float | None:
    done = subprocess.run(
        [sys.executable, "-c", _TRANSFERS, mode], capture_output=True, text=True, check=True
    )
    out = done.stdout.strip()
    return None if out == "unsupported" else float(out)


def test_reuse_freed_memory_removes_page_faults_of_repeated_transfers() -> None:
    tuned = _faults_per_transfer("tuned")
    if tuned is None:
        pytest.skip("this C library has no mallopt")
    default = _faults_per_transfer("default")
    assert default is not None
    # 3 MiB of fresh buffers per transfer: about 768 faults of 4 KiB each by default.
    assert default > 300
    assert tuned < 10
