"""What a model is scored on: the logits at the scored positions, and the loss over them.

One function decides which outputs count, so training and evaluation never disagree:

- causal LMs predict ``labels[:, t]`` from position ``t - 1``; positions labelled
  ``IGNORE_INDEX`` do not count. Only the positions from the first scored one onward go
  through the LM head (``logits_to_keep``): for a prompt whose only scored token is the
  answer at the end, that skips a ``[batch, seq, vocab]`` tensor of ~50k columns.
- classifiers (an encoder with a head) carry one label per sequence (``labels`` is 1-D).

This module has no runtime dependency on ``edgefed.data`` (which imports it).
"""

from __future__ import annotations

import inspect

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from edgefed.ml.tokens import IGNORE_INDEX, TokenBatch


def _accepts_logits_to_keep(model: PreTrainedModel | PeftModel) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def scored_logits(model: PreTrainedModel | PeftModel, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """Run ``model`` on ``batch``; return ``(logits [m, classes], targets [m])``.

    For causal LMs ``m`` is the number of scored positions and ``classes`` the
    vocabulary; for classifiers ``m`` is the batch size and ``classes`` the head's size.
    Logits come back in float32 whatever the model computes in.
    """
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    labels = batch.labels.to(device)
    if labels.dim() == 1:
        logits: Tensor = model(input_ids=input_ids, attention_mask=mask).logits
        return logits.float(), labels
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    columns = scored.any(dim=0).nonzero()
    first = int(columns[0]) if len(columns) else 0
    options: dict[str, object] = {}
    if first > 0 and _accepts_logits_to_keep(model):
        # Logits for positions first .. seq-1; the last one predicts nothing here.
        options["logits_to_keep"] = input_ids.shape[1] - first
    else:
        first = 0
    out = model(input_ids=input_ids, attention_mask=mask, **options).logits
    kept = out[:, :-1]
    keep = scored[:, first:]
    return kept[keep].float(), targets[:, first:][keep]


def scored_rows(hidden: Tensor, labels: Tensor) -> Tensor:
    """The ``[m, h]`` rows of ``hidden`` that :func:`scored_logits` scores, in its order.

    ``hidden`` (``[b, kept, h]``) is what a causal LM's head saw: every position or, with
    ``logits_to_keep``, the last ones only.
    """
    targets = labels[:, 1:]
    first = labels.shape[1] - hidden.shape[1]
    return hidden[:, :-1][(targets != IGNORE_INDEX)[:, first:]]


def batch_loss(
    model: PreTrainedModel | PeftModel,
    batch: TokenBatch,
    *,
    choices: tuple[int, ...] | None = None,
) -> Tensor:
    """Mean cross-entropy over the scored outputs of ``batch`` (what trainers minimise).

    With ``choices`` (a generative classifier's label tokens) only those logits compete,
    as in :func:`predictions`: the loss then measures the decision accuracy counts, and
    its gradient is not spent on pushing the rest of the vocabulary down.

    Raises:
        ValueError: Nothing in the batch is scored, or a target is not among ``choices``.
    """
    logits, targets = scored_logits(model, batch)
    return logits_loss(logits, targets, choices)


def logits_loss(logits: Tensor, targets: Tensor, choices: tuple[int, ...] | None) -> Tensor:
    """:func:`batch_loss` from logits already computed (``scored_logits``' output).

    Raises:
        ValueError: Nothing is scored, or a target is not among ``choices``.
    """
    if targets.numel() == 0:
        raise ValueError("batch has no scored positions")
    if choices is None:
        return nn.functional.cross_entropy(logits, targets)
    return choice_cross_entropy(logits, targets, choices)


def choice_cross_entropy(logits: Tensor, targets: Tensor, choices: tuple[int, ...]) -> Tensor:
    """Cross-entropy of ``targets`` among the ``choices`` columns of ``logits`` only.

    Raises:
        ValueError: A target is not one of ``choices``.
    """
    allowed = torch.tensor(choices, dtype=torch.int64, device=logits.device)
    hits = targets.unsqueeze(-1) == allowed
    if not bool(hits.any(dim=-1).all()):
        outside = sorted(set(targets.tolist()) - set(choices))
        raise ValueError(f"targets {outside} are not among the choices {list(choices)}")
    return nn.functional.cross_entropy(logits[:, allowed], hits.int().argmax(dim=-1))


def predictions(logits: Tensor, choices: tuple[int, ...] | None) -> Tensor:
    """The predicted class of each row; with ``choices`` only those columns compete.

    Scoring a generative classifier this way ("is ' positive' likelier than
    ' negative'?") measures what it knows about the task, not whether it also learned
    to never say anything else.
    """
    if choices is None:
        return logits.argmax(dim=-1)
    allowed = torch.tensor(choices, dtype=torch.int64, device=logits.device)
    return allowed[logits[:, allowed].argmax(dim=-1)]
