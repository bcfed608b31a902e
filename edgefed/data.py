"""Token datasets that devices train on and the aggregator evaluates on.

The built-in ``synthetic`` task exists so tests and simulations can watch a tiny model
learn without any download. Every sequence follows one rule over the tiny vocabulary,

    x[t+1] = (5 * x[t] + 3) mod 64,

from a random start token. The rule is a full-period linear congruential step (it
visits all 64 tokens), so the unigram distribution is uniform and only learning the
transition lowers the loss; every token after the first is determined, which makes
next-token accuracy a direct measure of it. There are only 64 distinct sequences: this
checks that training works, not that a model generalises.

Other sources: ``jsonl:PATH`` (or a path ending in ``.jsonl``), one ``{"input_ids": [...]}``
object per line with optional ``"labels"`` (``-100`` = not scored). Text (named datasets
such as ``rotten-tomatoes`` and ``sst2``, or files of ``text``/``label`` rows) needs the
model's tokenizer and goes through ``edgefed.text_tasks``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from edgefed.modeling import TINY_VOCAB
from edgefed.objectives import IGNORE_INDEX, predictions, scored_logits
from schemas.errors import ConfigError
from schemas.messages import ModelRef

__all__ = ["IGNORE_INDEX", "EvalResult", "TokenBatch", "TokenDataset", "evaluate", "load_data"]

SYNTHETIC_MULTIPLIER = 5
SYNTHETIC_INCREMENT = 3
SYNTHETIC_VOCAB = TINY_VOCAB

_SYNTHETIC_DEFAULTS = {"n": 256, "seed": 0}


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


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token loss and accuracy over the scored positions."""

    loss: float
    accuracy: float
    tokens: int


def synthetic_dataset(n: int, *, seq_len: int = 32, seed: int) -> TokenDataset:
    """``n`` sequences of the synthetic rule, each from a start token drawn with ``seed``."""
    if n < 1 or seq_len < 2:
        raise ConfigError(f"synthetic data needs n >= 1 and seq_len >= 2, got {n=} {seq_len=}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty((n, seq_len), dtype=torch.int64)
    ids[:, 0] = torch.randint(0, SYNTHETIC_VOCAB, (n,), generator=gen)
    for t in range(1, seq_len):
        ids[:, t] = (SYNTHETIC_MULTIPLIER * ids[:, t - 1] + SYNTHETIC_INCREMENT) % SYNTHETIC_VOCAB
    return TokenDataset(input_ids=ids)


def shard_sizes(
    num_clients: int, *, total: int, seed: int, skew: float = 1.0, min_size: int = 4
) -> list[int]:
    """Uneven but reproducible client dataset sizes that sum to ``total``.

    Each client gets ``min_size``; the rest is split by proportions drawn from a
    symmetric Dirichlet with concentration ``1 / skew`` (largest-remainder rounding).

    Args:
        num_clients: Number of shards.
        total: Sum of the sizes.
        seed: Seed for the proportions.
        skew: 0 gives equal sizes; larger gives more uneven ones (1 = uniform on the simplex).
        min_size: Smallest shard.

    Raises:
        ConfigError: The numbers cannot work (e.g. ``total < num_clients * min_size``).
    """
    if num_clients < 1 or min_size < 1 or skew < 0 or not math.isfinite(skew):
        raise ConfigError(
            f"need num_clients >= 1, min_size >= 1, finite skew >= 0; got {num_clients=} {min_size=} {skew=}"
        )
    spare = total - num_clients * min_size
    if spare < 0:
        raise ConfigError(
            f"total {total} cannot give {num_clients} clients {min_size} samples each"
        )
    if skew == 0:
        weights = [1.0] * num_clients
    else:
        # A symmetric Dirichlet draw is a set of Gamma draws, normalised below.
        rng = random.Random(seed)
        weights = [rng.gammavariate(1.0 / skew, 1.0) for _ in range(num_clients)]
        if not sum(weights) > 0:  # extreme skew underflows: one client takes the rest
            weights = [1.0] + [0.0] * (num_clients - 1)
    exact = [spare * w / sum(weights) for w in weights]
    extra = [math.floor(x) for x in exact]
    by_remainder = sorted(range(num_clients), key=lambda i: extra[i] - exact[i])
    for i in by_remainder[: spare - sum(extra)]:
        extra[i] += 1
    return [min_size + e for e in extra]


def synthetic_shards(
    num_clients: int,
    *,
    total: int,
    seq_len: int = 32,
    seed: int,
    skew: float = 1.0,
    min_size: int = 4,
) -> list[TokenDataset]:
    """Split ``total`` synthetic sequences into uneven client shards (see :func:`shard_sizes`)."""
    sizes = shard_sizes(num_clients, total=total, seed=seed, skew=skew, min_size=min_size)
    whole = synthetic_dataset(total, seq_len=seq_len, seed=seed)
    shards: list[TokenDataset] = []
    start = 0
    for size in sizes:
        shards.append(whole.subset(torch.arange(start, start + size)))
        start += size
    return shards


def _parse_synthetic(options: str, seq_len: int) -> TokenDataset:
    values = dict(_SYNTHETIC_DEFAULTS)
    for item in filter(None, options.split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in values:
            raise ConfigError(
                f"synthetic option {item!r} is not key=value with key in {sorted(values)}"
            )
        try:
            values[key] = int(raw)
        except ValueError:
            raise ConfigError(f"synthetic option {key}={raw!r} is not an integer") from None
    return synthetic_dataset(values["n"], seq_len=seq_len, seed=values["seed"])


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
            ``:parts=6,part=2,partition=dirichlet,alpha=0.5`` (see ``edgefed.datasets``).
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
        return _parse_synthetic(rest, seq_len)
    # Text needs tokenizers and readers that import this module: loaded only when used.
    from edgefed import datasets, text_tasks  # noqa: PLC0415

    if datasets.is_text_spec(spec):
        if model is None:
            raise ConfigError(f"dataset {spec!r} is text: it needs a model (for its tokenizer)")
        return text_tasks.load_text_data(spec, seq_len=seq_len, model=model)
    if kind == "jsonl":
        return _load_jsonl(Path(rest).expanduser(), seq_len)
    if spec.endswith(".jsonl"):
        return _load_jsonl(Path(spec).expanduser(), seq_len)
    raise ConfigError(
        f"unknown dataset {spec!r}: use 'synthetic[:n=N,seed=S]', 'jsonl:PATH', a .jsonl "
        f"or .csv path of text and label rows, or one of {list(datasets.SOURCES)}"
    )


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
