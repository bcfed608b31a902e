"""Mixed precision for local training: bf16 autocast where the hardware computes bf16.

On a CPU with native bf16 matrix instructions (AVX-512 BF16, AMX) a SmolLM2 LoRA step
under bf16 autocast took 0.9 s against 1.4 s in fp32 (batch 8 x 48, 2 cores); on a CPU
without them bf16 is emulated and slower, so ``auto`` asks the hardware first. The
adapter's weights, gradients and optimiser state stay fp32 either way: only the matrix
products inside the forward (and so the backward) run in bf16.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from edgefed.library_internals import cpu_bf16_native

Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (not by emulation)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


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
