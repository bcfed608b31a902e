"""Ways a split trainer reaches the split server: over the broker, or in-process.

:class:`MqttSplitChannel` publishes each request on ``split/<client>/fwd`` and waits for the
reply with the same ``request_id`` on ``split/<client>/bwd``; on a timeout it sends the same
request again (the server answers a repeat from memory, never training twice) and gives up
with ``TimeoutError`` after ``retries``. Replies nobody waits for any more (late, duplicate)
are counted and dropped. In the simulator each exchange is held for the emulated device's
links once its reply is in (the device waits for the reply either way).
:class:`DirectSplitChannel` calls a server object in-process through the same codec bytes,
for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Protocol

from edge_agent.emulation import DeviceEmulation
from edgefed.transport.base import Transport
from schemas import codec, topics
from schemas.codec import Compression
from schemas.errors import ConfigError
from schemas.messages import SplitReply, SplitRequest

log = logging.getLogger(__name__)


class SplitServing(Protocol):
    """What an in-process channel needs of a split server (``aggregator.split_training``)."""

    task_id: str

    def serve(self, requests: list[SplitRequest]) -> list[SplitReply]:
        """One reply per request, in order."""
        ...


class MqttSplitChannel:
    """The split channel of one agent; ``exchange`` runs in the trainer's worker thread."""

    def __init__(
        self,
        transport: Transport,
        loop: asyncio.AbstractEventLoop,
        *,
        federation: str,
        client_id: str,
        task_id: str,
        timeout_s: float = 10.0,
        retries: int = 2,
        emulation: DeviceEmulation | None = None,
    ) -> None:
        """Publish through ``transport`` on ``loop`` (the agent's event loop).

        With ``emulation`` every answered exchange is held for the emulated device's links.
        """
        if not timeout_s > 0 or retries < 0:
            raise ConfigError(f"need timeout_s > 0 and retries >= 0, got {timeout_s}, {retries}")
        self.client_id = client_id
        self.task_id = task_id
        self._transport = transport
        self._loop = loop
        self._federation = federation
        self._timeout_s = timeout_s
        self._retries = retries
        self._emulation = emulation
        self._waiting: dict[str, asyncio.Future[tuple[SplitReply, int]]] = {}
        self.ignored = 0
        """Replies that arrived for no waiting request (late or duplicate)."""

    def deliver(self, reply: SplitReply, size: int) -> None:
        """Hand a received reply to its waiting request (on the event loop)."""
        waiter = self._waiting.get(reply.request_id)
        if waiter is None or waiter.done():
            self.ignored += 1
            log.info(
                "%s: ignoring late or duplicate split reply %s", self.client_id, reply.request_id
            )
            return
        waiter.set_result((reply, size))

    async def _exchange(
        self, request: SplitRequest, compression: Compression
    ) -> tuple[SplitReply, int, int]:
        waiter: asyncio.Future[tuple[SplitReply, int]] = self._loop.create_future()
        self._waiting[request.request_id] = waiter
        topic = topics.split_fwd(self._federation, self.client_id)
        sent = 0
        try:
            for attempt in range(self._retries + 1):
                sent += await self._transport.publish(topic, request, compression=compression)
                try:
                    async with asyncio.timeout(self._timeout_s):
                        reply, size = await asyncio.shield(waiter)
                except TimeoutError:
                    log.warning(
                        "%s: no split reply to %s after %.1f s (attempt %d)",
                        self.client_id,
                        request.request_id,
                        self._timeout_s,
                        attempt + 1,
                    )
                else:
                    if self._emulation is not None:
                        await self._emulation.exchange(up=sent, down=size)
                    return reply, sent, size
            raise TimeoutError(
                f"split server did not answer {request.request_id} in {self._retries + 1} tries"
            )
        finally:
            self._waiting.pop(request.request_id, None)

    def exchange(
        self, request: SplitRequest, *, compression: Compression
    ) -> tuple[SplitReply, int, int]:
        """Send ``request`` and block until its reply; raises ``TimeoutError`` after retries."""
        future: concurrent.futures.Future[tuple[SplitReply, int, int]] = (
            asyncio.run_coroutine_threadsafe(self._exchange(request, compression), self._loop)
        )
        return future.result()


class DirectSplitChannel:
    """Calls a split server in this process, through the wire codec both ways."""

    def __init__(
        self, server: SplitServing, *, client_id: str, compression: Compression = "none"
    ) -> None:
        """Serve through ``server``; replies are encoded with ``compression``."""
        self.client_id = client_id
        self.task_id = server.task_id
        self._server = server
        self._reply_compression = compression

    def exchange(
        self, request: SplitRequest, *, compression: Compression
    ) -> tuple[SplitReply, int, int]:
        """Encode, serve and decode one request; return the reply and both sizes."""
        up = codec.encode(request, compression=compression)
        received = codec.decode(up)
        assert isinstance(received, SplitRequest)
        (reply,) = self._server.serve([received])
        down = codec.encode(reply, compression=self._reply_compression)
        answer = codec.decode(down)
        assert isinstance(answer, SplitReply)
        return answer, len(up), len(down)
