"""Running a service's concurrent parts until the first one ends (sites, intake replicas)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


async def until_first_ends(*parts: Coroutine[Any, Any, None]) -> None:
    """Run ``parts`` together; when one returns or fails, cancel the rest.

    Raises:
        Exception: What the first part to end raised, so a failure stops the service.
    """
    tasks = [asyncio.create_task(part) for part in parts]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
