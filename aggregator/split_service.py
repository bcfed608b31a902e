"""The split server on the broker: requests in on ``split/+/fwd``, replies out on ``.../bwd``.

It never waits for a device: requests are queued as they arrive, and whatever is queued when
the server part becomes free goes through it together (``SplitServer`` batches what fits),
in a worker thread so receiving goes on meanwhile. A U-shaped step whose device vanished
expires on the server. A retry is answered from memory. Bytes that are not a split request,
or a request on another client's topic, are answered with a refusal that says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Final

from aggregator.config import AggregatorConfig
from aggregator.results import Results, SplitRecord
from aggregator.service import AggregatorService
from aggregator.split_training import SplitFed, SplitServer, SplitServerConfig
from edgefed.ml.models import attach_lora, build_model
from edgefed.transport.base import Transport
from edgefed.transport.frames import BadDelivery, Delivery
from schemas import topics
from schemas.codec import Compression
from schemas.errors import PayloadTooLarge, RejectReason, TopicError
from schemas.messages import SplitReply, SplitRequest

log = logging.getLogger(__name__)

SPLIT_STATE: Final = "split_server"
"""Key of the split server's state in the aggregator's checkpoint."""


def make_split_server(
    config: AggregatorConfig, settings: SplitServerConfig | None = None
) -> SplitServer:
    """A split server on its own copy of the federation's base model and adapter.

    Without ``settings`` its part learns at the task's rate, as the devices' parts do.
    """
    model = attach_lora(build_model(config.model, seed=config.seed), config.lora)
    settings = settings or SplitServerConfig(lr=config.train.lr)
    return SplitServer(model, task_id=config.task_id, config=settings)


class SplitService:
    """Feeds a :class:`SplitServer` from the broker; ``run`` serves until cancelled."""

    def __init__(
        self,
        server: SplitServer,
        transport: Transport,
        *,
        federation: str,
        compression: Compression = "fp16",
        max_batch: int = 8,
        results: Results | None = None,
        service: AggregatorService | None = None,
    ) -> None:
        """Serve ``federation``'s split requests; replies travel with ``compression``.

        Every answered request is recorded in ``results.split`` (the aggregator's results).
        With ``service``, serving starts once it is ready, from its (possibly resumed) global.
        """
        self.server = server
        self._transport = transport
        self._federation = federation
        self._compression = compression
        self._max_batch = max_batch
        self._queue: asyncio.Queue[SplitRequest] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.batch_sizes: list[int] = []
        self.results = results or Results(config={})
        self._service = service
        self._sizes: dict[str, tuple[str, int]] = {}
        """Request id -> (phase, received bytes), until it is answered."""
        started = time.monotonic()
        self._elapsed_s = (
            service.elapsed_s if service else lambda: round(time.monotonic() - started, 4)
        )
        """The results' clock: the aggregator's beside one, else this service's own."""

    @classmethod
    def beside(
        cls,
        service: AggregatorService,
        transport: Transport,
        *,
        settings: SplitServerConfig | None = None,
        compression: Compression = "fp16",
    ) -> SplitService:
        """A split server for ``service``'s federation, merged through its strategy.

        Call before ``service`` starts; run the result's ``run`` beside ``service.run``.
        The server's state goes into ``service``'s checkpoints, and a restarted service
        resumes it.
        """
        server = make_split_server(service.config, settings)
        service.use_strategy(SplitFed(service.strategy, server))
        service.register_state(SPLIT_STATE, server)  # its LoRA's progress and AdamW moments
        return cls(
            server,
            transport,
            federation=service.config.federation,
            compression=compression,
            results=service.results,
            service=service,
        )

    async def run(self) -> None:
        """Subscribe, then receive and serve until cancelled."""
        if self._service is not None:
            await self._service.ready.wait()
            self.server.load(self._service.current)
        await self._transport.subscribe(topics.split_fwd_filter(self._federation))
        self.ready.set()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._receive(), name="split-receive")
            group.create_task(self._serve(), name="split-serve")

    async def _receive(self) -> None:
        async for delivery in self._transport.deliveries():
            await self.handle(delivery)

    async def handle(self, delivery: Delivery | BadDelivery) -> None:
        """Queue one received request, or answer it at once (refusal, retry)."""
        try:
            parsed = topics.parse(delivery.topic)
        except TopicError:
            return
        if parsed.kind != "split_fwd" or parsed.client_id is None:
            return
        self.bytes_in += delivery.size
        client = parsed.client_id
        if isinstance(delivery, BadDelivery):
            reason: RejectReason = (
                "too_large" if isinstance(delivery.error, PayloadTooLarge) else "malformed"
            )
            await self._refuse(client, "unreadable", reason, str(delivery.error))
            return
        request = delivery.message
        if not isinstance(request, SplitRequest) or request.client_id != client:
            await self._refuse(
                client,
                "unreadable",
                "malformed",
                "expected a split request for this topic's client",
            )
            return
        self._sizes[request.request_id] = (request.phase, delivery.size)
        cached = self.server.answered(request.request_id)
        if cached is not None:
            await self._reply(cached)
            return
        await self._queue.put(request)

    async def _serve(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self.batch_sizes.append(len(batch))
            try:
                replies = await asyncio.to_thread(self.server.serve, batch)
            except (RuntimeError, ValueError) as exc:  # a server bug must not stop serving
                log.exception("split server failed on a batch of %d", len(batch))
                replies = [
                    SplitReply(
                        request_id=r.request_id,
                        client_id=r.client_id,
                        accepted=False,
                        reason="internal",
                        detail=f"server error: {exc}",
                    )
                    for r in batch
                ]
            for reply in replies:
                if not reply.accepted:
                    self.rejected[reply.reason or "malformed"] += 1
                    log.warning(
                        "refused split request %s of %s: %s: %s",
                        reply.request_id,
                        reply.client_id,
                        reply.reason,
                        reply.detail,
                    )
                await self._reply(reply)

    async def _refuse(
        self, client: str, request_id: str, reason: RejectReason, detail: str
    ) -> None:
        self.rejected[reason] += 1
        log.warning("refused split request from %s: %s: %s", client, reason, detail)
        reply = SplitReply(
            request_id=request_id, client_id=client, accepted=False, reason=reason, detail=detail
        )
        await self._reply(reply)

    async def _reply(self, reply: SplitReply) -> None:
        topic = topics.split_bwd(self._federation, reply.client_id)
        sent = await self._transport.publish(topic, reply, compression=self._compression)
        self.bytes_out += sent
        phase, received = self._sizes.pop(reply.request_id, ("forward", 0))
        self.results.split.append(
            SplitRecord(
                client_id=reply.client_id,
                request_id=reply.request_id,
                phase=phase,
                accepted=reply.accepted,
                bytes_up=received,
                bytes_down=sent,
                server_s=round(reply.server_s, 6),
                time_s=self._elapsed_s(),
            )
        )
