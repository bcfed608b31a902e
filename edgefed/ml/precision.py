"""Mixed precision for local training: bf16 autocast where the hardware computes bf16.

On a CPU with native bf16 matrix instructions (AVX-512 BF16, AMX) a SmolLM2 LoRA step
under bf16 autocast took 0.9 s against 1.4 s in fp32 (batch 8 x 48, 2 cores); on a CPU
without them bf16 is emulated and slower. The flag alone is not enough: on another host
that reports AVX-512 BF16 a step took 3.5 s in bf16 against 2.0 s in fp32 (batch 8 x 64,
one thread), and a bare matrix product was 1.9 times slower in bf16. So ``auto`` asks the
hardware, then times one product of a transformer layer's size in both types, once per
process, and takes bf16 only where it is clearly faster. The
adapter's weights, gradients and optimiser state stay fp32 either way: only the matrix
products inside the forward (and so the backward) run in bf16.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Literal

import torch

from edgefed.library_internals import cpu_bf16_native

Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively and, on a CPU, faster than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_bf16_native() and _cpu_bf16_faster()
    return False


_BF16_GAIN = 1.2
"""How much faster a bf16 product must be for ``auto`` to take it (timing noise aside)."""


@functools.cache
def _cpu_bf16_faster() -> bool:
    """Whether a bf16 matrix product beats fp32 here by :data:`_BF16_GAIN` (about 0.3 s)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(512, 576, generator=generator)
    right = torch.randn(576, 1536, generator=generator)

    def seconds(dtype: torch.dtype) -> float:
        a, b = left.to(dtype), right.to(dtype)
        for _ in range(2):
            torch.mm(a, b)
        started = time.perf_counter()
        for _ in range(8):
            torch.mm(a, b)
        return time.perf_counter() - started

    return seconds(torch.float32) > _BF16_GAIN * seconds(torch.bfloat16)


def resolve(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """The precision a fit on ``device`` actually uses (``auto``: bf16 when native)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(
    precision: Precision, device: torch.device
) -> contextlib.AbstractContextManager[object]:
    """A context for the forward pass: bf16 autocast, or nothing for fp32."""
    if resolve(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
