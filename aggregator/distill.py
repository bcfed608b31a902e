"""Knowledge distillation on the aggregator: ensemble device logits, distill into the global.

Pure: tensors in, tensors out, no I/O and no logging (docs/architecture.md §6 ``kd``). Devices
upload top-k logits on a proxy slice; :func:`ensemble` turns the uploads of one slice into one
teacher distribution per scored position, and :func:`distill` trains the global adapter
towards the teachers with a temperature-scaled KL loss for a few server steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from edgefed.data.kd_proxy import proxy_batch
from edgefed.ml.models import adapter_parameters, get_adapter, set_adapter
from edgefed.ml.objectives import scored_logits
from edgefed.ml.tokens import TokenDataset
from schemas.errors import ConfigError
from schemas.messages import TensorMap


def top_k_probabilities(
    indices: torch.Tensor, values: torch.Tensor, *, vocab: int, temperature: float
) -> torch.Tensor:
    """A device's softened distribution ``[positions, vocab]`` from its top-k logits.

    The softmax runs over the k logits sent (at ``temperature``); tokens outside them get
    no mass. The tail the device did not send is unknown, and any guess at it (a floor,
    the k-th value) would invent knowledge; with small k the top tokens hold nearly all
    of a trained model's mass anyway.
    """
    probs = torch.softmax(values.float() / temperature, dim=-1)
    dense = torch.zeros((indices.shape[0], vocab), dtype=torch.float32)
    return dense.scatter_(1, indices.long(), probs)


def ensemble(
    parts: Sequence[tuple[TensorMap, float]], *, vocab: int, temperature: float
) -> torch.Tensor:
    """The weighted average of the devices' probabilities: one teacher per position.

    Probabilities, not logits, are averaged. Each device sends a different top-k set, so a
    logit average needs a value for the entries a device left out, and any choice biases
    it; a missing entry as zero probability is exact for the distribution that was sent.
    Devices run different models whose logits sit on different scales (a deeper model is
    often more confident): averaging logits lets the largest scale dominate, while
    probabilities are comparable across models. And the average of probabilities is a
    proper mixture, the predictive distribution of the ensemble.

    Args:
        parts: ``({"indices", "values"}, weight)`` per device, all for the same slice.
        vocab: Vocabulary size of the global model.
        temperature: Softening applied to every device's logits.

    Raises:
        ConfigError: No parts, or weights that do not sum to a positive number.
    """
    total = math.fsum(weight for _, weight in parts)
    if not parts or not total > 0:
        raise ConfigError("an ensemble needs parts with a positive total weight")
    teacher = torch.zeros(())
    for logits, weight in parts:
        probs = top_k_probabilities(
            logits["indices"], logits["values"], vocab=vocab, temperature=temperature
        )
        teacher = teacher + (weight / total) * probs
    return teacher


@dataclass(frozen=True)
class DistillTarget:
    """One proxy slice and the ensemble's teacher distribution on its scored positions."""

    data: TokenDataset
    teacher: torch.Tensor
    weight: float


def kd_loss(
    student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T² · KL(teacher ‖ softmax(student / T))`` averaged over positions.

    The ``T²`` keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    log_student = torch.log_softmax(student_logits / temperature, dim=-1)
    kl = nn.functional.kl_div(log_student, teacher, reduction="batchmean")
    return kl * temperature**2


def distill(
    model: PeftModel,
    start: TensorMap,
    targets: Sequence[DistillTarget],
    *,
    temperature: float,
    steps: int,
    lr: float,
    grad_clip: float = 1.0,
) -> tuple[TensorMap, float]:
    """Train the adapter from ``start`` towards the teachers; return it and the last loss.

    Each step takes one AdamW step on the weighted mean KD loss over all slices (each
    slice is one batch). Only the adapter moves; the optimiser is fresh per call, like a
    device's, so the result depends on nothing but its inputs.

    Raises:
        ConfigError: No targets, or ``steps``/``lr``/``temperature`` out of range.
    """
    if not targets or steps < 1 or not lr > 0 or not temperature > 0:
        raise ConfigError(
            f"distill needs targets, steps >= 1, lr > 0, temperature > 0; "
            f"got {len(targets)} targets, {steps=}, {lr=}, {temperature=}"
        )
    set_adapter(model, start)
    params = adapter_parameters(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    total = math.fsum(target.weight for target in targets)
    batches = [proxy_batch(target.data) for target in targets]
    was_training = model.training
    model.train()
    loss = torch.zeros(())
    try:
        for _ in range(steps):
            loss = torch.zeros(())
            for target, batch in zip(targets, batches, strict=True):
                student, _ = scored_logits(model, batch)
                loss = loss + (target.weight / total) * kd_loss(
                    student, target.teacher, temperature
                )
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return get_adapter(model), float(loss.detach())
