"""Publishing a federation's retained state: the global (one topic per chunk), task, metrics.

Both are signed when the aggregator has a key (docs/architecture.md §8). Each chunk of a
global has a retained topic of its own, so the chunk counts per version are kept (and
checkpointed) to clear an older version's topics once a newer one is out.
"""

from __future__ import annotations

from edgefed.security.signing import GlobalSigner, signed_by
from edgefed.transport.base import Transport
from schemas import topics
from schemas.messages import GlobalModel, Metrics, Task


class Publisher:
    """Publishes globals and tasks of one federation, retained."""

    def __init__(self, transport: Transport, federation: str, signer: GlobalSigner | None) -> None:
        """Publish on ``transport`` under ``federation``; sign with ``signer`` when given."""
        self._transport = transport
        self._federation = federation
        self._signer = signer
        self.chunks: dict[int, int] = {}
        """Topics used by each version's global that is still retained, by version."""

    async def publish_global(self, message: GlobalModel) -> None:
        """Publish one version's global on ``global/<version>/<chunk>``."""
        fed, version = self._federation, message.version
        used: set[int] = set()

        def chunk_topic(index: int) -> str:
            used.add(index)
            return topics.global_model(fed, version, index)

        signed = signed_by(self._signer, message, federation=fed)
        await self._transport.publish(
            topics.global_model(fed, version), signed, retain=True, chunk_topic=chunk_topic
        )
        self.chunks[version] = max(used, default=0) + 1

    async def publish_task(self, task: Task) -> None:
        """Publish ``task`` on the task topic."""
        signed = signed_by(self._signer, task, federation=self._federation)
        await self._transport.publish(topics.task(self._federation), signed, retain=True)

    async def publish_metrics(self, metrics: Metrics) -> None:
        """Publish ``metrics``, and a JSON copy on ``metrics/json``; retained, for late joiners."""
        fed = self._federation
        await self._transport.publish(topics.metrics(fed), metrics, retain=True)
        await self._transport.publish_text(
            topics.metrics_json(fed), metrics.model_dump_json(), retain=True
        )

    async def clear_before(self, version: int) -> None:
        """Delete the retained chunks of every global older than ``version``."""
        for old in [v for v in self.chunks if v < version]:
            for index in range(self.chunks.pop(old)):
                await self._transport.clear_retained(
                    topics.global_model(self._federation, old, index)
                )
