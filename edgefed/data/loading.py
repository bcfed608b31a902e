"""Load the dataset a task or command line names, whatever its source.

Sources: ``synthetic`` (:mod:`edgefed.data.synthetic`); ``jsonl:PATH`` (or a path ending in
``.jsonl``), one ``{"input_ids": [...]}`` object per line with optional ``"labels"``
(``-100`` = not scored). Text (named datasets such as ``rotten-tomatoes`` and ``sst2``, or
files of ``text``/``label`` rows) needs the model's tokenizer and goes through
:mod:`edgefed.data.text_tasks`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgefed.data import sources, text_tasks
from edgefed.data.synthetic import parse_synthetic
from edgefed.ml.tokens import IGNORE_INDEX, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import ModelRef


def _int_list(value: object, where: str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"{where}: {field!r} must be a list of integers")
    return value


def _load_jsonl(path: Path, seq_len: int) -> TokenDataset:
    """Rows truncated to ``seq_len`` or right-padded with token 0 and unscored labels."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read data file {str(path)!r}: {exc}") from exc
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or "input_ids" not in row:
            raise ConfigError(f"{where}: expected an object with 'input_ids'")
        row_ids = _int_list(row["input_ids"], where, "input_ids")[:seq_len]
        row_labels = _int_list(row.get("labels", row["input_ids"]), where, "labels")[:seq_len]
        if len(row_ids) < 2 or len(row_labels) != len(row_ids):
            raise ConfigError(f"{where}: need >= 2 tokens and labels as long as input_ids")
        if min(row_ids) < 0:
            raise ConfigError(f"{where}: token ids must be non-negative")
        pad = seq_len - len(row_ids)
        ids.append(row_ids + [0] * pad)
        labels.append(row_labels + [IGNORE_INDEX] * pad)
    if not ids:
        raise ConfigError(f"data file {str(path)!r} has no rows")
    return TokenDataset(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


def load_data(spec: str, *, seq_len: int, model: ModelRef | str | None = None) -> TokenDataset:
    """Load the dataset a task or command line names.

    Args:
        spec: ``synthetic`` or ``synthetic:n=200,seed=3``; ``jsonl:PATH`` or ``PATH.jsonl``
            of token rows; or text: a named source (``rotten-tomatoes``, ``sst2``,
            ``ag-news``, ``20newsgroups``) or a ``.csv``/``.jsonl`` file of ``text`` and
            ``label`` columns, with options such as ``:split=test,n=500`` or
            ``:parts=6,part=2,partition=dirichlet,alpha=0.5`` (see :mod:`edgefed.data.sources`).
        seq_len: Sequence length to generate, truncate or pad to.
        model: The model the data is for; text needs its tokenizer and its kind.

    Raises:
        AssetMissing: A named source is not installed (the message names the command).
        ConfigError: Unknown source, bad options, or an unreadable or malformed file.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind == "synthetic":
        return parse_synthetic(rest, seq_len)
    if sources.is_text_spec(spec):
        if model is None:
            raise ConfigError(f"dataset {spec!r} is text: it needs a model (for its tokenizer)")
        return text_tasks.load_text_data(spec, seq_len=seq_len, model=model)
    if kind == "jsonl":
        return _load_jsonl(Path(rest).expanduser(), seq_len)
    if spec.endswith(".jsonl"):
        return _load_jsonl(Path(spec).expanduser(), seq_len)
    raise ConfigError(
        f"unknown dataset {spec!r}: use 'synthetic[:n=N,seed=S]', 'jsonl:PATH', a .jsonl "
        f"or .csv path of text and label rows, or one of {list(sources.SOURCES)}"
    )
