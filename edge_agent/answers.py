"""Waiting on the aggregator: for news (a task, a global), for an answer, or to send again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from edge_agent.config import AgentConfig
from edgefed.transport.base import Transport
from edgefed.transport.global_topics import Wait
from schemas import topics
from schemas.errors import TransportError
from schemas.messages import Ack, Ask

log = logging.getLogger(__name__)

WAIT_REPORT_S: Final = 30.0
"""How long an agent waits without news before it logs what it is waiting for."""


async def wait_for_news(
    news: asyncio.Event,
    ready: Callable[[], bool],
    waiting_on: Callable[[], Wait],
    ask: Callable[[Ask], Awaitable[None]],
    ask_after_s: float,
) -> None:
    """Wait until ``news`` brings ``ready()``, asking for what is missing and saying so.

    After ``ask_after_s`` without news, and again with pauses that double up to
    :data:`WAIT_REPORT_S`, the ask that
    ``waiting_on()`` names (a task or a global the broker did not hand over) goes to the
    aggregator. Every :data:`WAIT_REPORT_S` without news, its line is logged, so a device
    whose aggregator is gone says so instead of waiting in silence.
    """
    pause, silent_s = ask_after_s, 0.0
    while not ready():
        news.clear()
        try:
            async with asyncio.timeout(pause):
                await news.wait()
            pause, silent_s = ask_after_s, 0.0
            continue
        except TimeoutError:
            silent_s += pause
        wait = waiting_on()
        if wait.ask is not None:
            await ask(wait.ask)
        if silent_s >= WAIT_REPORT_S:
            log.log(wait.level, wait.line)
            silent_s = 0.0
        pause = min(2 * pause, WAIT_REPORT_S)


async def answer_or_due(
    waiter: asyncio.Future[Ack], timeout_s: float, due_again: asyncio.Event
) -> Ack | None:
    """The answer ``waiter`` brings, or None once the update is due to be sent again.

    It is due after ``timeout_s``, or as soon as ``due_again`` is set: the agent sets it when
    the task it follows arrives again unchanged, which happens when the aggregator starts
    again (it republishes its task) or the agent reconnects (the broker hands over the
    retained task). An update the broker lost with a restarting aggregator's queue then
    costs seconds, not the whole ack timeout. ``waiter`` itself is never cancelled here.
    """
    again = asyncio.create_task(due_again.wait())
    either: set[asyncio.Future[Any]] = {waiter, again}
    try:
        await asyncio.wait(either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        again.cancel()
    return waiter.result() if waiter.done() and not waiter.cancelled() else None


RENEW_ACKS_EVERY: Final = 4
"""Unanswered sends of one update after which the ack subscription is renewed."""


async def renew_ack_subscription(transport: Transport, config: AgentConfig, attempt: int) -> None:
    """Subscribe to the device's acks anew every :data:`RENEW_ACKS_EVERY` unanswered sends.

    A broker may keep a subscription that delivers nothing (a NATS node that took over the
    session) while the aggregator acks every re-send; a new subscription gets them through.
    """
    if attempt % RENEW_ACKS_EVERY:
        return
    topic = topics.ack(config.federation, config.client_id)
    log.warning("%s: no ack for a while; renewing the subscription to %s", config.client_id, topic)
    with contextlib.suppress(TransportError):  # the next renewal tries again
        await transport.unsubscribe(topic)
        await transport.subscribe(topic)
