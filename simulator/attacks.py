"""Poisoned clients for robustness experiments: devices that send scaled or flipped updates.

A model-poisoning device trains honestly, then sends ``factor·Δ`` (``scale``) or ``−factor·Δ``
(``sign_flip``) instead of its delta Δ. A large sign-flipped update pushes the global uphill
by more than the honest ones pull it down; norm clipping and FedBuff's coordinate-wise median
or trimmed mean (docs/architecture.md §5) are what keep the federation learning anyway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from edge_agent.trainers.base import FitResult

AttackKind = Literal["scale", "sign_flip"]


@dataclass(frozen=True)
class Attack:
    """How the poisoned devices rewrite their updates, and which devices they are.

    Attributes:
        kind: ``scale`` sends ``factor·Δ``; ``sign_flip`` sends ``−factor·Δ``.
        factor: How much larger than honest the update is made (> 0).
        clients: Indices of the poisoned agents in the fleet.
    """

    kind: AttackKind = "sign_flip"
    factor: float = 10.0
    clients: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        """Refuse an attack that does nothing or cannot be told apart from honesty."""
        if not self.factor > 0:
            raise ValueError(f"attack factor must be > 0, got {self.factor}")

    @property
    def multiplier(self) -> float:
        """What every coordinate of the honest delta is multiplied by."""
        return -self.factor if self.kind == "sign_flip" else self.factor

    def __call__(self, fit: FitResult) -> FitResult:
        """The poisoned version of an honest fit (a dense delta; seeds would reveal it)."""
        poisoned = {name: tensor * self.multiplier for name, tensor in fit.delta.items()}
        return dataclasses.replace(fit, delta=poisoned, seeds=None)
