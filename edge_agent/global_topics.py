"""The exact topics of the global an agent waits for, subscribed to one task at a time.

Wildcard subscriptions would be simpler, but some brokers (RabbitMQ's MQTT plugin) hand a
retained message only to a subscription that names its topic, so an agent that joins after
the global was published would wait forever. The task names the version and how many chunk
topics its global uses; the agent subscribes to exactly those, and lets go of the previous
version's (docs/architecture.md §3). It also tells, when an agent has waited long, which of
them (or the task itself) has not come.
"""

from __future__ import annotations

import logging

from edgefed.transport.base import Transport
from schemas import topics
from schemas.messages import GlobalModel, Task


class GlobalTopics:
    """Keeps one agent subscribed to the chunk topics of the global its task announces."""

    def __init__(self, transport: Transport, federation: str) -> None:
        """Subscribe through ``transport`` to globals of ``federation``."""
        self._transport = transport
        self._federation = federation
        self.subscribed: tuple[str, ...] = ()

    async def follow(self, task: Task) -> None:
        """Subscribe to ``task``'s global (its retained chunks arrive now), then drop the last."""
        wanted = tuple(
            topics.global_model(self._federation, task.version, chunk)
            for chunk in range(task.global_chunks)
        )
        for topic in wanted:
            if topic not in self.subscribed:
                await self._transport.subscribe(topic)
        for topic in self.subscribed:
            if topic not in wanted:
                await self._transport.unsubscribe(topic)
        self.subscribed = wanted

    def waiting_on(
        self, client_id: str, task: Task | None, global_: GlobalModel | None
    ) -> tuple[int, str]:
        """What an agent holding ``task`` and ``global_`` still waits for, and how loudly."""
        if task is None:
            where = topics.task(self._federation)
            return logging.WARNING, f"{client_id}: no task on {where} yet: is the aggregator up?"
        if global_ is None or global_.version < task.version:
            level = logging.WARNING if global_ is None else logging.INFO
            where = ", ".join(self.subscribed)
            return level, f"{client_id}: the global of version {task.version} ({where}) is late"
        return logging.INFO, f"{client_id}: at version {global_.version}, waiting for the next"
