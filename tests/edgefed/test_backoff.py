"""Reconnect backoff."""

from __future__ import annotations

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
