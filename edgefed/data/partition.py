"""Uneven but reproducible shard sizes: how a fleet's data is divided among its devices."""

from __future__ import annotations

import math
import random

from schemas.errors import ConfigError


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
