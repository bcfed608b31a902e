"""What an aggregator hears from devices besides updates: their statuses and their asks.

A status (the device's own, or the offline will the broker publishes for it) is kept, and
mirrored as JSON on ``status/<client>/json`` so operators read the fleet with
``mosquitto_sub``. An ask comes from a device that has waited without its task or global,
for instance on a broker that keeps no retained messages or lost them in a restart; it is
answered by publishing that message again, at most once per :data:`ANSWER_EVERY_S` however
many devices ask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Literal

from edgefed.transport.base import Transport
from edgefed.transport.frames import BadDelivery, Delivery
from schemas import topics
from schemas.messages import Ask, Status
from schemas.topics import ParsedTopic

log = logging.getLogger(__name__)

ANSWER_EVERY_S: Final = 2.0
"""The shortest time between two answers of the same kind: one publication serves every
device that asked meanwhile."""

Missing = Literal["task", "global"]


class Fleet:
    """The devices' latest statuses, and answers to their asks."""

    def __init__(
        self,
        transport: Transport,
        federation: str,
        publish_again: Callable[[Missing], Awaitable[None]],
        on_speed: Callable[[str, float | None], None] | None = None,
    ) -> None:
        """Answer asks through ``publish_again``; tell ``on_speed`` each device's speed."""
        self._transport = transport
        self._federation = federation
        self._publish_again = publish_again
        self._on_speed = on_speed
        self._answered_at: dict[Missing, float] = {}
        self.statuses: dict[str, Status] = {}
        """The latest status of every device heard from, by client id."""

    async def subscribe(self) -> None:
        """Subscribe to every device's status and asks."""
        fed = self._federation
        for topic_filter in (topics.status_filter(fed), topics.ask_filter(fed)):
            await self._transport.subscribe(topic_filter)

    async def handle(self, parsed: ParsedTopic, delivery: Delivery | BadDelivery) -> bool:
        """Take a status or an ask; False for anything else (it is not this module's)."""
        if parsed.client_id is None or parsed.kind not in ("status", "ask"):
            return False
        message = delivery.message if isinstance(delivery, Delivery) else None
        if parsed.kind == "status" and isinstance(message, Status):
            await self._keep(parsed.client_id, message)
        elif parsed.kind == "ask" and isinstance(message, Ask):
            await self._answer(message)
        else:
            log.warning("ignoring an unreadable or mismatched message on %s", delivery.topic)
        return True

    async def _keep(self, client_id: str, status: Status) -> None:
        self.statuses[client_id] = status
        if self._on_speed is not None:
            self._on_speed(client_id, status.profile.relative_speed)
        await self._transport.publish_text(
            topics.status_json(self._federation, client_id), status.model_dump_json(), retain=True
        )

    async def _answer(self, ask: Ask) -> None:
        now = time.monotonic()
        if now - self._answered_at.get(ask.missing, -ANSWER_EVERY_S) < ANSWER_EVERY_S:
            return
        self._answered_at[ask.missing] = now
        log.info("%s asked for the %s: publishing it again", ask.client_id, ask.missing)
        await self._publish_again(ask.missing)
