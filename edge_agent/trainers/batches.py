"""What every local trainer draws its steps from, and the delta every fit ends with.

The trainers share one batch order (shuffled epochs from a generator seeded with the fit's
seed) and one cut of unpadded rows to the task's length, so methods that share a federation
see the same data the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft import PeftModel

from edgefed.ml.models import get_adapter
from edgefed.ml.tokens import TokenBatch, TokenDataset
from schemas.messages import TensorMap


def endless_batches(data: TokenDataset, batch_size: int, *, seed: int) -> Iterator[TokenBatch]:
    """Shuffled epochs back to back, so ``local_steps`` may exceed one pass."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from data.batches(batch_size, generator=generator)


def cut_to_length(batch: TokenBatch, seq_len: int) -> TokenBatch:
    """Unpadded token rows cut to the task's length; padded text is at that length already."""
    if batch.attention_mask is None and batch.labels.dim() == 2:
        return TokenBatch(input_ids=batch.input_ids[:, :seq_len], labels=batch.labels[:, :seq_len])
    return batch


def adapter_delta(model: PeftModel, global_adapter: TensorMap) -> TensorMap:
    """The model's adapter minus ``global_adapter``, float32 on the CPU, by wire name."""
    trained = get_adapter(model)
    return {
        name: trained[name] - global_adapter[name].detach().to("cpu", torch.float32)
        for name in trained
    }
