"""What a forward-gradient fit settles on before its first step, and what it has done since.

:class:`~edge_agent.trainers.fwdgrad.FwdGradTrainer` owns the model and the derivatives;
these two records hold one fit's settings and its running sum of steps, so that each part of
a fit (settle, step, undo, report) is a method of its own that reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from edgefed.ml.perturbation import Layout
from schemas.messages import SeedDelta, SeedStep


@dataclass(frozen=True)
class StepSettings:
    """How every step of one fit is taken.

    Attributes:
        count: Perturbations per step.
        lr: The SGD learning rate.
        bound: Largest norm a step may have before it is scaled down; None never clips.
        direction: The last change of the global, for discriminative sampling; None takes
            the first ``count`` perturbations.
        choices: The label tokens the loss scores among; None scores the whole vocabulary.
        chance: The loss of a uniform guess; a loss below it never counts as divergence.
    """

    count: int
    lr: float
    bound: float | None
    direction: torch.Tensor | None
    choices: tuple[int, ...] | None
    chance: float

    def clip_scale(self, norm: float) -> float:
        """The factor that brings a step of ``norm`` within ``bound``."""
        return 1.0 if self.bound is None or norm <= self.bound else self.bound / norm


@dataclass
class FitProgress:
    """The steps one fit has kept so far; their sum ``total`` is how far it moved ``start``."""

    start: torch.Tensor
    total: torch.Tensor
    last_step: torch.Tensor | None = None
    steps: list[SeedStep] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    variances: list[float] = field(default_factory=list)
    visited: int = 0
    """Rows the steps were measured on, revisits included."""
    diverged: bool = False

    def take(self, step: SeedStep, move: torch.Tensor, variance: float | None) -> None:
        """Keep ``step``, whose change to the adapter is ``move``."""
        self.last_step = move
        self.total.add_(move)
        self.steps.append(step)
        self.variances.append(variance if variance is not None else math.nan)

    def undo_last(self) -> bool:
        """Take back the last step kept, so a step that led to divergence is not sent."""
        if not self.steps:
            return False
        assert self.last_step is not None
        self.total.sub_(self.last_step)
        self.steps.pop()
        self.variances.pop()
        return True

    @property
    def train_loss(self) -> float:
        """Mean loss over the steps measured; NaN when the first one already diverged."""
        return math.fsum(self.losses) / len(self.losses) if self.losses else math.nan

    @property
    def variance(self) -> float | None:
        """Mean variance of the step estimates, over those with a finite one."""
        finite = [v for v in self.variances if math.isfinite(v)]
        return math.fsum(finite) / len(finite) if finite else None

    def seed_delta(self, lr: float, layout: Layout) -> SeedDelta:
        """The kept steps as seeds, which an update may carry instead of the dense delta."""
        return SeedDelta(
            lr=lr, target=layout.target, layout=layout.fingerprint, steps=tuple(self.steps)
        )
