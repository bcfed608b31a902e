"""Acks leave without holding the merge loop for the broker's PUBACK.

Awaiting each ack's PUBACK before reading the next update made every update wait one
broker round trip; with 1 MiB updates that was about half of the service's time. An ack
is handed to the transport only after the commit that makes its decision durable, so
nothing is promised early: if it never arrives, the device re-sends the update and gets
the same answer again (update ids are idempotent). Acks of one service share one
connection and go out in the order they were handed over.
"""

from __future__ import annotations

import asyncio
import logging

from edgefed.transport.base import Transport
from schemas import topics
from schemas.errors import TransportError
from schemas.messages import Ack

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256
"""Acks being published at once; past this, ``send`` waits (backpressure, bounded memory)."""


class AckSender:
    """Publishes acks in the background; ``flush`` waits until they are all out."""

    def __init__(
        self, transport: Transport, federation: str, *, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self._transport = transport
        self._federation = federation
        self._max_in_flight = max_in_flight
        self._sending: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    @property
    def in_flight(self) -> int:
        """Acks handed over and not yet acknowledged by the broker."""
        return len(self._sending)

    async def send(self, ack: Ack) -> None:
        """Start publishing ``ack``; returns at once unless ``max_in_flight`` are pending.

        Raises:
            Exception: What an earlier ack's publish raised other than ``TransportError``
                (a bug, e.g. an ack that cannot be encoded), so it is never hidden.
        """
        self._raise_failure()
        task = asyncio.create_task(self._publish(ack), name=f"edgefed-ack:{ack.update_id}")
        self._sending.add(task)
        task.add_done_callback(self._done)
        if len(self._sending) > self._max_in_flight:
            await asyncio.wait(set(self._sending), return_when=asyncio.FIRST_COMPLETED)

    async def flush(self) -> None:
        """Wait until every ack handed over so far has been published (or given up).

        Raises:
            Exception: As :meth:`send`.
        """
        while self._sending:
            await asyncio.wait(set(self._sending))
        self._raise_failure()

    def cancel(self) -> None:
        """Stop publishing what is pending (the service is going away; devices re-send)."""
        for task in self._sending:
            task.cancel()

    async def close(self) -> None:
        """On the way out: flush, or cancel what is pending when the caller is cancelled."""
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            self.cancel()
            return
        await self.flush()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def _publish(self, ack: Ack) -> None:
        try:
            await self._transport.publish(topics.ack(self._federation, ack.client_id), ack)
        except TransportError as exc:
            log.warning(
                "ack of %s to %s not delivered (%s); the device will re-send and be answered again",
                ack.update_id,
                ack.client_id,
                exc,
            )
