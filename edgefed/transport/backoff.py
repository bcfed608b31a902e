"""Jittered exponential backoff for reconnecting to the broker."""

from __future__ import annotations

import random

STABLE_CONNECTION_S = 10.0
"""A connection that lasted this long counts as working: the next reconnect starts fast."""


class Backoff:
    """Jittered exponential backoff: each pause is uniform between ``min_s`` and a cap that doubles.

    Full jitter keeps a fleet that lost its broker at once from reconnecting in lockstep.
    """

    def __init__(self, min_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        self._min = min_s
        self._max = max_s
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The pause before the next attempt."""
        cap = min(self._max, self._min * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return self._rng.uniform(self._min, cap)

    def reset(self) -> None:
        """Start again from the smallest pause (after a successful connection)."""
        self._attempt = 0

    def connection_ended(self, lived_s: float, *, stable_s: float = STABLE_CONNECTION_S) -> None:
        """Start again from the smallest pause only if the lost connection had been stable.

        A broker that accepts each connection and drops it at once (a packet over its size
        limit, a session taken over) must not turn reconnecting into a storm every
        ``min_s``: such short connections keep the pauses growing.
        """
        if lived_s >= stable_s:
            self.reset()
