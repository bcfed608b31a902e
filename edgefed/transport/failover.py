"""Which broker to dial next, and how long to keep asking a broker that refuses subscriptions.

Both matter most with a clustered broker: a client given every node's URL moves on to the
next node when its own is lost, and for a while after losing a node a cluster refuses
subscriptions it will grant a few seconds later (NATS, until JetStream has new leaders).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from edgefed.transport.backoff import Backoff
from edgefed.transport.config import BrokerList, BrokerURL

log = logging.getLogger(__name__)

Subscribe = Callable[[list[tuple[str, int]]], Awaitable[list[bool]]]
"""Send one SUBSCRIBE for (filter, QoS) pairs; whether each was granted, in order."""


class BrokerRotation:
    """The broker to dial and the pause before dialling it, after a failure or a loss.

    Every broker of the list is tried once before the pauses grow, and a broker that
    dropped a connection becomes the last one to try again.
    """

    def __init__(
        self, brokers: BrokerList, *, min_s: float, max_s: float, rng: random.Random
    ) -> None:
        self._brokers = brokers.urls
        self._at = 0
        self._min_s = min_s
        self._backoff = Backoff(min_s, max_s, rng=rng)

    @property
    def current(self) -> BrokerURL:
        """The broker connected to, or dialled next."""
        return self._brokers[self._at]

    def after_failure(self) -> float:
        """Move on after a failed connection attempt; the pause before the next one."""
        self._at = (self._at + 1) % len(self._brokers)
        return self._backoff.next() if self._at == 0 else self._min_s

    def after_loss(self, lived_s: float) -> float:
        """Move on after a connection that lasted ``lived_s`` was lost; the pause first."""
        self._backoff.connection_ended(lived_s)
        self._at = (self._at + 1) % len(self._brokers)
        return self._backoff.next()


async def subscribe_until_granted(
    subscribe: Subscribe,
    wanted: list[tuple[str, int]],
    *,
    patience_s: float,
    first_pause_s: float,
    who: str,
) -> list[str]:
    """Subscribe to ``wanted``, asking again for refused filters; the filters still refused.

    A refusal is asked again with growing pauses (up to 5 s) for up to ``patience_s``
    before it is believed.
    """
    pause = first_pause_s
    deadline = time.monotonic() + patience_s
    while wanted:
        granted = await subscribe(wanted)
        wanted = [want for want, ok in zip(wanted, granted, strict=False) if not ok]
        if not wanted or time.monotonic() + pause > deadline:
            break
        log.warning(
            "%s: %d subscription(s) refused (%s); asking again in %.1f s",
            who, len(wanted), wanted[0][0], pause,
        )  # fmt: skip
        await asyncio.sleep(pause)
        pause = min(2 * pause, 5.0)
    return [topic_filter for topic_filter, _ in wanted]
