"""Scoring each version on the held-out rows, off the path that takes in updates.

Scoring a large held-out set takes seconds to minutes on a device-class CPU (7,600 AG News
rows: about a minute on 2 shared cores). Done inline, it held the intake: no update was
read or acknowledged meanwhile, and devices re-sent what they had already delivered. A
:class:`Scoring` scores versions one at a time, in version order, on a model of its own
(the frozen base weights are shared, so it costs an adapter's worth of memory), and hands
every version's record to ``report`` in order, scored or not, as soon as its turn comes.
When versions come faster than they are scored, it keeps up by scoring the newest: a version
due for scoring is reported unscored when more than :data:`MOST_WAITING` versions wait behind
it and one of them is due too (the last version of a run is always scored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from peft import PeftModel

from aggregator.results import VersionRecord
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import set_adapter
from edgefed.ml.tokens import TokenDataset
from schemas.messages import TensorMap

log = logging.getLogger(__name__)

MOST_WAITING = 3
"""Versions that may wait behind one due for scoring before it is passed over."""


@dataclass(frozen=True)
class _Pending:
    """A version waiting for its turn: its record so far and, to be scored, its adapter."""

    record: VersionRecord
    adapter: TensorMap | None


class Scoring:
    """A worker that reports versions in order, scored where due; ``start``, ``submit``, ``drain``."""

    def __init__(
        self,
        build: Callable[[], PeftModel],
        data: TokenDataset,
        report: Callable[[VersionRecord], Awaitable[None]],
    ) -> None:
        self._build = build
        self._data = data
        self._report = report
        self._model: PeftModel | None = None
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self.passed_over = 0
        """Versions due for scoring that were reported unscored to keep up."""

    def start(self) -> None:
        """Start the worker on the running loop."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="scoring")

    def submit(self, record: VersionRecord, adapter: TensorMap | None) -> None:
        """Queue ``record``; with ``adapter``, it is due for scoring with that adapter."""
        self._pending.append(_Pending(record, adapter))
        self._idle.clear()
        self._wake.set()

    async def drain(self) -> None:
        """Wait until every submitted version is reported."""
        if self._worker is not None and not self._worker.done():
            await self._idle.wait()

    def cancel(self) -> None:
        """Stop the worker without waiting for it; versions not yet reported are dropped."""
        if self._worker is not None:
            self._worker.cancel()

    async def close(self) -> None:
        """Stop the worker and wait until it has stopped; unreported versions are dropped."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                pending = self._pending.popleft()
                try:
                    record = await self._scored(pending)
                    log.info(
                        "version %d eval_loss=%s accuracy=%s",
                        record.version,
                        record.eval_loss,
                        record.eval_accuracy,
                    )
                    await self._report(record)
                except Exception:
                    log.exception("reporting version %d failed", pending.record.version)
            self._idle.set()

    async def _scored(self, pending: _Pending) -> VersionRecord:
        """``pending``'s record with its score, unless it is not due or is passed over."""
        record = pending.record
        if pending.adapter is None:
            return record
        if len(self._pending) > MOST_WAITING and any(p.adapter is not None for p in self._pending):
            self.passed_over += 1
            if self.passed_over == 1:
                log.warning(
                    "versions come faster than %d held-out rows are scored: version %d and "
                    "others are passed over to score newer ones (raise eval_every or score "
                    "fewer rows to score them all)",
                    len(self._data),
                    record.version,
                )
            return record
        loss, accuracy = await asyncio.to_thread(self._score, pending.adapter)
        return replace(record, eval_loss=loss, eval_accuracy=accuracy)

    def _score(self, adapter: TensorMap) -> tuple[float, float]:
        if self._model is None:
            self._model = self._build()
        set_adapter(self._model, adapter)
        result = evaluate(self._model, self._data)
        return result.loss, result.accuracy
