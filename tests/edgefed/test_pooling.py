"""A sentence encoder classifies from the mean of its token states, as it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from edgefed.ml.models import attach_lora, build_model
from edgefed.ml.pooling import POOLING_CONFIG, MaskedMeanPooler, pool_by_mean, trained_pooling
from schemas.errors import ConfigError
from schemas.messages import LoraSpec
from tests.assets_helpers import require_minilm


def _tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def test_the_mean_covers_only_the_tokens_the_mask_keeps() -> None:
    model = _tiny_bert()
    assert pool_by_mean(model)
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 4:] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[1]
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits[0]
        hidden = model.bert(input_ids=ids[1:, :4]).last_hidden_state
        by_hand = model.classifier(hidden.mean(dim=1))[0]
    torch.testing.assert_close(padded, alone)
    torch.testing.assert_close(alone, by_hand)


def test_a_model_without_a_pooler_is_left_as_it_is() -> None:
    assert not pool_by_mean(torch.nn.Linear(2, 2))


def test_the_pooling_config_decides(tmp_path: Path) -> None:
    assert trained_pooling(tmp_path) is None
    (tmp_path / POOLING_CONFIG).parent.mkdir()
    (tmp_path / POOLING_CONFIG).write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert trained_pooling(tmp_path) == "mean"
    (tmp_path / POOLING_CONFIG).write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert trained_pooling(tmp_path) is None
    (tmp_path / POOLING_CONFIG).write_text("{not json")
    with pytest.raises(ConfigError, match="pooling config"):
        trained_pooling(tmp_path)


def test_minilm_pools_by_the_mean_in_every_copy_with_its_own_mask() -> None:
    """Each built copy keeps its own mask: devices in one process never share one."""
    require_minilm()
    first = attach_lora(build_model("minilm-l6", num_labels=4), LoraSpec())
    second = build_model("minilm-l6", num_labels=4)
    poolers = [m.get_base_model().bert.pooler for m in (first,)] + [second.bert.pooler]
    assert all(isinstance(p, MaskedMeanPooler) for p in poolers)
    first(input_ids=torch.ones(1, 5, dtype=torch.int64), attention_mask=torch.ones(1, 5))
    assert poolers[0]._mask is not None and poolers[1]._mask is None
