"""The contract every local training method fulfils (docs/architecture.md §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from edgefed.ml.tokens import TokenDataset
from schemas.messages import Method, SeedDelta, TensorMap, TrainSpec


@dataclass(frozen=True)
class FitResult:
    """What one local training run produced, ready to become an ``Update``.

    Attributes:
        delta: New adapter minus the global adapter the run started from, float32, by
            wire name; adding it to that global reproduces the device's adapter.
        num_samples: Distinct sequences the run trained on (the FedAvg/FedBuff weight),
            not steps times batch size, so a small shard revisited does not count double.
        train_loss: Mean training loss over the local steps.
        compute_s: Wall time of the fit, for the planner and for speed emulation.
        steps: Optimiser steps taken.
        seeds: The same delta as seeds (forward gradient), when the update should carry them.
        variance: Estimated variance of the per-step gradient estimate (forward gradient).
        diverged: The run stopped early because its loss blew up (the bad step undone).
        logits: Knowledge distillation: top-k logits on the proxy slice (``delta`` empty).
        proxy_slice: Knowledge distillation: the slice ``logits`` were computed on.
    """

    delta: TensorMap
    num_samples: int
    train_loss: float
    compute_s: float
    steps: int
    seeds: SeedDelta | None = None
    variance: float | None = None
    diverged: bool = False
    logits: TensorMap | None = None
    proxy_slice: int | None = None


class Trainer(Protocol):
    """One local method: turns the global adapter and local data into a delta.

    ``fit`` is synchronous and CPU/GPU bound. The agent runs it in a worker thread
    (``asyncio.to_thread``) so the MQTT loop keeps answering pings and acks meanwhile;
    a trainer therefore must not touch the event loop, and one trainer instance runs
    one fit at a time.
    """

    method: ClassVar[Method]

    def fit(
        self, global_adapter: TensorMap, data: TokenDataset, spec: TrainSpec, *, seed: int
    ) -> FitResult:
        """Train from ``global_adapter`` on ``data`` as ``spec`` says; same inputs, same result.

        Args:
            global_adapter: The adapter of the global version this update is based on.
            data: The device's local data.
            spec: Local steps, batch size, sequence length and learning rate.
            seed: Seeds batch order and any other randomness of this fit.
        """
        ...
