"""Named text sources, data specs and partitioners."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from edgefed.data.sources import (
    RT_TEST_SIZE,
    data_dir,
    is_text_spec,
    load_examples,
    num_labels,
    parse_spec,
    partition,
    read_table,
)
from schemas.errors import ConfigError
from tests.assets_helpers import require_data_dir, require_smollm2


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def test_sst2_row_counts_match_source_md():
    require_data_dir()
    train = load_examples("sst2:split=train")
    dev = load_examples("sst2:split=test")
    assert len(train) == 67_349
    assert Counter(train.labels) == {0: 29_780, 1: 37_569}
    assert len(dev) == 872
    assert Counter(dev.labels) == {0: 428, 1: 444}
    assert train.label_names == ("negative", "positive")
    assert "it 's a charming and often affecting journey ." in dev.texts


def test_ag_news_row_counts_match_source_md():
    require_data_dir()
    train = load_examples("ag-news")
    test = load_examples("ag-news:split=test")
    assert len(train) == 10_001
    assert Counter(train.labels) == {0: 2509, 1: 2458, 2: 2496, 3: 2538}
    assert len(test) == 7_600
    assert set(Counter(test.labels).values()) == {1_900}
    assert train.label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert train.family == "topic"


def test_20newsgroups_row_counts_match_source_md():
    require_data_dir()
    train = load_examples("20newsgroups")
    test = load_examples("20newsgroups:split=test")
    assert (len(train), len(test)) == (11_314, 7_532)
    assert len(train.label_names) == 20
    assert Counter(train.labels)[0] == 480
    assert Counter(test.labels)[19] == 251


def test_rotten_tomatoes_test_split_is_fixed_and_never_in_train():
    require_smollm2()
    test = load_examples("rotten-tomatoes:split=test")
    train = load_examples("rotten-tomatoes")
    assert len(test) == RT_TEST_SIZE
    assert set(map(_norm, test.texts)).isdisjoint(map(_norm, train.texts))
    # 7,403 fresh + 5,405 rotten snippets, less exact duplicates.
    assert 12_000 < len(train) + len(test) <= 12_808
    assert set(train.labels) == {0, 1}
    assert 0.5 < sum(train.labels) / len(train) < 0.65
    assert load_examples("rotten-tomatoes:split=test,n=50") == test.subset(range(50))


def test_n_is_a_fixed_sample_and_parts_split_it_disjointly():
    require_smollm2()
    first = load_examples("rotten-tomatoes:n=300")
    assert first == load_examples("rotten-tomatoes:n=300")
    shards = [
        load_examples(f"rotten-tomatoes:n=300,parts=3,part={i},partition=dirichlet,alpha=0.3")
        for i in range(3)
    ]
    texts = [set(s.texts) for s in shards]
    assert sum(map(len, texts)) == 300
    assert set().union(*texts) == set(first.texts)
    assert all(a.isdisjoint(b) for i, a in enumerate(texts) for b in texts[i + 1 :])
    after = load_examples("rotten-tomatoes:skip=300,n=50")
    assert len(after) == 50 and set(after.texts).isdisjoint(first.texts)
    assert after.texts == load_examples("rotten-tomatoes:n=350").texts[300:]
    total = len(load_examples("rotten-tomatoes"))
    with pytest.raises(ConfigError, match="skip="):
        load_examples(f"rotten-tomatoes:skip={total}")


def test_partition_iid_and_size_and_dirichlet():
    labels = [i % 4 for i in range(400)]
    iid = partition(labels, 4, seed=1)
    assert [len(s) for s in iid] == [100] * 4
    assert sorted(i for s in iid for i in s) == list(range(400))
    assert partition(labels, 4, seed=1) == iid
    assert partition(labels, 4, seed=2) != iid

    sizes = [len(s) for s in partition(labels, 4, scheme="size", skew=2.0, seed=1)]
    assert sum(sizes) == 400 and max(sizes) > 2 * min(sizes)
    assert [len(s) for s in partition(labels, 4, scheme="size", skew=0.0)] == [100] * 4

    skewed = partition(labels, 4, scheme="dirichlet", alpha=0.1, seed=3, min_size=5)
    assert sorted(i for s in skewed for i in s) == list(range(400))
    assert min(len(s) for s in skewed) >= 5
    # With a small alpha most shards are dominated by one or two labels.
    top_share = [Counter(labels[i] for i in s).most_common(1)[0][1] / len(s) for s in skewed]
    assert sum(share > 0.5 for share in top_share) >= 3
    mixed = partition(labels, 4, scheme="dirichlet", alpha=100.0, seed=3)
    assert all(len(Counter(labels[i] for i in s)) == 4 for s in mixed)


def test_partition_errors():
    with pytest.raises(ConfigError, match="cannot split"):
        partition([0, 1], 3)
    with pytest.raises(ConfigError, match="unknown partition"):
        partition([0, 1, 0, 1], 2, scheme="zipf")  # type: ignore[arg-type]


def test_parse_spec_and_errors():
    name, options = parse_spec("sst2:split=test,n=10,parts=2,part=1,alpha=0.25")
    assert name == "sst2"
    assert (options.split, options.n, options.parts, options.part, options.alpha) == (
        "test",
        10,
        2,
        1,
        0.25,
    )
    assert parse_spec("csv:/tmp/x.csv:parts=2")[0] == "/tmp/x.csv"
    with pytest.raises(ConfigError, match="key=value"):
        parse_spec("sst2:colour=red")
    with pytest.raises(ConfigError, match="not a int"):
        parse_spec("sst2:n=ten")
    with pytest.raises(ConfigError, match="split"):
        parse_spec("sst2:split=dev")
    with pytest.raises(ConfigError, match="part"):
        parse_spec("sst2:parts=2,part=2")


def test_user_tables_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text('text,label\n"great, really",positive\nawful,negative\nfine,positive\n')
    examples = read_table(csv_path)
    assert examples.label_names == ("negative", "positive")
    assert examples.labels == (1, 0, 1)
    assert examples.texts[0] == "great, really"
    assert examples.family == "sentiment"
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(6)))
    assert is_text_spec(str(jsonl)) and is_text_spec(f"jsonl:{jsonl}:parts=2,part=0")
    assert num_labels(str(jsonl)) == 3
    assert len(load_examples(f"{jsonl}:parts=2,part=1")) == 3
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text('{"input_ids": [1, 2]}\n')
    assert not is_text_spec(str(tokens))
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nx,1\n")
    with pytest.raises(ConfigError, match="'text' and 'label'"):
        read_table(bad)


def test_num_labels_of_named_sources_without_reading():
    assert num_labels("ag-news:split=test") == 4
    assert num_labels("20newsgroups") == 20
    assert num_labels("synthetic:n=5") is None


def test_data_dir_override_and_clear_message_when_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFED_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(ConfigError, match=r"EDGEFED_DATA_DIR.*sst2/"):
        load_examples("sst2")
