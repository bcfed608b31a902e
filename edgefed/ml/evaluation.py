"""Held-out loss and accuracy of a model on a token dataset."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from edgefed.ml.objectives import predictions, scored_logits
from edgefed.ml.tokens import TokenDataset
from schemas.errors import ConfigError


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token loss and accuracy over the scored positions."""

    loss: float
    accuracy: float
    tokens: int


def evaluate(
    model: PreTrainedModel | PeftModel, data: TokenDataset, *, batch_size: int = 32
) -> EvalResult:
    """Loss and accuracy of ``model`` on ``data``, weighted by scored outputs.

    Causal LMs are scored on next tokens (among ``data.choices`` only, when set);
    classifiers on their one label per sequence. Runs under ``torch.inference_mode`` in
    eval mode and puts the model back in the mode it was in, so it can sit between
    training steps. Padded rows are visited shortest first (less padding per batch).

    Args:
        model: A causal LM or classifier, plain or with an adapter attached.
        data: Sequences to score; positions whose label is ``IGNORE_INDEX`` do not count.
        batch_size: Sequences per forward pass.

    Raises:
        ConfigError: A token id is outside the model's vocabulary, or nothing is scored.
    """
    embeddings = model.get_input_embeddings()
    top = int(data.input_ids.max())
    if isinstance(embeddings, nn.Embedding) and top >= embeddings.num_embeddings:
        raise ConfigError(
            f"token id {top} is outside the vocabulary of {embeddings.num_embeddings}"
        )
    was_training = model.training
    loss_sum = 0.0
    correct = 0
    tokens = 0
    if data.attention_mask is not None:
        data = data.subset(torch.argsort(data.attention_mask.sum(dim=1), stable=True))
    model.eval()
    try:
        with torch.inference_mode():
            for batch in data.batches(batch_size, generator=None):
                logits, targets = scored_logits(model, batch)
                loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
                correct += int((predictions(logits, data.choices) == targets).sum())
                tokens += int(targets.numel())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ConfigError("evaluation data has no scored positions")
    return EvalResult(loss=loss_sum / tokens, accuracy=correct / tokens, tokens=tokens)
