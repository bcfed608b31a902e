"""Reconnect backoff."""

from __future__ import annotations

import random

from edgefed.transport.backoff import Backoff


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(0.1, 1.0)
    pauses = [backoff.next() for _ in range(50)]
    assert all(0.1 <= pause <= 1.0 for pause in pauses)
    assert pauses[0] <= 0.1 + 1e-9  # the first cap is the minimum itself
    assert max(pauses[10:]) > 0.5  # the cap has grown to the maximum
    assert len(set(pauses[10:])) > 1  # jittered
    backoff.reset()
    assert backoff.next() <= 0.1 + 1e-9


def test_connections_that_die_at_once_keep_the_pauses_growing() -> None:
    """A broker that drops each connection at once must not cause a reconnect every 0.2 s."""
    backoff = Backoff(0.2, 10.0, rng=random.Random(1))
    caps = []
    for _ in range(6):
        backoff.next()
        backoff.connection_ended(0.05)  # accepted, then dropped: not a working connection
        caps.append(backoff.next())
    assert max(caps[3:]) > 0.2 * 2**3 * 0.25  # grew; without this every pause stays <= 0.2
    backoff.connection_ended(60.0)  # a connection that worked: start fast again
    assert backoff.next() <= 0.2 + 1e-9
