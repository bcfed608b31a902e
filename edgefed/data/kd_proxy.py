"""The public proxy set of knowledge distillation, seen the same way by devices and server.

KD devices answer with logits on a slice of a public dataset (docs/architecture.md §6 ``kd``). Both
sides must agree on the slice's rows and on which outputs are scored, or the logits would
be matched against the wrong positions. Everything here is therefore deterministic: the
slice is a pure function of (seed, slice id), the whole slice runs as one batch in dataset
order, and the scored positions come from ``edgefed.ml.objectives.scored_logits``, the same
rule training and evaluation use (every next token for plain sequences, only the label
tokens where the task marks them).
"""

from __future__ import annotations

import functools
from typing import Final

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from edgefed.data.loading import load_data
from edgefed.ml.objectives import scored_logits
from edgefed.ml.tokens import IGNORE_INDEX, TokenBatch, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import ModelRef, ProxySpec, TensorMap

LOGIT_KEYS: Final = ("indices", "values")
"""Names of the two tensors of a KD upload: token ids and their logits, ``[positions, k]``."""

_CACHED_SOURCES: Final = 8


def select_indices(*, pool: int, size: int, seed: int, slice_id: int) -> tuple[int, ...]:
    """The rows of slice ``slice_id``: ``size`` distinct rows of ``pool``, sorted.

    A pure function, so a restarted aggregator picks the very slices it announced before.

    Raises:
        ConfigError: ``size`` is not in ``1..pool``.
    """
    if not 0 < size <= pool:
        raise ConfigError(f"a proxy slice needs 1 <= size <= pool, got {size=} {pool=}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + slice_id)
    chosen = torch.randperm(pool, generator=generator)[:size]
    return tuple(sorted(int(i) for i in chosen))


@functools.lru_cache(maxsize=_CACHED_SOURCES)
def _load_source(dataset: str, seq_len: int, model: str) -> TokenDataset:
    return load_data(dataset, seq_len=seq_len, model=ModelRef(name=model))


def load_proxy(spec: ProxySpec, *, seq_len: int, model: ModelRef) -> TokenDataset:
    """The rows ``spec`` names, from the same assets as the training data (cached per source).

    Raises:
        ConfigError: The source cannot be loaded or an index is outside it.
    """
    source = _load_source(spec.dataset, seq_len, model.name)
    if max(spec.indices) >= len(source):
        raise ConfigError(
            f"proxy index {max(spec.indices)} is outside {spec.dataset!r} ({len(source)} rows)"
        )
    return source.subset(torch.tensor(spec.indices, dtype=torch.int64))


def source_size(dataset: str, *, seq_len: int, model: ModelRef) -> int:
    """Rows in a proxy source, the pool slices are drawn from."""
    return len(_load_source(dataset, seq_len, model.name))


def proxy_batch(data: TokenDataset) -> TokenBatch:
    """The whole slice as one batch in dataset order: both sides score the same positions."""
    return next(data.batches(len(data), generator=None))


def scored_positions(data: TokenDataset) -> int:
    """How many outputs of the slice are scored: the first dimension of every KD upload."""
    batch = proxy_batch(data)
    if batch.labels.dim() == 1:
        return len(batch)
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def proxy_logits(model: PreTrainedModel | PeftModel, data: TokenDataset) -> torch.Tensor:
    """``model``'s float32 logits ``[scored positions, vocab]`` on the slice, no gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits, _ = scored_logits(model, proxy_batch(data))
    finally:
        model.train(was_training)
    return logits


def top_k(logits: torch.Tensor, k: int) -> TensorMap:
    """The ``k`` largest logits per row as ``{"indices": int32, "values": float16}``.

    fp16 keeps three significant digits, plenty for a softened teacher distribution; int32
    ids cover any real vocabulary. The size is ``rows x k x 6`` bytes whatever the model.

    Raises:
        ConfigError: ``k`` exceeds the vocabulary.
    """
    if not 0 < k <= logits.shape[-1]:
        raise ConfigError(f"top_k must be in 1..{logits.shape[-1]}, got {k}")
    values, indices = torch.topk(logits.float(), k, dim=-1)
    return {"indices": indices.to("cpu", torch.int32), "values": values.to("cpu", torch.float16)}
