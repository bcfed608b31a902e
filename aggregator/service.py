"""The aggregator: an asyncio service that merges updates as they arrive.

It publishes the task and the initial global adapter (both retained), then for
each update: validate, weight by staleness, merge through the configured strategy,
advance the version when the strategy produces a new global, publish it, evaluate,
and answer the sender with an Ack or a Nack carrying the reason. Bad input is
answered and dropped; it never stops the service or touches its state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from peft import PeftModel

from aggregator.config import AggregatorConfig
from aggregator.results import Results, UpdateRecord, VersionRecord
from aggregator.strategies import make_strategy
from aggregator.validation import ValidationPolicy, validate_update
from edgefed.data import TokenDataset, evaluate, load_data
from edgefed.modeling import adapter_shapes, attach_lora, build_model, get_adapter, set_adapter
from edgefed.transport import BadDelivery, Delivery, Transport
from schemas import topics
from schemas.errors import PayloadTooLarge, RejectReason, TopicError, UpdateRejected
from schemas.messages import Ack, GlobalModel, Metrics, Task, TensorMap, Update

log = logging.getLogger(__name__)

_ANSWERED_IDS_KEPT = 100_000
"""How many answered update ids are remembered to re-ack duplicates."""


class AggregatorService:
    """One federation's merger; ``run`` returns when ``max_versions`` is reached."""

    def __init__(self, config: AggregatorConfig, transport: Transport) -> None:
        self.config = config
        self._transport = transport
        params = (
            {"alpha": config.strategy.alpha}
            if config.strategy.name == "fedasync"
            else {
                "buffer_size": float(config.strategy.buffer_size),
                "server_lr": config.strategy.server_lr,
            }
        )
        self._strategy = make_strategy(
            config.strategy.name,
            staleness=config.strategy.staleness,
            staleness_params=config.strategy.staleness_params,
            **params,
        )
        self._policy = ValidationPolicy(
            max_staleness=config.max_staleness,
            max_update_norm=config.max_update_norm,
            norm_action=config.norm_action,
        )
        self.version = 0
        self.results = Results(config=config.model_dump(mode="json"))
        self._globals: OrderedDict[int, TensorMap] = OrderedDict()
        self._answered: OrderedDict[str, Ack] = OrderedDict()
        self._chunks_published: dict[int, int] = {}
        self._merged_count = 0
        self._rejected_count = 0
        self._started = time.monotonic()
        self.published_version = -1
        self._published = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once the task and the first global are published."""

    @property
    def current(self) -> TensorMap:
        """The global adapter at the current version."""
        return self._globals[self.version]

    async def run(self) -> Results:
        """Publish the task and global, then merge updates until ``max_versions``."""
        fed = self.config.federation
        model = await asyncio.to_thread(self._build_model)
        self._model = model
        self._shapes = adapter_shapes(model)
        self._eval_data: TokenDataset = load_data(
            self.config.eval_data, seq_len=self.config.train.seq_len
        )
        self._globals[0] = get_adapter(model)
        self._started = time.monotonic()
        await self._transport.subscribe(topics.update_filter(fed))
        await self._publish_version()
        self.ready.set()
        log.info("aggregator %s ready at version 0 (%s)", fed, self._strategy.name)
        if self._finished():
            return self.results
        async for delivery in self._transport.deliveries():
            await self._handle(delivery)
            if self._finished():
                break
        return self.results

    def _finished(self) -> bool:
        return 0 < self.config.max_versions <= self.version

    def _build_model(self) -> PeftModel:
        base = build_model(self.config.model, seed=self.config.seed)
        return attach_lora(base, self.config.lora)

    def _task(self) -> Task:
        cfg = self.config
        return Task(
            task_id=cfg.task_id,
            federation=cfg.federation,
            version=self.version,
            method=cfg.method,
            model=cfg.model,
            lora=cfg.lora,
            train=cfg.train,
            max_staleness=cfg.max_staleness,
            seed=cfg.seed,
        )

    async def _publish_version(self) -> None:
        """Publish the global at the current version (retained), the task, and metrics."""
        fed, version = self.config.federation, self.version
        message = GlobalModel(task_id=self.config.task_id, version=version, tensors=self.current)
        used: set[int] = set()

        def chunk_topic(index: int) -> str:
            used.add(index)
            return topics.global_model(fed, version, index)

        await self._transport.publish(
            topics.global_model(fed, version), message, retain=True, chunk_topic=chunk_topic
        )
        self._chunks_published[version] = max(used, default=0) + 1
        await self._transport.publish(topics.task(fed), self._task(), retain=True)
        for old in [v for v in self._chunks_published if v < version]:
            for index in range(self._chunks_published.pop(old)):
                await self._transport.clear_retained(topics.global_model(fed, old, index))
        self.published_version = version
        self._published.set()
        self._published = asyncio.Event()
        await self._evaluate_and_report()

    async def _evaluate_and_report(self) -> None:
        loss: float | None = None
        accuracy: float | None = None
        if self.version % self.config.eval_every == 0 or self._finished():
            result = await asyncio.to_thread(self._evaluate, self.current)
            loss, accuracy = result
        record = VersionRecord(
            version=self.version,
            time_s=round(time.monotonic() - self._started, 4),
            eval_loss=loss,
            eval_accuracy=accuracy,
            merged_updates=self._merged_count,
        )
        self.results.history.append(record)
        log.info("version %d eval_loss=%s accuracy=%s", self.version, loss, accuracy)
        metrics = Metrics(
            version=self.version,
            time_s=record.time_s,
            eval_loss=loss,
            eval_accuracy=accuracy,
            merged_updates=self._merged_count,
            rejected_updates=self._rejected_count,
        )
        await self._transport.publish(topics.metrics(self.config.federation), metrics, qos=0)

    def _evaluate(self, adapter: TensorMap) -> tuple[float, float]:
        set_adapter(self._model, adapter)
        result = evaluate(self._model, self._eval_data)
        return result.loss, result.accuracy

    async def _handle(self, delivery: Delivery | BadDelivery) -> None:
        try:
            parsed = topics.parse(delivery.topic)
        except TopicError:
            log.warning("ignoring message on unexpected topic %s", delivery.topic)
            return
        if parsed.kind != "update" or parsed.client_id is None:
            return
        if isinstance(delivery, BadDelivery):
            reason: RejectReason = (
                "too_large" if isinstance(delivery.error, PayloadTooLarge) else "malformed"
            )
            await self._nack_unreadable(parsed.client_id, reason, str(delivery.error))
            return
        message = delivery.message
        if not isinstance(message, Update) or message.client_id != parsed.client_id:
            await self._nack_unreadable(
                parsed.client_id,
                "malformed",
                "expected an update whose client_id matches the topic",
            )
            return
        await self._handle_update(message, delivery.size)

    async def _handle_update(self, update: Update, size: int) -> None:
        previous = self._answered.get(update.update_id)
        if previous is not None:
            log.info("duplicate update %s from %s: acked again", update.update_id, update.client_id)
            await self._send_ack(previous.model_copy(update={"duplicate": True}))
            return
        staleness = self.version - update.base_version
        try:
            checked = validate_update(
                update,
                task_id=self.config.task_id,
                method=self.config.method,
                current_version=self.version,
                shapes=self._shapes,
                policy=self._policy,
            )
            base = self._base(update.base_version)
        except UpdateRejected as exc:
            self._rejected_count += 1
            log.warning("rejected update %s from %s: %s", update.update_id, update.client_id, exc)
            ack = Ack(
                update_id=update.update_id,
                client_id=update.client_id,
                accepted=False,
                reason=exc.reason,
                detail=exc.detail,
                version=self.version,
                staleness=staleness,
            )
            self._record(update, size, staleness, ack)
            await self._send_ack(ack)
            return
        result = self._strategy.submit(
            current=self.current,
            base=base,
            delta=checked.delta,
            staleness=checked.staleness,
            num_samples=update.num_samples,
            update_id=update.update_id,
        )
        if result.new_global is not None:
            for merged_id in result.merged_update_ids:
                self.results.merges[merged_id] = self.results.merges.get(merged_id, 0) + 1
            self._merged_count += len(result.merged_update_ids)
            self._advance(result.new_global)
        ack = Ack(
            update_id=update.update_id,
            client_id=update.client_id,
            accepted=True,
            version=self.version,
            staleness=checked.staleness,
        )
        self._record(update, size, checked.staleness, ack)
        await self._send_ack(ack)
        if result.new_global is not None:
            await self._publish_version()

    def _base(self, version: int) -> TensorMap:
        """The global an update started from; only the last ``max_staleness`` are kept."""
        base = self._globals.get(version)
        if base is None:
            raise UpdateRejected("stale", f"base version {version} is no longer kept")
        return base

    def _advance(self, new_global: TensorMap) -> None:
        self.version += 1
        self._globals[self.version] = new_global
        while len(self._globals) > self.config.max_staleness + 1:
            self._globals.popitem(last=False)

    async def wait_for_version(self, version: int) -> None:
        """Return once a global of at least ``version`` is published (retained)."""
        while self.published_version < version:
            await self._published.wait()

    def _record(self, update: Update, size: int, staleness: int, ack: Ack) -> None:
        self.results.updates.append(
            UpdateRecord(
                client_id=update.client_id,
                update_id=update.update_id,
                base_version=update.base_version,
                staleness=staleness,
                bytes=size,
                accepted=ack.accepted,
                reason=ack.reason,
                version_after=ack.version,
                time_s=round(time.monotonic() - self._started, 4),
            )
        )
        self._answered[update.update_id] = ack
        while len(self._answered) > _ANSWERED_IDS_KEPT:
            self._answered.popitem(last=False)

    async def _nack_unreadable(self, client_id: str, reason: RejectReason, detail: str) -> None:
        self._rejected_count += 1
        log.warning("rejected unreadable update from %s: %s", client_id, detail)
        ack = Ack(
            update_id="unreadable",
            client_id=client_id,
            accepted=False,
            reason=reason,
            detail=detail,
            version=self.version,
        )
        await self._send_ack(ack)

    async def _send_ack(self, ack: Ack) -> None:
        await self._transport.publish(topics.ack(self.config.federation, ack.client_id), ack)
