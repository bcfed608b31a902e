"""Client-level differential privacy: clip each update to norm C, add Gaussian noise σ·C.

Both places that can add noise share this module: the aggregator (central DP, noise on the
merged buffer; ``aggregator.privacy``) and the device (local DP, noise on its own update
before it leaves; ``edge_agent.privacy``). The privacy spent is never computed by hand: the
(ε, δ) estimate comes from Google's ``dp-accounting`` RDP accountant.

What the accountant is told, and so what the estimate assumes:

* one step per noised release (a merged version at the aggregator, an update on a device);
* at the aggregator, each step samples each of ``population`` clients with probability
  ``q = K / population`` (Poisson subsampling). Asynchronous arrival is not Poisson sampling,
  so with a ``population`` the figure is an estimate; without one, ``q = 1`` (no
  amplification), which is an upper bound on ε for the same noise and count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch
from pydantic import Field

from edgefed.settings import Settings
from schemas.messages import TensorMap

ACCOUNTANT: Final = "dp_accounting.rdp.RdpAccountant"
_ORDERS: Final = (*range(2, 64), 80, 128, 256)
"""Rényi orders evaluated: integer ones, whose subsampled-Gaussian bound is exact (the
fractional ones' series may not converge for large sampling rates)."""


class PrivacySettings(Settings):
    """The ``[privacy]`` table: clip norm, noise multiplier, target δ.

    Attributes:
        noise_multiplier: σ; the Gaussian noise's standard deviation is σ·C per release.
        clip_norm: C; every update is scaled down to at most this global L2 norm first.
        delta: δ of the reported (ε, δ) guarantee; well below 1 / number of clients.
        population: Aggregator only: how many clients take part, for the sampling rate.
        seed: Seed of the noise generator (reproducible runs); None draws it from the OS.
    """

    noise_multiplier: float = Field(gt=0)
    clip_norm: float = Field(gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    population: int | None = Field(default=None, gt=0)
    seed: int | None = None


def global_norm(tensors: TensorMap) -> float:
    """L2 norm of all tensors together, as if flattened into one vector."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in tensors.values())
    return math.sqrt(total)


def clip(tensors: TensorMap, clip_norm: float) -> tuple[TensorMap, float]:
    """Float32 copies scaled down to global norm ``clip_norm`` (when above it), and the norm."""
    norm = global_norm(tensors)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: t.detach().float() * scale for name, t in tensors.items()}, norm


def add_gaussian_noise(tensors: TensorMap, std: float, generator: torch.Generator) -> TensorMap:
    """``tensors`` plus independent N(0, std²) noise on every coordinate (float32 results)."""
    return {
        name: t.float() + torch.randn(t.shape, generator=generator, dtype=torch.float32) * std
        for name, t in tensors.items()
    }


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for noise: seeded when asked, else from the OS's entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def gaussian_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """ε after ``steps`` releases of the (subsampled) Gaussian mechanism, by RDP accounting."""
    if steps <= 0:
        return 0.0
    # dp-accounting pulls in scipy: loaded only when privacy is reported.
    import dp_accounting  # noqa: PLC0415
    from dp_accounting import rdp  # noqa: PLC0415

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = rdp.RdpAccountant(orders=list(_ORDERS))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


@dataclass
class PrivacyAccountant:
    """Counts noised releases and reports (ε, δ) for them."""

    settings: PrivacySettings
    where: str
    sample_rate: float = 1.0
    steps: int = 0

    def step(self, count: int = 1) -> None:
        """Record ``count`` more noised releases."""
        self.steps += count

    def epsilon(self) -> float:
        """ε spent so far at the configured δ."""
        return gaussian_epsilon(
            noise_multiplier=self.settings.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.settings.delta,
        )

    def report(self) -> dict[str, float | int | str]:
        """What a results file shows: the mechanism's parameters and the (ε, δ) estimate."""
        return {
            "where": self.where,
            "mechanism": "gaussian",
            "noise_multiplier": self.settings.noise_multiplier,
            "clip_norm": self.settings.clip_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "delta": self.settings.delta,
            "epsilon": self.epsilon(),
            "accountant": ACCOUNTANT,
        }
