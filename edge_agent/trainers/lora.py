"""FedLLM-style local training: backprop through a peft LoRA adapter.

See docs/architecture.md §6 ``lora``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from peft import PeftModel

from edge_agent.trainers.base import FitResult
from edgefed.ml.models import adapter_parameters, get_adapter, set_adapter
from edgefed.ml.objectives import batch_loss
from edgefed.ml.precision import PRECISIONS, Precision, autocast
from edgefed.ml.tokens import TokenBatch, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import Method, TensorMap, TrainSpec


@dataclass(frozen=True)
class LoraConfig:
    """Device-side optimiser settings; the learning rate comes from the task's ``TrainSpec``.

    Attributes:
        optimizer: ``adamw`` (default) or plain ``sgd``.
        weight_decay: Decoupled for AdamW, L2 for SGD; it pulls the adapter towards
            zero, not towards the global, so keep it small.
        momentum: SGD momentum (ignored by AdamW).
        betas: AdamW moment decay rates.
        grad_clip: Max global grad norm per step; ``None`` disables clipping.
        loss: ``choices`` (default) scores a generative classifier's answer among its
            label tokens only (what accuracy compares), which trains the decision and leaves
            the full-vocabulary loss free to rise; ``vocabulary`` scores every scored token
            against the whole vocabulary, as ``evaluate`` reports its loss. Data without
            label tokens is always scored against the vocabulary. Every trainer defaults to
            ``choices``, so methods that share a federation optimise the same thing.
        precision: ``fp32`` (default), ``bf16`` autocast for the forward and backward
            (weights and optimiser stay fp32), or ``auto``: bf16 where the hardware
            computes it natively (see :mod:`edgefed.ml.precision`).
    """

    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    loss: Literal["choices", "vocabulary"] = "choices"
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.loss not in ("choices", "vocabulary"):
            raise ConfigError(f"loss must be 'choices' or 'vocabulary', got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(
                f"need weight_decay >= 0 and 0 <= momentum < 1, got {self.weight_decay}, {self.momentum}"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must lie in [0, 1), got {self.betas}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


def _endless_batches(
    data: TokenDataset, batch_size: int, generator: torch.Generator
) -> Iterator[TokenBatch]:
    """Shuffled epochs back to back, so ``local_steps`` may exceed one pass."""
    while True:
        yield from data.batches(batch_size, generator=generator)


class LoraTrainer:
    """Backprop LoRA training on a model built by ``edgefed.ml.models.attach_lora``.

    The trainer owns no state between fits: each fit loads the global adapter and builds
    a fresh optimiser. Carrying AdamW moments across rounds would mix in directions
    measured at an older, possibly much staler, global point, make the result depend
    on which versions this device happened to see, and be lost on every restart; a
    stateless fit is a pure function of (global, data, spec, seed).
    """

    method: ClassVar[Method] = "lora"

    def __init__(self, model: PeftModel, config: LoraConfig | None = None) -> None:
        """Wrap ``model``; its adapter must come from ``attach_lora``."""
        adapter_parameters(model)  # fails early if the model has no edgefed adapter
        self.model = model
        self.config = config or LoraConfig()

    def _optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def fit(
        self, global_adapter: TensorMap, data: TokenDataset, spec: TrainSpec, *, seed: int
    ) -> FitResult:
        """Run ``spec.local_steps`` steps from ``global_adapter``; return the delta.

        Unpadded sequences longer than ``spec.seq_len`` are cut to it (padded text is
        encoded at the task's length already, answer last). Batch order comes from a
        generator seeded with ``seed``; when the adapter has dropout, the global torch
        RNG is seeded too (inside a fork, restored afterwards), which is reproducible
        only while no other thread draws from it at the same time.

        Raises:
            ConfigError: ``global_adapter`` does not fit the model.
        """
        started = time.perf_counter()
        model = self.model
        set_adapter(model, global_adapter)
        params = adapter_parameters(model)
        optimizer = self._optimizer(list(params.values()), spec.lr)
        batches = _endless_batches(data, spec.batch_size, torch.Generator().manual_seed(seed))
        choices = data.choices if self.config.loss == "choices" else None
        device = next(iter(params.values())).device
        visited = 0
        losses: list[float] = []
        was_training = model.training
        uses_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        with ExitStack() as stack:
            if uses_dropout:
                stack.enter_context(torch.random.fork_rng(devices=[]))
                torch.manual_seed(seed)
            model.train()
            try:
                for _ in range(spec.local_steps):
                    batch = next(batches)
                    if batch.attention_mask is None and batch.labels.dim() == 2:
                        batch = TokenBatch(
                            input_ids=batch.input_ids[:, : spec.seq_len],
                            labels=batch.labels[:, : spec.seq_len],
                        )
                    with autocast(self.config.precision, device):
                        loss = batch_loss(model, batch, choices=choices)
                    loss.backward()  # type: ignore[no-untyped-call]
                    if self.config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params.values(), self.config.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    visited += len(batch)
            finally:
                model.train(was_training)
        trained = get_adapter(model)
        delta = {
            name: trained[name] - global_adapter[name].detach().to("cpu", torch.float32)
            for name in trained
        }
        return FitResult(
            delta=delta,
            num_samples=min(visited, len(data)),  # whole epochs: distinct rows seen
            train_loss=math.fsum(losses) / len(losses),
            compute_s=time.perf_counter() - started,
            steps=len(losses),
        )
