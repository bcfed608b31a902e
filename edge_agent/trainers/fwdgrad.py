"""FwdLLM-style training without backprop: forward gradients from seeded perturbations.

For each local step the device draws K perturbations ``v_k`` of the adapter (Rademacher
signs regenerated from a seed, :mod:`edgefed.ml.perturbation`), measures the directional
derivative ``d_k = grad L . v_k`` with forward passes only, and steps along the estimate
``g = (1/K) sum_k d_k v_k``, which is unbiased for the gradient because ``E[v v^T] = I``.
``d_k`` comes either exactly from forward-mode AD (``torch.func.jvp``; needs eager attention)
or from a central difference ``(L(x + eps v) - L(x - eps v)) / (2 eps)`` under ``no_grad``,
whose peak memory is that of inference. Nothing but ``(seed, index, d_k)`` per perturbation
and the learning rate needs to leave the device; the aggregator rebuilds the same delta.

The estimate's noise grows with the number of perturbed values n: ``E||g - grad||^2`` is
about ``n ||grad||^2 / K``. The default learning rate is therefore scaled by ``K / (n + K)``
(the step size that keeps the expected descent positive for a noisy estimate of that
variance) and every step is clipped, and a loss that blows up stops the fit (the bad step is
undone), is logged, and halves this trainer's learning rate for later fits.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal, cast

import torch
from peft import PeftModel
from pydantic import Field
from torch.func import functional_call, jvp, vmap
from transformers import PreTrainedModel

from edge_agent.trainers.base import FitResult
from edge_agent.trainers.batches import adapter_delta, cut_to_length, endless_batches
from edge_agent.trainers.fwdgrad_progress import FitProgress, StepSettings
from edgefed.library_internals import attention_implementation
from edgefed.ml.models import (
    ANSWER_ROWS,
    adapter_parameters,
    classifier_classes,
    lora_spec,
    set_adapter,
)
from edgefed.ml.objectives import batch_loss, logits_loss, scored_logits, scored_rows
from edgefed.ml.perturbation import Layout, estimate, rademacher
from edgefed.ml.tokens import TokenBatch, TokenDataset
from edgefed.settings import PositiveNumber, Settings
from schemas.messages import Method, PerturbTarget, SeedStep, TensorMap, TrainSpec

log = logging.getLogger(__name__)

GradMode = Literal["fd", "jvp"]
Upload = Literal["seeds", "dense"]
Loss = Literal["choices", "vocabulary"]


class FwdGradConfig(Settings):
    """Device-side settings of forward-gradient training; K and steps come from the task.

    Attributes:
        mode: ``fd`` (central difference, inference memory) or ``jvp`` (exact, forward AD).
        lr: Base SGD learning rate before the ``K / (n + K)`` scaling; None uses the task's
            ``TrainSpec.lr``, which is usually tuned for the AdamW ``lora`` trainer instead.
            10 moved the tiny model and matches the rate that worked for SmolLM2 LoRA.
        scale_lr: Multiply the base rate by ``K / (n + K)`` for n perturbed values.
        eps: Central-difference step along each perturbation (each value moves by eps).
        target: Perturb every adapter tensor, only LoRA's B, or only a classifier's head;
            ``auto`` is ``head`` when the adapter carries one, else ``all``. A's gradient is
            exactly zero while B is zero, so perturbing A first adds only noise, yet on the
            tiny model ``all`` reached a lower loss after 300 steps (2.97 against 3.23). A
            forward gradient's noise grows with the values perturbed, and a new head is what
            a classifier must learn first; with ``head`` the frozen trunk runs once per step
            and each perturbation costs only the head.
        max_step_rms: Clip each step to this root-mean-square change per perturbed value;
            None disables clipping.
        head_perturbations: With only the head perturbed and the trunk's output kept, a
            perturbation costs one head evaluation (microseconds), so each step uses at
            least this many. On MiniLM/AG News (2 devices, 120 s) K = 64 reached 0.744
            held-out accuracy, 256 reached 0.79 by 90 s; 1,024 made versions twice as slow
            and diverged once.
        head_max_step_rms: ``max_step_rms`` for the head: a fresh head must move far, and
            at 1e-2 the clip, not the estimate's noise, held it back (0.744 against 0.79).
        answer_max_step: A causal LM's answer rows are pretrained, and the features they
            score are large (logits of 10-80 on SmolLM2), so their steps are clipped to this
            fraction of the rows' norm instead: at the head's 5e-2 per value the first step
            raised SmolLM2's loss from 0.34 to 2.04. On Rotten Tomatoes (one device, 16 fits
            of 10 steps, 300 held-out reviews from 0.733) 1e-2 swung between 0.58 and 0.78,
            2e-3 rose to 0.75-0.76.
        upload: Send seeds (a few bytes per perturbation) or the dense delta.
        candidates: Discriminative sampling: draw ``candidates * K`` perturbations and keep
            the K most aligned (|cosine|) with the last global change this device saw;
            1 turns it off.
        jvp_batch: Tangents pushed through one vmapped forward in ``jvp`` mode; more is
            faster on small models and costs that many times the activation memory.
        divergence_ratio: A step loss above this multiple of the first step's loss (or a
            non-finite one) counts as divergence, once it is also above chance (the loss of
            a uniform guess among a classifier's classes or the label tokens): batches of 8
            scored by a trained head range from 0.1 to 0.6 without anything going wrong.
        loss: As for the ``lora`` trainer: ``choices`` scores a generative classifier's
            answer among its label tokens only, ``vocabulary`` against every token. Data
            without label tokens is always scored against the vocabulary.
    """

    mode: GradMode = "fd"
    lr: PositiveNumber | None = 10.0
    scale_lr: bool = True
    eps: PositiveNumber = 1e-3
    target: PerturbTarget | Literal["auto"] = "auto"
    max_step_rms: PositiveNumber | None = 1e-2
    head_perturbations: int = Field(default=256, ge=1)
    head_max_step_rms: PositiveNumber | None = 5e-2
    answer_max_step: PositiveNumber = 3e-3
    upload: Upload = "seeds"
    candidates: int = Field(default=1, ge=1)
    jvp_batch: int = Field(default=1, ge=1)
    divergence_ratio: float = Field(default=2.0, gt=1)
    loss: Loss = "choices"


@dataclass(frozen=True)
class Derivatives:
    """The loss at the current point and the directional derivative along each perturbation.

    ``loss`` averages what the evaluations saw (central differences: the mean of each pair,
    which is the loss up to O(eps^2)).
    """

    loss: float
    d: tuple[float, ...]


def step_seed(seed: int, step: int) -> int:
    """The 64-bit perturbation seed of local step ``step`` of a fit seeded with ``seed``."""
    digest = hashlib.sha256(f"fwdgrad:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class _Objective(torch.nn.Module):
    """The model's loss on one batch as a module, so ``functional_call`` can swap its weights."""

    def __init__(
        self, model: PeftModel, batch: TokenBatch, choices: tuple[int, ...] | None
    ) -> None:
        super().__init__()
        self.model = model
        self.batch = batch
        self.choices = choices

    def forward(self) -> torch.Tensor:
        """Mean cross-entropy over the batch's scored outputs (the trainers' shared loss)."""
        return batch_loss(self.model, self.batch, choices=self.choices)


def _use_eager_attention(model: PeftModel) -> None:
    """Forward-mode AD goes through eager attention only (SDPA has no jvp rule on CPU)."""
    base = cast("PreTrainedModel", model.get_base_model())
    current = attention_implementation(base.config) or "eager"
    if current != "eager":
        log.info("fwdgrad jvp: switching attention from %s to eager", current)
        base.set_attn_implementation("eager")


class FwdGradTrainer:
    """Forward-gradient training of the LoRA adapter built by ``edgefed.ml.models.attach_lora``.

    Between fits the trainer keeps only two things: the previous global it was handed (for
    discriminative sampling) and a learning-rate back-off that halves after a divergence.
    """

    method: ClassVar[Method] = "fwdgrad"

    def __init__(self, model: PeftModel, config: FwdGradConfig | None = None) -> None:
        """Wrap ``model``; its adapter must come from ``attach_lora``."""
        params = adapter_parameters(model)
        self.model = model
        self.config = config or FwdGradConfig()
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        target = self.config.target
        if target == "auto":
            target = "head" if Layout(shapes, "head").size else "all"
        self.layout = Layout.from_shapes(shapes, target)
        self._params = {name: params[name] for name in self.layout.slices}
        by_id = {id(p): name for name, p in self._params.items()}
        self._module_names = {
            by_id[id(p)]: module_name
            for module_name, p in model.named_parameters()
            if id(p) in by_id
        }
        if self.config.mode == "jvp":
            _use_eager_attention(model)
        fd_head = target == "head" and self.config.mode == "fd"
        self._answer_rows = self._answer_rows_of(model) if fd_head else None
        self._head = self._owner() if fd_head and self._answer_rows is None else None
        self._previous_global: torch.Tensor | None = None
        self.lr_backoff = 1.0
        """Multiplier on the learning rate; halved each time a fit diverges and doubled
        back (up to 1) after each fit that does not, so one bad batch cannot stall it."""

    # ------------------------------------------------------------------ derivatives

    def _answer_rows_of(self, model: PeftModel) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        """A causal LM's answer rows and their tokens, if they are all that is perturbed."""
        tokens = lora_spec(model).head_tokens
        names = list(self._params)
        if not tokens or len(names) != 1 or not names[0].endswith(ANSWER_ROWS):
            return None
        return self._params[names[0]], tuple(tokens)

    def _owner(self) -> torch.nn.Module | None:
        """The one module holding every perturbed tensor (a classification head), if any."""
        owners = {name.rsplit(".", 1)[0] for name in self._module_names.values()}
        return self.model.get_submodule(owners.pop()) if len(owners) == 1 else None

    def _loss_function(
        self, batch: TokenBatch, choices: tuple[int, ...] | None
    ) -> Callable[[], float]:
        """The batch's loss at whatever the perturbed tensors hold when it is called.

        When only the head is perturbed, the trunk runs once here and each call runs only
        the head on the trunk's kept output; that is used only if the head's output is
        exactly the logits the loss scores (checked on this batch), else every call runs
        the whole model.
        """

        def whole() -> float:
            return float(batch_loss(self.model, batch, choices=choices))

        if self._answer_rows is not None:
            return self._answer_loss(batch, choices) or whole
        head = self._head
        if head is None:
            return whole
        logits, targets, trunk, output = self._scored_keeping(head, batch)
        if not (
            isinstance(trunk, torch.Tensor)
            and isinstance(output, torch.Tensor)
            and output.shape == logits.shape
            and torch.equal(output.float(), logits)
        ):
            return whole

        def head_only() -> float:
            return float(logits_loss(head(trunk).float(), targets, choices))

        return head_only

    def _scored_keeping(
        self, module: torch.nn.Module, batch: TokenBatch
    ) -> tuple[torch.Tensor, torch.Tensor, object, object]:
        """``scored_logits`` on ``batch``, plus ``module``'s input and output in that run."""
        kept: dict[str, object] = {}

        def keep(_: torch.nn.Module, args: tuple[object, ...], output: object) -> None:
            kept["input"], kept["output"] = args[0], output

        handle = module.register_forward_hook(keep)
        try:
            logits, targets = scored_logits(self.model, batch)
        finally:
            handle.remove()
        return logits, targets, kept.get("input"), kept.get("output")

    def _answer_loss(
        self, batch: TokenBatch, choices: tuple[int, ...] | None
    ) -> Callable[[], float] | None:
        """The batch's loss from the answer rows alone, on the LM head's kept input.

        The model runs once here; each call is one ``[m, hidden] x [hidden, answers]``
        product. None (run the whole model instead) when the loss is not among exactly the
        answer tokens, when an answer token occurs in the input (its embedding row is
        perturbed too), or when the product does not reproduce the model's loss.
        """
        assert self._answer_rows is not None
        rows, tokens = self._answer_rows
        if choices is None or set(choices) != set(tokens):
            return None
        if bool(torch.isin(batch.input_ids[:, :-1], torch.tensor(tokens)).any()):
            return None
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Module):
            return None
        logits, targets, hidden, _ = self._scored_keeping(head, batch)
        if not isinstance(hidden, torch.Tensor):
            return None
        features = scored_rows(hidden, batch.labels).float()
        position = {token: i for i, token in enumerate(tokens)}
        answers = torch.tensor([position[int(t)] for t in targets], dtype=torch.int64)

        def answers_only() -> float:
            scores = features @ rows.float().T
            return float(torch.nn.functional.cross_entropy(scores, answers))

        expected = float(logits_loss(logits, targets, choices))
        return answers_only if math.isclose(answers_only(), expected, rel_tol=1e-4) else None

    def _write(self, flat: torch.Tensor) -> None:
        """Set the perturbed parameters to ``flat`` (cast to their dtype)."""
        for name, (offset, length) in self.layout.slices.items():
            param = self._params[name]
            param.copy_(flat[offset : offset + length].view(param.shape))

    def _fd(
        self,
        point: torch.Tensor,
        batch: TokenBatch,
        seed: int,
        indices: tuple[int, ...],
        choices: tuple[int, ...] | None,
    ) -> Derivatives:
        eps = self.config.eps
        losses: list[float] = []
        d: list[float] = []
        loss = self._loss_function(batch, choices)
        for index in indices:
            v = rademacher(seed, index, self.layout.size).mul_(eps)
            self._write(point + v)
            plus = loss()
            self._write(point - v)
            minus = loss()
            d.append((plus - minus) / (2 * eps))
            losses.append((plus + minus) / 2)
        self._write(point)
        return Derivatives(loss=math.fsum(losses) / len(losses), d=tuple(d))

    def _jvp(
        self,
        point: torch.Tensor,
        batch: TokenBatch,
        seed: int,
        indices: tuple[int, ...],
        choices: tuple[int, ...] | None,
    ) -> Derivatives:
        objective = _Objective(self.model, batch, choices)
        names = [f"model.{self._module_names[name]}" for name in self.layout.slices]
        shapes = [self._params[name].shape for name in self.layout.slices]
        spans = list(self.layout.slices.values())
        primals = {
            module: point[offset : offset + length].view(shape)
            for module, shape, (offset, length) in zip(names, shapes, spans, strict=True)
        }

        def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
            loss: torch.Tensor = functional_call(objective, params, args=(), strict=False)
            return loss

        def push(tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            tangents = {
                module: tangent[offset : offset + length].view(shape)
                for module, shape, (offset, length) in zip(names, shapes, spans, strict=True)
            }
            pushed = jvp(loss_of, (primals,), (tangents,))
            return pushed[0], pushed[1]

        losses: list[float] = []
        d: list[float] = []
        width = self.config.jvp_batch
        for start in range(0, len(indices), width):
            chunk = indices[start : start + width]
            vs = [rademacher(seed, index, self.layout.size) for index in chunk]
            if len(vs) == 1:
                loss, derivative = push(vs[0])
                losses.append(float(loss))
                d.append(float(derivative))
            else:
                loss_b, derivative_b = vmap(push)(torch.stack(vs))
                losses += [float(x) for x in loss_b]
                d += [float(x) for x in derivative_b]
        return Derivatives(loss=math.fsum(losses) / len(losses), d=tuple(d))

    def derivatives(
        self,
        batch: TokenBatch,
        *,
        seed: int,
        indices: tuple[int, ...],
        choices: tuple[int, ...] | None = None,
    ) -> Derivatives:
        """Loss and ``grad L . v(seed, i)`` for each index, at the adapter's current values.

        ``L`` is ``edgefed.ml.objectives.batch_loss`` (attention mask, classifier labels and
        ``choices`` included), the loss the ``lora`` trainer minimises too. The model must
        be in eval mode (no dropout) for central differences to mean anything; :meth:`fit`
        sees to that, direct callers must too.
        """
        point = self.layout.flatten(self._params).to(torch.float32)
        with torch.no_grad():
            if self.config.mode == "jvp":
                return self._jvp(point, batch, seed, indices, choices)
            return self._fd(point, batch, seed, indices, choices)

    # ------------------------------------------------------------------ sampling

    def _choose(self, seed: int, count: int, direction: torch.Tensor | None) -> tuple[int, ...]:
        """Perturbation indices for one step: the first ``count``, or the best aligned."""
        m = self.config.candidates
        if m == 1 or direction is None:
            return tuple(range(count))
        scores = torch.stack(
            [
                rademacher(seed, index, self.layout.size, dtype=torch.float64).dot(direction).abs()
                for index in range(m * count)
            ]
        )
        # Stable order: best score first, lower index on ties; then back to index order.
        order = sorted(range(m * count), key=lambda i: (-float(scores[i]), i))
        return tuple(sorted(order[:count]))

    # ------------------------------------------------------------------ fit

    def learning_rate(self, spec: TrainSpec, perturbations: int) -> float:
        """The SGD rate a fit uses: base rate, scaled by ``K / (n + K)``, times the back-off."""
        base = self.config.lr if self.config.lr is not None else spec.lr
        if self.config.scale_lr:
            base *= perturbations / (self.layout.size + perturbations)
        return base * self.lr_backoff

    def fit(
        self, global_adapter: TensorMap, data: TokenDataset, spec: TrainSpec, *, seed: int
    ) -> FitResult:
        """Run ``spec.local_steps`` forward-gradient steps of ``spec.perturbations`` each.

        With only a head evaluated on the trunk's kept output, a step uses at least
        ``head_perturbations`` and is clipped at ``head_max_step_rms``.

        Raises:
            ConfigError: ``global_adapter`` does not fit the model.
        """
        started = time.perf_counter()
        set_adapter(self.model, global_adapter)
        start = self.layout.flatten(global_adapter)
        settings = self._step_settings(spec, start, data)
        progress = FitProgress(start, torch.zeros(self.layout.size, dtype=torch.float64))
        with self._forward_only():
            self._take_steps(progress, settings, data, spec, seed=seed)
        self._adjust_backoff(progress, spec, settings.lr)
        delta = adapter_delta(self.model, global_adapter)
        seeds = (
            progress.seed_delta(settings.lr, self.layout) if self.config.upload == "seeds" else None
        )
        return FitResult(
            delta=delta,
            num_samples=max(1, min(progress.visited, len(data))),
            train_loss=progress.train_loss,
            compute_s=time.perf_counter() - started,
            steps=len(progress.steps),
            seeds=seeds,
            variance=progress.variance,
            diverged=progress.diverged,
        )

    def _step_settings(
        self, spec: TrainSpec, start: torch.Tensor, data: TokenDataset
    ) -> StepSettings:
        """The settings every step of a fit from ``start`` shares (head-only fits differ)."""
        direction = self._note_global(start)
        count, max_rms = spec.perturbations, self.config.max_step_rms
        if self._head is not None or self._answer_rows is not None:
            count, max_rms = (
                max(count, self.config.head_perturbations),
                self.config.head_max_step_rms,
            )
        bound = None if max_rms is None else max_rms * math.sqrt(self.layout.size)
        if self._answer_rows is not None:  # pretrained rows: a step relative to their size
            bound = self.config.answer_max_step * float(start.norm())
        choices = data.choices if self.config.loss == "choices" else None
        classes = len(choices) if choices else classifier_classes(self.model)
        return StepSettings(
            count=count,
            lr=self.learning_rate(spec, count),
            bound=bound,
            direction=direction,
            choices=choices,
            chance=math.log(classes) if classes else 0.0,
        )

    @contextmanager
    def _forward_only(self) -> Iterator[None]:
        """Eval mode and no gradients while a fit runs; the model's own flags come back after."""
        model = self.model
        grad_flags = {name: p.requires_grad for name, p in adapter_parameters(model).items()}
        was_training = model.training
        model.eval()  # no dropout: a central difference of two noisy losses is noise
        for p in adapter_parameters(model).values():
            p.requires_grad_(False)  # forward passes only: never build a backward graph
        try:
            yield
        finally:
            for name, p in adapter_parameters(model).items():
                p.requires_grad_(grad_flags[name])
            model.train(was_training)

    def _take_steps(
        self,
        progress: FitProgress,
        settings: StepSettings,
        data: TokenDataset,
        spec: TrainSpec,
        *,
        seed: int,
    ) -> None:
        """Step until ``spec.local_steps`` are done or the loss diverges (that step undone)."""
        batches = endless_batches(data, spec.batch_size, seed=seed)
        for index in range(spec.local_steps):
            batch = cut_to_length(next(batches), spec.seq_len)
            seed_s = step_seed(seed, index)
            indices = self._choose(seed_s, settings.count, settings.direction)
            measured = self.derivatives(
                batch, seed=seed_s, indices=indices, choices=settings.choices
            )
            if self._diverging(measured, progress.losses, settings.chance):
                progress.diverged = True
                if progress.undo_last():
                    self._write_total(progress.start, progress.total)
                return
            progress.losses.append(measured.loss)
            progress.visited += len(batch)
            if not self._step(progress, settings, seed_s, indices, measured):
                progress.diverged = True
                return

    def _step(
        self,
        progress: FitProgress,
        settings: StepSettings,
        seed: int,
        indices: tuple[int, ...],
        measured: Derivatives,
    ) -> bool:
        """Move the adapter along the estimate from ``measured``, clipped; False on overflow."""
        found = estimate(self.layout, seed, indices, measured.d)
        norm = settings.lr * float(found.mean.norm())
        if not math.isfinite(norm):  # finite derivatives, yet a step beyond floats
            return False
        step = SeedStep(seed=seed, indices=indices, d=measured.d, scale=settings.clip_scale(norm))
        progress.take(step, found.mean.mul_(-settings.lr * step.scale), found.variance)
        self._write_total(progress.start, progress.total)
        return True

    def _adjust_backoff(self, progress: FitProgress, spec: TrainSpec, lr: float) -> None:
        """Halve the learning rate after a divergence; otherwise double it back towards 1."""
        if not progress.diverged:
            self.lr_backoff = min(1.0, 2 * self.lr_backoff)
            return
        self.lr_backoff /= 2
        log.warning(
            "fwdgrad diverged after %d of %d steps (lr %.3g); step undone, "
            "learning rate halved for later fits",
            len(progress.steps),
            spec.local_steps,
            lr,
        )

    def _write_total(self, start: torch.Tensor, total: torch.Tensor) -> None:
        with torch.no_grad():
            self._write(start + total)

    def _diverging(self, measured: Derivatives, losses: list[float], chance: float) -> bool:
        if not math.isfinite(measured.loss) or not all(math.isfinite(x) for x in measured.d):
            return True
        limit = max(self.config.divergence_ratio * losses[0], chance) if losses else math.inf
        return measured.loss > limit

    def _note_global(self, start: torch.Tensor) -> torch.Tensor | None:
        """Remember this global; return the change from the previous one, if any."""
        previous, self._previous_global = self._previous_global, start.clone()
        if previous is None or self.config.candidates == 1:
            return None
        direction = start - previous
        return direction if float(direction.norm()) > 0 else None
