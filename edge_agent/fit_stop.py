"""Stopping a fit that runs in a worker thread, at its next forward pass.

``asyncio`` cannot cancel a function running in a thread: cancelling the task that awaits
``asyncio.to_thread`` only stops the waiting, and the interpreter still waits for the
thread at exit. When an agent is cancelled (a simulated fleet's time is up, the process
shuts down), its fit would otherwise run all its remaining local steps for nothing. A
forward pre-hook on the trainer's model turns a set :class:`threading.Event` into
:class:`FitStopped` at the next forward pass, whatever the method, without any trainer
knowing about it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from schemas.errors import FitStopped

T = TypeVar("T")


@contextmanager
def stops_on(event: threading.Event, model: torch.nn.Module | None) -> Iterator[None]:
    """While open, a forward pass of ``model`` raises :class:`FitStopped` once ``event`` is set.

    With no model (a trainer that exposes none) the fit simply runs to its end.
    """
    if model is None:
        yield
        return

    def check(_module: torch.nn.Module, _args: Any) -> None:
        if event.is_set():
            raise FitStopped("the fit was stopped")

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def stoppable(fit: Callable[[], T], event: threading.Event, model: object) -> Callable[[], T]:
    """``fit`` wrapped so that setting ``event`` stops it at ``model``'s next forward pass."""
    module = model if isinstance(model, torch.nn.Module) else None

    def run() -> T:
        with stops_on(event, module):
            return fit()

    return run
