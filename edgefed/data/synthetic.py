"""The built-in ``synthetic`` task: a tiny model can be seen learning without any download.

Every sequence follows one rule over the tiny vocabulary,

    x[t+1] = (5 * x[t] + 3) mod 64,

from a random start token. The rule is a full-period linear congruential step (it
visits all 64 tokens), so the unigram distribution is uniform and only learning the
transition lowers the loss; every token after the first is determined, which makes
next-token accuracy a direct measure of it. There are only 64 distinct sequences: this
checks that training works, not that a model generalises.
"""

from __future__ import annotations

import torch

from edgefed.data.partition import shard_sizes
from edgefed.ml.models import TINY_VOCAB
from edgefed.ml.tokens import TokenDataset
from schemas.errors import ConfigError

SYNTHETIC_MULTIPLIER = 5
SYNTHETIC_INCREMENT = 3
SYNTHETIC_VOCAB = TINY_VOCAB

_SYNTHETIC_DEFAULTS = {"n": 256, "seed": 0}


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


def parse_synthetic(options: str, seq_len: int) -> TokenDataset:
    """The synthetic dataset an option string such as ``n=200,seed=3`` names."""
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
