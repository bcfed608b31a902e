"""Deleting a federation's retained messages from its broker (``edgefed clear``).

A run never needs it: a fresh aggregator starts a new run id, and what an earlier run left
loses to it (docs/architecture.md §8). It is for operators who retire a federation, or whose
broker holds messages forged before its ACL was tightened, which every restarting device
would otherwise refuse again and log.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from edgefed.transport.broker_choice import first_answering
from edgefed.transport.config import TransportConfig
from edgefed.transport.raw import (
    QUIET_S,
    RawClient,
    delete_retained,
    raw_client_as,
    retained_messages,
)
from schemas import codec, topics
from schemas.errors import CodecError
from schemas.messages import Task


@dataclass(frozen=True)
class Cleared:
    """What ``edgefed clear`` found retained, and what the broker still keeps after it."""

    found: tuple[str, ...]
    left: tuple[str, ...]


async def clear_federation(
    config: TransportConfig, federation: str, *, dry_run: bool = False, quiet_s: float = QUIET_S
) -> Cleared:
    """Delete every retained message under ``edgefed/<federation>/`` (list only: ``dry_run``).

    What the broker still holds afterwards is reported as ``left``: an ACL may refuse the
    connecting identity the deletion of another's topics, without telling it (MQTT 3.1.1).
    """
    broker = await first_answering(config.brokers)  # a cluster's node that is up
    async with raw_client_as(config, broker) as client:
        found = await _retained(client, federation, quiet_s)
        if dry_run or not found:
            return Cleared(tuple(sorted(found)), tuple(sorted(found)))
        await delete_retained(client, sorted(found))
    async with raw_client_as(config, broker) as client:  # a new subscription sees what is left
        left = await _retained(client, federation, quiet_s)
    return Cleared(tuple(sorted(found)), tuple(sorted(left)))


async def _retained(client: RawClient, federation: str, quiet_s: float) -> set[str]:
    """Topics with a retained message, by wildcard and by the exact topics a task names.

    Some brokers (RabbitMQ) hand retained messages only to subscriptions without
    wildcards, so the fixed topics are asked for by name, and so are the global chunks the
    retained task names.
    """
    exact = [topics.task(federation), topics.metrics(federation), topics.metrics_json(federation)]
    found = await retained_messages(client, [topics.federation_filter(federation), *exact], quiet_s)
    task = found.get(topics.task(federation))
    chunks: list[str] = []
    if task is not None:
        with contextlib.suppress(CodecError):
            message = codec.decode(task)
            if isinstance(message, Task):
                chunks = [
                    topics.global_model(federation, message.version, chunk)
                    for chunk in range(message.global_chunks)
                ]
    found |= await retained_messages(client, [c for c in chunks if c not in found], quiet_s)
    return set(found)
