"""Waiting on the aggregator: for news (a task, a global), for an answer, or to send again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from schemas.messages import Ack

log = logging.getLogger(__name__)

WAIT_REPORT_S: Final = 30.0
"""How long an agent waits without news before it logs what it is waiting for."""


async def wait_for_news(
    news: asyncio.Event, ready: Callable[[], bool], waiting_on: Callable[[], tuple[int, str]]
) -> None:
    """Wait until ``news`` brings ``ready()``, saying what is missing when it takes long.

    Every :data:`WAIT_REPORT_S` without it, ``waiting_on()`` gives a log level and a
    sentence to log, so a device whose aggregator is gone says so instead of waiting in
    silence.
    """
    while not ready():
        news.clear()
        try:
            async with asyncio.timeout(WAIT_REPORT_S):
                await news.wait()
        except TimeoutError:
            log.log(*waiting_on())


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
