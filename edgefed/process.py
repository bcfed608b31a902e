"""Run a command's event loop until its work ends or the process is asked to stop.

systemd and ``docker stop`` send SIGTERM, a terminal sends SIGINT, and a shell starts a
background job with SIGINT ignored. Each of them, here, cancels the command's main
coroutine, so its ``finally`` blocks run (results written, offline status published) and
the process exits 0 instead of dying where it stood.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


def exit_cleanly_on_stop_signals() -> None:
    """Until :func:`run_until_stopped` takes over, SIGTERM or SIGINT exits 0 at once.

    A service stopped while it still imports torch or loads its model has nothing to save;
    without this, Python's default action kills it with -15, which systemd logs as a failure.
    """

    def leave(signum: int, _frame: object) -> None:
        log.warning("%s received while starting: exiting", signal.Signals(signum).name)
        raise SystemExit(0)

    for signum in STOP_SIGNALS:
        signal.signal(signum, leave)


def run_until_stopped(main: Coroutine[Any, Any, _T]) -> _T | None:
    """``asyncio.run(main)``; SIGTERM or SIGINT cancels ``main`` and returns None."""
    return asyncio.run(_guarded(main))


async def _guarded(main: Coroutine[Any, Any, _T]) -> _T | None:
    task = asyncio.current_task()
    assert task is not None  # asyncio.run runs this as a task
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        if not received:
            log.warning("%s received: stopping cleanly", signum.name)
            task.cancel()
        received.append(signum)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await main
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        return None
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
