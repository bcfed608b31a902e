import json

import pytest
import torch

from edgefed.data.loading import load_data
from edgefed.data.partition import shard_sizes
from edgefed.data.synthetic import (
    SYNTHETIC_INCREMENT,
    SYNTHETIC_MULTIPLIER,
    SYNTHETIC_VOCAB,
    synthetic_dataset,
    synthetic_shards,
)
from edgefed.ml.evaluation import EvalResult, evaluate
from edgefed.ml.models import build_model
from edgefed.ml.tokens import IGNORE_INDEX, TokenDataset
from schemas.errors import ConfigError


def test_synthetic_dataset_follows_rule_and_is_seeded():
    data = synthetic_dataset(50, seq_len=16, seed=3)
    ids = data.input_ids
    assert ids.shape == (50, 16)
    assert ids.dtype == torch.int64
    assert torch.equal(
        ids[:, 1:], (SYNTHETIC_MULTIPLIER * ids[:, :-1] + SYNTHETIC_INCREMENT) % SYNTHETIC_VOCAB
    )
    assert torch.equal(synthetic_dataset(50, seq_len=16, seed=3).input_ids, ids)
    assert not torch.equal(synthetic_dataset(50, seq_len=16, seed=4).input_ids, ids)
    assert len(torch.unique(ids[:, 0])) > 20  # starts vary


def test_synthetic_rule_visits_whole_vocab():
    seq = synthetic_dataset(1, seq_len=SYNTHETIC_VOCAB, seed=0).input_ids[0]
    assert len(torch.unique(seq)) == SYNTHETIC_VOCAB


def test_batches_cover_once_shuffled_by_generator():
    data = synthetic_dataset(21, seq_len=8, seed=0)
    batches = list(data.batches(8, generator=torch.Generator().manual_seed(1)))
    assert [len(b) for b in batches] == [8, 8, 5]
    rows = torch.cat([b.input_ids for b in batches])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, data.input_ids.tolist()))
    again = list(data.batches(8, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again, strict=True))
    ordered = torch.cat([b.input_ids for b in data.batches(8, generator=None)])
    assert torch.equal(ordered, data.input_ids)
    assert not torch.equal(rows, data.input_ids)
    assert torch.equal(batches[0].labels, batches[0].input_ids)  # no labels: score all


def test_token_dataset_validates():
    with pytest.raises(ConfigError):
        TokenDataset(input_ids=torch.zeros(3, 4))  # float
    with pytest.raises(ConfigError):
        TokenDataset(input_ids=torch.zeros(4, dtype=torch.int64))  # 1-D
    with pytest.raises(ConfigError):
        TokenDataset(input_ids=torch.full((2, 4), -1, dtype=torch.int64))
    with pytest.raises(ConfigError):
        TokenDataset(
            input_ids=torch.zeros(2, 4, dtype=torch.int64),
            labels=torch.zeros(2, 3, dtype=torch.int64),
        )


def test_shard_sizes_uneven_sum_to_total_with_minimum():
    sizes = shard_sizes(6, total=300, seed=0, skew=1.0, min_size=8)
    assert sum(sizes) == 300
    assert min(sizes) >= 8
    assert len(set(sizes)) > 3
    assert shard_sizes(6, total=300, seed=0, skew=1.0, min_size=8) == sizes
    assert shard_sizes(4, total=103, seed=0, skew=0.0) == [26, 26, 26, 25]
    extreme = shard_sizes(5, total=100, seed=1, skew=1e6, min_size=2)
    assert sum(extreme) == 100
    assert min(extreme) >= 2
    with pytest.raises(ConfigError):
        shard_sizes(5, total=10, seed=0, min_size=4)
    with pytest.raises(ConfigError):
        shard_sizes(3, total=30, seed=0, skew=-1.0)


def test_synthetic_shards_disjoint_rows_of_one_dataset():
    shards = synthetic_shards(4, total=120, seq_len=12, seed=5)
    assert [len(s) for s in shards] == shard_sizes(4, total=120, seed=5)
    assert all(s.seq_len == 12 for s in shards)
    whole = torch.cat([s.input_ids for s in shards])
    assert torch.equal(whole, synthetic_dataset(120, seq_len=12, seed=5).input_ids)


def test_load_data_synthetic_spec():
    data = load_data("synthetic:n=20,seed=3", seq_len=10)
    assert torch.equal(data.input_ids, synthetic_dataset(20, seq_len=10, seed=3).input_ids)
    assert len(load_data("synthetic", seq_len=8)) == 256
    with pytest.raises(ConfigError, match="bogus"):
        load_data("synthetic:bogus=1", seq_len=8)
    with pytest.raises(ConfigError, match="integer"):
        load_data("synthetic:n=many", seq_len=8)
    with pytest.raises(ConfigError):
        load_data("synthetic:n=0", seq_len=8)


def test_load_data_jsonl_pads_truncates_and_keeps_labels(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"input_ids": [1, 2, 3]},
        {"input_ids": [4, 5, 6, 7, 8, 9, 10]},
        {"input_ids": [7, 8, 9, 10], "labels": [-100, -100, 9, 10]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    for spec in (f"jsonl:{path}", str(path)):
        data = load_data(spec, seq_len=5)
        assert data.input_ids.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [7, 8, 9, 10, 0]]
        assert data.labels is not None
        assert data.labels.tolist() == [
            [1, 2, 3, IGNORE_INDEX, IGNORE_INDEX],
            [4, 5, 6, 7, 8],
            [-100, -100, 9, 10, IGNORE_INDEX],
        ]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json\n", "not JSON"),
        ('{"tokens": [1, 2]}\n', "input_ids"),
        ('{"text": "hi", "label": 1}\n', "needs a model"),
        ('{"input_ids": [1, "2"]}\n', "integers"),
        ('{"input_ids": [1]}\n', ">= 2 tokens"),
        ('{"input_ids": [1, -3]}\n', "non-negative"),
        ("\n", "no rows"),
    ],
)
def test_load_data_jsonl_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_data(str(path), seq_len=8)


def test_load_data_unknown_and_unsupported(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_data("imagenet", seq_len=8)
    with pytest.raises(ConfigError, match="needs a model"):
        load_data("sst2", seq_len=8)
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_data("sst2", seq_len=8, model="tiny")
    with pytest.raises(ConfigError, match="cannot read"):
        load_data(str(tmp_path / "missing.jsonl"), seq_len=8)


def test_evaluate_random_model_near_uniform_and_restores_mode():
    model = build_model("tiny")
    model.train()
    data = synthetic_dataset(40, seq_len=16, seed=0)
    result = evaluate(model, data, batch_size=16)
    assert isinstance(result, EvalResult)
    assert result.tokens == 40 * 15
    assert 3.5 < result.loss < 5.5  # about ln(64) = 4.16 before any training
    assert 0.0 <= result.accuracy < 0.2
    assert model.training
    model.eval()
    evaluate(model, data)
    assert not model.training


def test_evaluate_ignores_unscored_positions_and_checks_vocab():
    model = build_model("tiny")
    ids = synthetic_dataset(4, seq_len=8, seed=0).input_ids
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    assert evaluate(model, TokenDataset(input_ids=ids, labels=labels)).tokens == 4
    with pytest.raises(ConfigError, match="no scored"):
        evaluate(model, TokenDataset(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX)))
    with pytest.raises(ConfigError, match="vocab"):
        evaluate(model, TokenDataset(input_ids=ids + 1000))
