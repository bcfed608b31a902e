"""Split-FedLLM on the device: embeddings and the first ``cut`` blocks, with their LoRA.

Per step the device runs its part, sends the activations (the "smashed data") to the split
server through a :class:`SplitChannel`, gets back the gradient of the loss with respect to
them and backpropagates through its part (docs/architecture.md §6 ``split``). In the U-shaped
variant the device also keeps the head: the server returns its part's output, the device computes the
loss and sends that output's gradient back, so labels never leave the device. Only the
device part's adapter changes here; the update carries it (zeros elsewhere), and the server
trains its part itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch
from peft import PeftModel
from pydantic import Field

from edge_agent.budget import PeakMeter
from edge_agent.trainers.base import FitResult
from edge_agent.trainers.batches import cut_to_length, endless_batches
from edgefed.ml.models import adapter_parameters, get_adapter, set_adapter
from edgefed.ml.split_model import (
    check_cut,
    embed,
    head_loss,
    keep_device_part,
    part_names,
    run_blocks,
)
from edgefed.ml.tokens import TokenBatch, TokenDataset
from edgefed.settings import PositiveNumber, Settings
from schemas.codec import Compression
from schemas.errors import ConfigError, SplitRejected
from schemas.messages import (
    Method,
    SplitReply,
    SplitRequest,
    SplitVariant,
    TensorMap,
    TrainSpec,
    new_id,
)


class SplitChannel(Protocol):
    """Carries one request to the split server and its reply back (blocking; worker thread).

    Implementations retry with the same ``request_id`` and raise ``TimeoutError`` when no
    reply comes; they return the bytes sent and received beside the reply.
    """

    client_id: str
    task_id: str

    def exchange(
        self, request: SplitRequest, *, compression: Compression
    ) -> tuple[SplitReply, int, int]:
        """Send ``request``; return ``(reply, bytes up, bytes down)``."""
        ...


class SplitConfig(Settings):
    """Device-side split settings; the learning rate comes from the task's ``TrainSpec``.

    Attributes:
        cut: Blocks the device runs (1 .. blocks-1); memory and compute scale with it.
        variant: ``vanilla`` (server has the head, labels travel) or ``u_shaped``.
        compression: How activations and gradients travel (``fp16``, ``int8``, ``none``).
        grad_clip: Max grad norm of the device's adapter per step; None: no clipping.
        drop_rest: Free the blocks (and head) this device never runs.
        timeout_s: How long to wait for the server's reply before sending the request again.
        retries: Repeats of an unanswered request before the fit fails with ``TimeoutError``.
        loss: ``choices`` scores a generative classifier's answer among its label tokens only
            (the requests name them, so the server's loss is the other trainers'),
            ``vocabulary`` against every token. Data without label tokens is always scored
            against the vocabulary.
    """

    cut: int = 1
    variant: SplitVariant = "vanilla"
    compression: Compression = "fp16"
    grad_clip: PositiveNumber | None = 1.0
    drop_rest: bool = True
    timeout_s: PositiveNumber = 10.0
    retries: int = Field(default=2, ge=0)
    loss: Literal["choices", "vocabulary"] = "choices"


@dataclass(frozen=True)
class SplitStep:
    """What one split step cost the device (the seed papers' comparison table)."""

    bytes_up: int
    bytes_down: int
    compute_s: float
    """Device compute only; waiting for the server is not counted."""
    wait_s: float
    loss: float


@dataclass
class SplitHistory:
    """Per-step records of one fit, and the process's peak resident memory over it.

    The peak is the whole process's: agents simulated in one process see each other's.
    """

    steps: list[SplitStep] = field(default_factory=list)
    peak_mb: float = 0.0


class SplitTrainer:
    """The device half of split learning on a model built by ``attach_lora``."""

    method: ClassVar[Method] = "split"

    def __init__(self, model: PeftModel, config: SplitConfig | None = None) -> None:
        """Keep the device part of ``model`` (the rest is freed when ``drop_rest``).

        Raises:
            ConfigError: ``cut`` does not fit the model, or it is not a Llama-style LM.
        """
        self.config = config or SplitConfig()
        self.cut = check_cut(model, self.config.cut)
        self._names = part_names(model, 0, self.cut)
        self._all = list(adapter_parameters(model))
        self._u = self.config.variant == "u_shaped"
        if self.config.drop_rest:
            keep_device_part(model, self.cut, keep_head=self._u)
        self.model = model
        self._channel: SplitChannel | None = None
        self.history = SplitHistory()

    def connect(self, channel: SplitChannel) -> None:
        """Talk to the split server through ``channel`` from now on."""
        self._channel = channel

    def _send(
        self,
        step_id: str,
        phase: Literal["forward", "backward"],
        tensors: TensorMap,
        choices: tuple[int, ...] | None = None,
    ) -> tuple[SplitReply, int, int]:
        channel = self._channel
        if channel is None:
            raise ConfigError("split trainer has no channel to the split server; call connect()")
        request = SplitRequest(
            step_id=step_id,
            client_id=channel.client_id,
            task_id=channel.task_id,
            cut=self.cut,
            variant=self.config.variant,
            phase=phase,
            tensors=tensors,
            choices=choices or (),
        )
        reply, up, down = channel.exchange(request, compression=self.config.compression)
        if not reply.accepted:
            raise SplitRejected(reply.reason or "malformed", reply.detail)
        return reply, up, down

    def step(self, batch: TokenBatch, choices: tuple[int, ...] | None = None) -> SplitStep:
        """One split step on ``batch``: gradients land in the device adapter's ``.grad``.

        With ``choices`` only those tokens compete for each scored answer.
        """
        started = time.perf_counter()
        waited = 0.0
        step_id = new_id()
        hidden = run_blocks(
            self.model, embed(self.model, batch.input_ids), batch.attention_mask, 0, self.cut
        )
        tensors: TensorMap = {"hidden": hidden.detach()}
        if batch.attention_mask is not None:
            tensors["attention_mask"] = batch.attention_mask
        if not self._u:
            tensors["labels"] = batch.labels
        mark = time.perf_counter()
        reply, up, down = self._send(step_id, "forward", tensors, None if self._u else choices)
        waited += time.perf_counter() - mark
        if self._u:
            top = reply.tensors["hidden"].float().clone().requires_grad_(True)
            loss = head_loss(self.model, top, batch.labels, choices)
            loss.backward()  # type: ignore[no-untyped-call]
            assert top.grad is not None
            mark = time.perf_counter()
            reply, up2, down2 = self._send(step_id, "backward", {"grad": top.grad})
            waited += time.perf_counter() - mark
            up, down, value = up + up2, down + down2, float(loss.detach())
        else:
            value = float(reply.loss) if reply.loss is not None else math.nan
        hidden.backward(reply.tensors["grad"].to(hidden.dtype))  # type: ignore[no-untyped-call]
        return SplitStep(
            bytes_up=up,
            bytes_down=down,
            compute_s=time.perf_counter() - started - waited,
            wait_s=waited,
            loss=value,
        )

    def fit(
        self, global_adapter: TensorMap, data: TokenDataset, spec: TrainSpec, *, seed: int
    ) -> FitResult:
        """Run ``spec.local_steps`` split steps from ``global_adapter``; return the delta.

        The delta covers the whole adapter, zero outside the device part.

        Raises:
            ConfigError: ``global_adapter`` does not fit, or there is no channel.
            SplitRejected: The server refused a request (the reason says why).
            TimeoutError: The server did not answer after the channel's retries.
        """
        started = time.perf_counter()
        model = self.model
        set_adapter(model, {n: global_adapter[n] for n in adapter_parameters(model)})
        params = [p for n, p in adapter_parameters(model).items() if n in self._names]
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        batches = endless_batches(data, spec.batch_size, seed=seed)
        history = SplitHistory()
        choices = data.choices if self.config.loss == "choices" else None
        visited = 0
        model.train()
        with PeakMeter() as meter:
            for _ in range(spec.local_steps):
                batch = cut_to_length(next(batches), spec.seq_len)
                record = self.step(batch, choices)
                if self.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.steps.append(record)
                visited += len(batch)
        history.peak_mb = meter.peak_mb
        self.history = history
        trained = get_adapter(model)
        delta = {
            name: (
                trained[name] - global_adapter[name].detach().to("cpu", torch.float32)
                if name in self._names
                else torch.zeros_like(global_adapter[name], dtype=torch.float32)
            )
            for name in self._all
        }
        losses = [s.loss for s in history.steps]
        return FitResult(
            delta=delta,
            num_samples=min(visited, len(data)),
            train_loss=math.fsum(losses) / len(losses),
            compute_s=time.perf_counter() - started - sum(s.wait_s for s in history.steps),
            steps=len(losses),
        )
