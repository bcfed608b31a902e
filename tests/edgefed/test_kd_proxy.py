"""The proxy set both sides of knowledge distillation see the same way."""

from __future__ import annotations

import pytest
import torch

from edgefed.data.kd_proxy import load_proxy, proxy_logits, scored_positions, select_indices, top_k
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.models import TINY_VOCAB, attach_lora, build_model
from edgefed.ml.tokens import IGNORE_INDEX, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, ModelRef, ProxySpec


def test_select_indices_is_deterministic_distinct_and_fresh_per_slice() -> None:
    first = select_indices(pool=100, size=10, seed=3, slice_id=0)
    assert first == select_indices(pool=100, size=10, seed=3, slice_id=0)
    assert len(set(first)) == 10
    assert list(first) == sorted(first)
    assert all(0 <= i < 100 for i in first)
    assert first != select_indices(pool=100, size=10, seed=3, slice_id=1)
    with pytest.raises(ConfigError, match="size"):
        select_indices(pool=5, size=6, seed=0, slice_id=0)


def test_load_proxy_keeps_the_named_rows() -> None:
    spec = ProxySpec(dataset="synthetic:n=40,seed=11", indices=(2, 7, 30), slice_id=0)
    data = load_proxy(spec, seq_len=16, model=ModelRef(name="tiny"))
    source = synthetic_dataset(40, seq_len=16, seed=11)
    assert torch.equal(data.input_ids, source.input_ids[[2, 7, 30]])
    with pytest.raises(ConfigError, match="outside"):
        load_proxy(
            spec.model_copy(update={"indices": (40,)}), seq_len=16, model=ModelRef(name="tiny")
        )


def test_scored_positions_counts_only_label_tokens_where_the_task_marks_them() -> None:
    ids = torch.arange(24, dtype=torch.int64).reshape(3, 8) % TINY_VOCAB
    assert scored_positions(TokenDataset(input_ids=ids)) == 3 * 7
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]  # one answer token per row, as in a prompted classifier
    labelled = TokenDataset(input_ids=ids, labels=labels)
    assert scored_positions(labelled) == 3
    model = attach_lora(build_model("tiny"), LoraSpec())
    assert tuple(proxy_logits(model, labelled).shape) == (3, TINY_VOCAB)


def test_top_k_keeps_the_largest_logits_in_compact_dtypes() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.5]])
    packed = top_k(logits, 2)
    assert packed["indices"].dtype == torch.int32
    assert packed["values"].dtype == torch.float16
    assert packed["indices"].tolist() == [[1, 3], [0, 2]]
    assert packed["values"].tolist() == [[3.0, 2.0], [5.0, 4.0]]
    with pytest.raises(ConfigError, match="top_k"):
        top_k(logits, 5)
