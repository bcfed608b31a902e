"""Waiting for the aggregator's answer to an update, or for the moment to send it again."""

from __future__ import annotations

import asyncio
from typing import Any

from schemas.messages import Ack


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
