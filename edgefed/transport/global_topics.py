"""The exact topics of the global an agent (or a site aggregator) waits for, one task at a time.

Wildcard subscriptions would be simpler, but some brokers (RabbitMQ's MQTT plugin) hand a
retained message only to a subscription that names its topic, so an agent that joins after
the global was published would wait forever. The task names the version and how many chunk
topics its global uses; the agent subscribes to exactly those, and lets go of the previous
version's (docs/architecture.md §3). It also tells, when an agent has waited, which of them
(or the task itself) has not come, and what to ask the aggregator for.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from edgefed.transport.base import Transport
from schemas import topics
from schemas.messages import Ask, GlobalModel, Task


class Wait(NamedTuple):
    """What an agent waits for: a line to log at ``level``, and what to ask for (if anything)."""

    level: int
    line: str
    ask: Ask | None


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

    async def ask(self, ask: Ask) -> None:
        """Ask the aggregator for a task or global the broker has not handed over."""
        await self._transport.publish(topics.ask(self._federation, ask.client_id), ask)

    def waiting_on(self, client_id: str, task: Task | None, global_: GlobalModel | None) -> Wait:
        """What an agent holding ``task`` and ``global_`` still waits for, and how loudly."""
        if task is None:
            where = topics.task(self._federation)
            line = f"{client_id}: no task on {where} yet: is the aggregator up?"
            return Wait(logging.WARNING, line, Ask(client_id=client_id, missing="task"))
        if global_ is None or global_.version < task.version:
            level = logging.WARNING if global_ is None else logging.INFO
            where = ", ".join(self.subscribed)
            line = f"{client_id}: the global of version {task.version} ({where}) is late"
            ask = Ask(client_id=client_id, missing="global", version=task.version)
            return Wait(level, line, ask)
        line = f"{client_id}: at version {global_.version}, waiting for the next"
        return Wait(logging.INFO, line, None)
