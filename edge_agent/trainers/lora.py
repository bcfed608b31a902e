"""FedLLM-style local training: backprop through a peft LoRA adapter.

See docs/architecture.md §6 ``lora``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Annotated, ClassVar, Literal

import torch
from peft import PeftModel
from pydantic import Field

from edge_agent.trainers.base import FitResult
from edge_agent.trainers.batches import adapter_delta, cut_to_length, endless_batches
from edgefed.ml.models import adapter_parameters, set_adapter
from edgefed.ml.objectives import batch_loss
from edgefed.ml.precision import Precision, autocast
from edgefed.ml.tokens import TokenBatch, TokenDataset
from edgefed.settings import PositiveNumber, Settings
from schemas.messages import Method, TensorMap, TrainSpec


class LoraConfig(Settings):
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
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    grad_clip: PositiveNumber | None = 1.0
    loss: Literal["choices", "vocabulary"] = "choices"
    precision: Precision = "fp32"


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
        set_adapter(self.model, global_adapter)
        params = adapter_parameters(self.model)
        optimizer = self._optimizer(list(params.values()), spec.lr)
        batches = endless_batches(data, spec.batch_size, seed=seed)
        choices = data.choices if self.config.loss == "choices" else None
        device = next(iter(params.values())).device
        visited = 0
        losses: list[float] = []
        with self._training(seed):
            for _ in range(spec.local_steps):
                batch = cut_to_length(next(batches), spec.seq_len)
                losses.append(self._step(batch, optimizer, params, choices, device))
                visited += len(batch)
        return FitResult(
            delta=adapter_delta(self.model, global_adapter),
            num_samples=min(visited, len(data)),  # whole epochs: distinct rows seen
            train_loss=math.fsum(losses) / len(losses),
            compute_s=time.perf_counter() - started,
            steps=len(losses),
        )

    @contextmanager
    def _training(self, seed: int) -> Iterator[None]:
        """Train mode for one fit; dropout then draws from a torch RNG forked and seeded."""
        model = self.model
        was_training = model.training
        uses_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        with ExitStack() as stack:
            if uses_dropout:
                stack.enter_context(torch.random.fork_rng(devices=[]))
                torch.manual_seed(seed)
            model.train()
            try:
                yield
            finally:
                model.train(was_training)

    def _step(
        self,
        batch: TokenBatch,
        optimizer: torch.optim.Optimizer,
        params: dict[str, torch.nn.Parameter],
        choices: tuple[int, ...] | None,
        device: torch.device,
    ) -> float:
        """One backprop step on ``batch``, gradients clipped; return its loss."""
        with autocast(self.config.precision, device):
            loss = batch_loss(self.model, batch, choices=choices)
        loss.backward()  # type: ignore[no-untyped-call]
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params.values(), self.config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
