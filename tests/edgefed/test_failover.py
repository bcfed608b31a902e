"""Broker rotation and asking again for refused subscriptions: pure logic, no broker."""

from __future__ import annotations

import random

from edgefed.transport.config import BrokerList
from edgefed.transport.failover import BrokerRotation, subscribe_until_granted


def test_rotation_tries_every_broker_at_the_shortest_pause_before_backing_off() -> None:
    rotation = BrokerRotation(
        BrokerList.parse("n1:1,n2:2,n3:3"), min_s=0.1, max_s=10.0, rng=random.Random(0)
    )
    assert rotation.current.port == 1
    pauses = [rotation.after_failure() for _ in range(6)]
    # n2 and n3 at once; back on n1 a full round failed, so the backoff pause applies.
    assert pauses[:2] == [0.1, 0.1]
    assert rotation.current.port == 1
    assert pauses[3:5] == [0.1, 0.1]
    assert pauses[5] >= 0.1


def test_rotation_moves_off_the_broker_that_dropped_the_connection() -> None:
    rotation = BrokerRotation(
        BrokerList.parse("n1:1,n2:2"), min_s=0.1, max_s=10.0, rng=random.Random(0)
    )
    assert 0.1 <= rotation.after_loss(60.0) <= 0.1 + 1e-9  # a stable connection: no growth
    assert rotation.current.port == 2
    rotation.after_loss(60.0)
    assert rotation.current.port == 1


def test_a_single_broker_backs_off_on_every_failure() -> None:
    rotation = BrokerRotation(BrokerList.parse("n1:1"), min_s=0.1, max_s=10.0, rng=random.Random(1))
    pauses = [rotation.after_failure() for _ in range(8)]
    assert rotation.current.port == 1
    assert max(pauses) > 0.1  # grows: there is no other broker to try first


async def test_refused_subscriptions_are_asked_again_until_granted() -> None:
    answers = iter([[True, False, False], [False, True], [True]])
    asked: list[list[str]] = []

    async def subscribe(filters: list[tuple[str, int]]) -> list[bool]:
        asked.append([topic for topic, _ in filters])
        return next(answers)

    wanted = [("a", 1), ("b", 1), ("c", 1)]
    refused = await subscribe_until_granted(
        subscribe, wanted, patience_s=5.0, first_pause_s=0.01, who="test"
    )
    assert refused == []
    assert asked == [["a", "b", "c"], ["b", "c"], ["b"]]


async def test_a_refusal_is_believed_once_patience_runs_out() -> None:
    calls = 0

    async def subscribe(filters: list[tuple[str, int]]) -> list[bool]:
        nonlocal calls
        calls += 1
        return [False] * len(filters)

    refused = await subscribe_until_granted(
        subscribe, [("x", 1)], patience_s=0.05, first_pause_s=0.02, who="test"
    )
    assert refused == ["x"]
    assert 2 <= calls <= 3
