"""Seeded perturbations: pinned stream, identical in another process, exact rebuilds."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgefed.ml.perturbation import GENERATOR, Layout, estimate, rademacher, rebuild_delta
from schemas.errors import ConfigError
from schemas.messages import SeedDelta, SeedStep

SHAPES = {
    "m.layers.0.q_proj.lora_A.weight": (4, 16),
    "m.layers.0.q_proj.lora_B.weight": (16, 4),
    "m.layers.1.q_proj.lora_A.weight": (4, 16),
    "m.layers.1.q_proj.lora_B.weight": (16, 4),
}

KNOWN_SIGNS = "0101010111110100111110011100111010110010001110101011011011010011100010"
"""Signs of rademacher(12345, 7, 70), '1' = -1: computed once, pinned against any change."""


def _digest(seed: int, index: int, size: int) -> str:
    return hashlib.sha256(rademacher(seed, index, size).numpy().tobytes()).hexdigest()


def test_rademacher_known_answer() -> None:
    signs = rademacher(12345, 7, 70)
    assert signs.dtype == torch.float32
    assert "".join("1" if x < 0 else "0" for x in signs.tolist()) == KNOWN_SIGNS


def test_rademacher_values_balance_and_independence() -> None:
    v = rademacher(3, 0, 100_000)
    assert set(v.tolist()) == {-1.0, 1.0}
    assert abs(float(v.mean())) < 0.02
    w = rademacher(3, 1, 100_000)
    assert abs(float(v.dot(w))) / 100_000 < 0.02
    assert torch.equal(rademacher(3, 0, 10), v[:10])  # a prefix of the same stream
    assert torch.equal(rademacher(2**64 - 1, 2**64 - 1, 5).abs(), torch.ones(5))
    with pytest.raises(ConfigError):
        rademacher(2**64, 0, 5)
    with pytest.raises(ConfigError):
        rademacher(0, 0, 0)


def test_rademacher_is_bit_identical_in_another_process() -> None:
    layout = Layout.from_shapes(SHAPES)
    cases = [(0, 0), (12345, 7), (2**63 + 5, 1000)]
    script = (
        "import hashlib, sys\n"
        "from edgefed.ml.perturbation import Layout, rademacher\n"
        f"layout = Layout.from_shapes({SHAPES!r})\n"
        "print(layout.fingerprint)\n"
        f"for seed, index in {cases!r}:\n"
        "    data = rademacher(seed, index, layout.size).numpy().tobytes()\n"
        "    print(hashlib.sha256(data).hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root
    ).stdout.split()
    assert out[0] == layout.fingerprint
    assert out[1:] == [_digest(seed, index, layout.size) for seed, index in cases]


def test_layout_targets_flatten_and_fingerprint() -> None:
    full = Layout.from_shapes(SHAPES)
    only_b = Layout.from_shapes(SHAPES, "lora_B")
    assert full.size == 4 * 64 and only_b.size == 2 * 64
    assert all(".lora_B." in name for name in only_b.slices)
    tensors = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    back = only_b.unflatten(only_b.flatten(tensors))
    for name, tensor in tensors.items():
        expected = tensor if ".lora_B." in name else torch.zeros_like(tensor)
        assert torch.equal(back[name], expected)
    assert full.fingerprint != only_b.fingerprint
    changed = Layout.from_shapes({**SHAPES, "m.layers.1.q_proj.lora_B.weight": (16, 5)})
    assert changed.fingerprint != full.fingerprint
    assert Layout.from_shapes(dict(reversed(SHAPES.items()))).fingerprint == full.fingerprint
    assert GENERATOR in "philox4x64-10/rademacher/v1"
    with pytest.raises(ConfigError, match="selects no"):
        Layout.from_shapes({"x.lora_A.weight": (2, 2)}, "lora_B")


def test_estimate_mean_and_half_variance() -> None:
    layout = Layout.from_shapes(SHAPES)
    d = [0.5, -1.0, 2.0, 0.25, 1.5]
    found = estimate(layout, 9, range(5), d)
    vs = [rademacher(9, i, layout.size, dtype=torch.float64) for i in range(5)]
    mean = torch.stack([x * v for x, v in zip(d, vs, strict=True)]).sum(0) / 5
    assert torch.allclose(found.mean, mean, rtol=0, atol=1e-15)
    a = (d[0] * vs[0] + d[1] * vs[1]) / 2
    b = (d[2] * vs[2] + d[3] * vs[3]) / 2
    assert found.variance == pytest.approx(2 * float((a - b).dot(a - b)) / (2 * 5))
    assert estimate(layout, 9, [0], [1.0]).variance is None


def test_half_variance_estimates_the_variance_of_the_mean() -> None:
    """Averaged over many draws, the split estimate matches the true E||mean - grad||^2."""
    layout = Layout.from_shapes({"b.lora_B.weight": (8, 4)})
    grad = torch.linspace(-1, 1, layout.size, dtype=torch.float64)
    k = 8
    reported: list[float] = []
    errors: list[float] = []
    for seed in range(300):
        d = [
            float(rademacher(seed, i, layout.size, dtype=torch.float64).dot(grad)) for i in range(k)
        ]
        found = estimate(layout, seed, range(k), d)
        assert found.variance is not None
        reported.append(found.variance)
        errors.append(float((found.mean - grad).square().sum()))
    assert math.fsum(reported) / 300 == pytest.approx(math.fsum(errors) / 300, rel=0.2)


def test_rebuild_delta_refuses_another_layout() -> None:
    layout = Layout.from_shapes(SHAPES)
    step = SeedStep(seed=1, indices=(0, 1), d=(1.0, -1.0))
    seeds = SeedDelta(lr=0.1, layout=layout.fingerprint, steps=(step,))
    delta = rebuild_delta(layout, seeds)
    expected = -0.1 * (rademacher(1, 0, layout.size) - rademacher(1, 1, layout.size)) / 2
    assert torch.allclose(layout.flatten(delta), expected.double(), atol=1e-7)
    with pytest.raises(ConfigError, match="layout"):
        rebuild_delta(Layout.from_shapes(SHAPES, "lora_B"), seeds)
