"""Perturbations for forward-gradient training, regenerated from seeds.

A forward-gradient update can travel as a few numbers per perturbation because both ends can
rebuild every perturbation ``v(seed, index)`` over the same adapter layout. The generator is
numpy's Philox4x64-10 bit generator (the counter-based generator of Salmon et al., 2011) read
through ``random_raw``: key = seed, counter = index in its third word. That path is integer
arithmetic only, with no floating point and no distribution code, so its output is fixed by
the algorithm rather than by a library release or a CPU; numpy's ``Generator`` distributions
and ``torch.randn`` make no such promise across versions and are never used here. Each raw
64-bit word gives 64 Rademacher signs (+1 for a 0 bit, -1 for a 1 bit), least significant bit
first, read in little-endian byte order whatever the host's byte order. A known-answer test
pins the stream.

Everything here is pure: the device uses it to train, the aggregator to rebuild the delta,
and both get the same float64 numbers because they run the same code on the same inputs.

See docs/architecture.md §6 ``fwdgrad``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from schemas.errors import ConfigError
from schemas.messages import PerturbTarget, SeedDelta, SeedStep, TensorMap

GENERATOR = "philox4x64-10/rademacher/v1"
"""Name of the perturbation scheme; part of every layout fingerprint, so a change is detected."""

_INDEX_WORD = 2
"""Which of Philox's four 64-bit counter words holds the perturbation index."""


def _perturbed(name: str, target: PerturbTarget) -> bool:
    if target == "head":
        return ".lora_A." not in name and ".lora_B." not in name
    return target == "all" or ".lora_B." in name


@dataclass(frozen=True)
class Layout:
    """How adapter tensors map to one flat perturbation vector.

    The flat vector concatenates the perturbed tensors in sorted name order, each flattened
    row-major. Tensors the target leaves out (LoRA's A under ``lora_B``) are never perturbed
    and their delta is zero.

    Attributes:
        shapes: Every adapter tensor by wire name, sorted.
        target: Which of them are perturbed.
    """

    shapes: Mapping[str, tuple[int, ...]]
    target: PerturbTarget = "all"

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]], target: PerturbTarget = "all"
    ) -> Layout:
        """The layout of an adapter with ``shapes`` (name -> shape), perturbing ``target``.

        Raises:
            ConfigError: No tensor is perturbed, so there is nothing to train.
        """
        layout = cls({name: tuple(shapes[name]) for name in sorted(shapes)}, target)
        if layout.size == 0:
            raise ConfigError(f"perturbation target {target!r} selects no adapter tensor")
        return layout

    @cached_property
    def slices(self) -> dict[str, tuple[int, int]]:
        """Perturbed tensor name -> (offset, length) in the flat vector."""
        found: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in self.shapes.items():
            if _perturbed(name, self.target):
                numel = math.prod(shape)
                found[name] = (offset, numel)
                offset += numel
        return found

    @cached_property
    def size(self) -> int:
        """Length of the flat perturbation vector."""
        return sum(length for _, length in self.slices.values())

    @cached_property
    def fingerprint(self) -> str:
        """16 hex digits naming the generator, the target and every tensor's name and shape."""
        text = "|".join(
            [GENERATOR, self.target, *(f"{n}:{list(s)}" for n, s in self.shapes.items())]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The perturbed tensors of ``tensors`` as one float64 vector."""
        return torch.cat(
            [tensors[name].detach().reshape(-1).to(torch.float64) for name in self.slices]
        )

    def unflatten(self, flat: torch.Tensor) -> TensorMap:
        """Float32 tensors for every adapter name from a flat vector (zeros where unperturbed)."""
        if flat.numel() != self.size:
            raise ConfigError(f"flat vector has {flat.numel()} values, layout needs {self.size}")
        out: TensorMap = {}
        for name, shape in self.shapes.items():
            span = self.slices.get(name)
            if span is None:
                out[name] = torch.zeros(shape, dtype=torch.float32)
            else:
                offset, length = span
                out[name] = flat[offset : offset + length].to(torch.float32).reshape(shape)
        return out


def rademacher(
    seed: int, index: int, size: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Perturbation ``index`` of ``seed``: ``size`` values of +1 or -1, the same everywhere.

    Args:
        seed: The step's seed, 0 <= seed < 2**64 (the Philox key).
        index: Which perturbation of that seed, 0 <= index < 2**64 (a Philox counter word).
        size: Length of the flat perturbation vector (``Layout.size``).
        dtype: Floating dtype of the result; every value is exactly representable.
    """
    if not 0 <= seed < 2**64 or not 0 <= index < 2**64 or size < 1:
        raise ConfigError(
            f"need 0 <= seed, index < 2**64 and size >= 1, got {seed}, {index}, {size}"
        )
    counter = np.zeros(4, dtype=np.uint64)
    counter[_INDEX_WORD] = index
    words = np.random.Philox(key=seed, counter=counter).random_raw(-(-size // 64))
    octets = np.asarray(words, dtype="<u8").view(np.uint8)
    bits = np.unpackbits(octets, bitorder="little", count=size)
    signs = 1.0 - 2.0 * bits.astype(np.float64)
    return torch.from_numpy(signs).to(dtype)


@dataclass(frozen=True)
class StepEstimate:
    """What one step's perturbations say about the gradient.

    Attributes:
        mean: ``(1/K) * sum_k d_k v_k`` as a float64 flat vector: the gradient estimate.
        variance: Estimated ``E||mean - E[mean]||^2`` from the two halves of the K
            estimates (FwdLLM's split), or None with fewer than two perturbations.
    """

    mean: torch.Tensor
    variance: float | None


def estimate(layout: Layout, seed: int, indices: Sequence[int], d: Sequence[float]) -> StepEstimate:
    """Average ``d_k v(seed, indices[k])`` and estimate its variance from the two halves.

    With ``h = K // 2``, the first ``h`` and the next ``h`` estimates give means ``a`` and
    ``b``; ``E||a - b||^2 = 2 s^2 / h`` for a per-perturbation variance ``s^2``, so the
    variance of the K-mean ``s^2 / K`` is estimated by ``h ||a - b||^2 / (2 K)``.
    """
    count = len(indices)
    if count < 1 or len(d) != count:
        raise ConfigError(f"need as many derivatives as perturbations (>= 1), got {len(d)}/{count}")
    half = count // 2
    first = torch.zeros(layout.size, dtype=torch.float64)
    second = torch.zeros(layout.size, dtype=torch.float64)
    rest = torch.zeros(layout.size, dtype=torch.float64)
    for k, (index, value) in enumerate(zip(indices, d, strict=True)):
        target = first if k < half else second if k < 2 * half else rest
        target.add_(rademacher(seed, index, layout.size, dtype=torch.float64), alpha=value)
    variance: float | None = None
    if half:
        gap = (first - second).div_(half)
        variance = half * float(gap.dot(gap)) / (2 * count)
    return StepEstimate(mean=(first + second + rest).div_(count), variance=variance)


def step_vector(layout: Layout, step: SeedStep, lr: float) -> torch.Tensor:
    """The float64 flat change one step made: ``-lr * scale * mean_k(d_k v_k)``."""
    mean = estimate(layout, step.seed, step.indices, step.d).mean
    return mean.mul_(-lr * step.scale)


def rebuild_delta(layout: Layout, seeds: SeedDelta) -> TensorMap:
    """The adapter delta a seed update describes, summed in float64, returned as float32.

    Raises:
        ConfigError: ``seeds`` was made for another layout (its fingerprint differs).
    """
    if seeds.layout != layout.fingerprint or seeds.target != layout.target:
        raise ConfigError(
            f"seeds were made for layout {seeds.layout} ({seeds.target}), "
            f"this adapter's is {layout.fingerprint} ({layout.target})"
        )
    total = torch.zeros(layout.size, dtype=torch.float64)
    for step in seeds.steps:
        total.add_(step_vector(layout, step, seeds.lr))
    return layout.unflatten(total)
