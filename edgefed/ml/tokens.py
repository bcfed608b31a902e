"""Token datasets and batches: what devices train on and the aggregator evaluates on.

Every source (the synthetic task, token files, text through a tokenizer) ends up as a
:class:`TokenDataset`; models and objectives see only :class:`TokenBatch` es of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from schemas.errors import ConfigError

IGNORE_INDEX = -100
"""Label value for positions that are not scored (the transformers convention)."""


@dataclass(frozen=True)
class TokenBatch:
    """One batch: ``input_ids`` ``[batch, seq_len]``, labels per position or per row.

    ``attention_mask`` (1 = real token) is set for padded text and ``None`` when every
    position is real.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class TokenDataset:
    """Fixed-length token sequences with optional per-position labels.

    Attributes:
        input_ids: ``[n, seq_len]`` int64 token ids.
        labels: ``[n, seq_len]`` int64, the token each position should be predicted as
            (the model shifts them), ``IGNORE_INDEX`` where nothing is scored. ``None``
            means every position is scored against ``input_ids``. For a classifier
            (encoder plus head) it is ``[n]``: one class per sequence.
        attention_mask: ``[n, seq_len]`` int64, 1 for real tokens and 0 for padding;
            ``None`` when nothing is padded (or padding sits after every scored position).
        choices: Token ids that compete for accuracy at the scored positions (a
            generative classifier's label words); ``None`` scores against the whole vocabulary.
    """

    input_ids: Tensor
    labels: Tensor | None = None
    attention_mask: Tensor | None = None
    choices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        ids = self.input_ids
        if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
            raise ConfigError(
                f"input_ids must be int64 [n >= 1, seq_len >= 2], got {ids.dtype} {tuple(ids.shape)}"
            )
        if int(ids.min()) < 0:
            raise ConfigError("input_ids must be non-negative")
        if self.labels is not None and (
            self.labels.dtype != torch.int64 or self.labels.shape not in (ids.shape, ids.shape[:1])
        ):
            raise ConfigError(
                f"labels must be int64 shaped like input_ids {tuple(ids.shape)} or [n], "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        mask = self.attention_mask
        if mask is not None and (mask.dtype != torch.int64 or mask.shape != ids.shape):
            raise ConfigError(
                f"attention_mask must be int64 shaped like input_ids {tuple(ids.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Length of every sequence."""
        return int(self.input_ids.shape[1])

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None
    ) -> Iterator[TokenBatch]:
        """One pass over the data; the last batch may be smaller.

        Columns that are padding in every row of a batch are dropped, so a batch of
        short texts costs what short texts cost.

        Args:
            batch_size: Sequences per batch.
            generator: Shuffles the order; ``None`` keeps dataset order (evaluation).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
        labels = self.input_ids if self.labels is None else self.labels
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            ids, rows = self.input_ids[idx], labels[idx]
            if self.attention_mask is None:
                yield TokenBatch(input_ids=ids, labels=rows)
                continue
            mask = self.attention_mask[idx]
            used = mask.any(dim=0)
            yield TokenBatch(
                input_ids=ids[:, used],
                labels=rows[:, used] if rows.dim() == 2 else rows,
                attention_mask=mask[:, used],
            )

    def subset(self, indices: Tensor) -> TokenDataset:
        """The rows at ``indices`` (int64), as a new dataset."""
        return TokenDataset(
            input_ids=self.input_ids[indices],
            labels=None if self.labels is None else self.labels[indices],
            attention_mask=None if self.attention_mask is None else self.attention_mask[indices],
            choices=self.choices,
        )
