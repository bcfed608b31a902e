"""The aggregator: an asyncio service that merges updates as they arrive.

It publishes the task and the initial global adapter (both retained), then for each
update: validate, weight by staleness, merge through the configured strategy, advance the
version when the strategy produces a new global, publish it, and answer the sender with an
Ack or a Nack carrying the reason. Bad input is answered and dropped, state intact. Versions
are scored on the held-out rows beside the intake (:mod:`aggregator.scoring`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from peft import PeftModel

from aggregator import ops
from aggregator.acks import AckSender
from aggregator.adapter_folder import FederationModel, initial_adapter, keep_latest
from aggregator.audit import AUDIT_FILE, MergeEntry, UpdateEntry
from aggregator.checkpoint import Checkpoint, Stateful
from aggregator.config import AggregatorConfig, task_message
from aggregator.durability import Ledger, answers_to_keep
from aggregator.fleet import Fleet, Missing
from aggregator.fwdgrad import perturbation_controller, perturbations_per_step
from aggregator.kd_handler import KdContribution, KdHandler, make_kd_handler
from aggregator.presums import Presums
from aggregator.privacy import PrivateFedBuff
from aggregator.prometheus import merge_histogram
from aggregator.publisher import Publisher
from aggregator.results import Results, UpdateRecord, VersionRecord, series_path
from aggregator.schedule import lr_factor, run_progress
from aggregator.scoring import Scoring
from aggregator.strategies import MergeResult, Strategy
from aggregator.update_checks import CheckedDelta, UpdateChecks, merger_policy
from edgefed.data.loading import load_data
from edgefed.ml.models import adapter_shapes
from edgefed.security.signing import GlobalSigner
from edgefed.transport.base import Transport
from edgefed.transport.frames import BadDelivery, Delivery
from schemas import topics
from schemas.errors import ConfigError, PayloadTooLarge, RejectReason, TopicError, UpdateRejected
from schemas.messages import (
    Ack,
    GlobalModel,
    Metrics,
    Task,
    TensorMap,
    Update,
    new_run_id,
)

log = logging.getLogger(__name__)

_ANSWERED_IDS_KEPT = 100_000
"""How many answered update ids are remembered to re-ack duplicates."""


class AggregatorService:
    """One federation's merger; ``run`` returns when ``max_versions`` is reached."""

    def __init__(self, config: AggregatorConfig, transport: Transport) -> None:
        self.config = config
        self._transport = transport
        self._strategy: Strategy = config.strategy.build()
        if config.privacy is not None:
            self._strategy = PrivateFedBuff(self._strategy, config.privacy)
        signer = (
            GlobalSigner.from_file(config.signing_key) if config.signing_key is not None else None
        )
        self._publisher = Publisher(transport, config.federation, signer)
        self._policy = merger_policy(config)
        self._perturbations = perturbation_controller(config)  # None: the task's K stays
        self.version = 0
        self.run_id = ""  # Task.run_id: new at a fresh start, kept when resuming
        self.session = new_run_id()  # Task.session: this process's start
        self.results = Results(
            config=config.model_dump(mode="json"),
            series=series_path(config.json_out) if config.json_out else None,
        )
        self._globals: OrderedDict[int, TensorMap] = OrderedDict()
        self._answered: OrderedDict[str, Ack] = OrderedDict()
        self._merged_count = 0
        self._rejected_count = 0
        self._started = time.monotonic()
        self.published_version = -1
        self._published = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once the task and the first global are published."""
        self._rejections: Counter[str] = Counter()
        self._presums = Presums()
        self._stateful: dict[str, Stateful] = {"strategy": self._strategy, "presums": self._presums}
        if self._perturbations is not None:
            self._stateful["perturbations"] = self._perturbations
        self._lock = asyncio.Lock()
        self._acks = AckSender(transport, config.federation)
        speeds = self._perturbations  # device speeds set forward-gradient perturbation counts
        on_speed = None if speeds is None else speeds.set_speed
        self.fleet = Fleet(transport, config.federation, self._publish_again, on_speed)
        self.merge_seconds = merge_histogram()  # read by aggregator.prometheus
        self._kd: KdHandler | None = None
        """Distils KD updates' logits; set in ``start`` when the federation accepts ``kd``."""
        audit = config.audit_log
        if audit is None and config.checkpoint_dir is not None:
            audit = str(Path(config.checkpoint_dir) / AUDIT_FILE)
        self._ledger = Ledger(
            checkpoint_dir=config.checkpoint_dir, audit_path=audit, every=config.checkpoint_every
        )

    def register_state(self, key: str, part: Stateful) -> None:
        """Checkpoint ``part`` under ``key`` with the rest of the state; call before ``run``.

        Raises:
            ConfigError: ``key`` is taken.
        """
        if key in self._stateful:
            raise ConfigError(f"state {key!r} is already registered")
        self._stateful[key] = part

    def use_strategy(self, strategy: Strategy) -> None:
        """Merge with ``strategy`` (e.g. split learning's wrapper of this one); before ``start``."""
        self._strategy = self._stateful["strategy"] = strategy

    @property
    def strategy(self) -> Strategy:
        """The merge strategy, for metrics and tests; change it only through updates."""
        return self._strategy

    @property
    def rejections(self) -> dict[str, int]:
        """Rejected updates so far, by reason (also in every Metrics message)."""
        return dict(self._rejections)

    @property
    def current(self) -> TensorMap:
        """The global adapter at the current version."""
        return self._globals[self.version]

    async def run(self) -> Results:
        """Publish the task and global, then merge updates until ``max_versions``."""
        if not self.ready.is_set():
            await self.start()
        holding = self.config.checkpoint_every > 1 and not self._finished()
        flusher = asyncio.create_task(self._commit_held_later()) if holding else None
        try:
            deliveries = aiter(self._transport.deliveries())
            while not self._finished():
                try:  # a run bounded by time ends between deliveries, never inside one
                    async with asyncio.timeout(self._seconds_left()):
                        delivery = await anext(deliveries)
                except (StopAsyncIteration, TimeoutError):
                    break
                async with self._lock:  # acks pipelined; ``handle`` waits for each
                    await self._handle(delivery)
            async with self._lock:
                if self._ledger.held:
                    await self._commit()
            await self._scoring.drain()
        finally:
            await self._scoring.close()
            await self._acks.close()
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            self._ledger.close()
            if isinstance(self._strategy, PrivateFedBuff):
                self.results.privacy = self._strategy.accountant.report()
        return self.results

    async def start(self) -> None:
        """Resume from the latest checkpoint (if any), then publish the task and global."""
        fed = self.config.federation
        model = await asyncio.to_thread(self._build_model)
        self._model = model
        self._shapes = adapter_shapes(model)
        if "kd" in {self.config.method, *self.config.accept_methods}:
            self._kd = await asyncio.to_thread(make_kd_handler, self.config, model, self._policy)
            self._stateful["kd"] = self._kd
        eval_data = load_data(
            self.config.eval_data, seq_len=self.config.train.seq_len, model=self.config.model
        )
        self._scoring = Scoring(self._build_model, eval_data, self._report_version)
        self._scoring.start()
        try:
            self._resume(lambda: initial_adapter(self.config, model))
            self._checks = UpdateChecks.of(
                self.config, self._policy, self._shapes, self._kd, run_id=self.run_id
            )
            self.results.start_series(resumed=self.version > 0)
            self._started = time.monotonic()
            replicas = self.config.intake == "replicas"
            await self._transport.subscribe(
                topics.intake_filter(fed) if replicas else topics.update_filter(fed)
            )
            await self.fleet.subscribe()
            await self._publish_version()
        except BaseException:
            self.close()
            raise
        self.ready.set()
        log.info("aggregator %s ready at version %d (%s)", fed, self.version, self._strategy.name)

    def close(self) -> None:
        """Sync and close the audit log; ``run`` does it on return, callers of ``start`` must."""
        self._ledger.close()
        if hasattr(self, "_scoring"):  # set in ``start``
            self._scoring.cancel()

    async def handle(self, delivery: Delivery | BadDelivery) -> None:
        """Answer one received message as the run loop does (after ``start``)."""
        async with self._lock:
            await self._handle(delivery)
        await self._acks.flush()

    def elapsed_s(self) -> float:
        """Seconds since this service became ready: the clock of every record in its results."""
        return round(time.monotonic() - self._started, 4)

    def _finished(self) -> bool:
        return 0 < self.config.max_versions <= self.version or self._seconds_left() == 0

    def _seconds_left(self) -> float | None:
        limit = self.config.max_seconds
        return max(0.0, limit - self.elapsed_s()) if limit > 0 else None

    def _lr_factor(self) -> float:
        """The schedule's multiple of the merge step now (:mod:`aggregator.schedule`)."""
        cfg = self.config
        if cfg.privacy is not None:  # its noise is calibrated to a full step of clipped deltas
            return 1.0
        progress = run_progress(
            version=self.version, max_versions=cfg.max_versions, elapsed_s=self.elapsed_s(),
            max_seconds=cfg.max_seconds,
        )  # fmt: skip
        return lr_factor(cfg.strategy.schedule, progress, final=cfg.strategy.final_lr)

    def _build_model(self) -> PeftModel:
        return FederationModel.of(self.config).build()

    def _task(self) -> Task:
        return task_message(
            self.config, version=self.version, run_id=self.run_id, session=self.session,
            global_chunks=self._publisher.chunks.get(self.version, 1),
            perturbations=None if self._perturbations is None else self._perturbations.perturbations,
            proxy=None if self._kd is None else self._kd.proxy_spec(self.version),
        )  # fmt: skip

    async def _publish_version(self) -> None:
        """Publish the global at the current version (retained), the task, and metrics."""
        await self._publish_again("global")
        await self._publish_again("task")
        await self._publisher.clear_before(self.version)
        await asyncio.to_thread(  # <checkpoint_dir>/adapter/: the latest global, as PEFT
            keep_latest, self._model, self.current, self.config, version=self.version,
            run_id=self.run_id,
        )  # fmt: skip
        self.published_version = self.version
        self._published.set()
        self._published = asyncio.Event()
        self._queue_version()

    async def _publish_again(self, what: Missing) -> None:
        """Publish the task or the current global (retained), as at a new version."""
        if what == "task":
            await self._publisher.publish_task(self._task())
            return
        message = GlobalModel(
            task_id=self.config.task_id, version=self.version, run_id=self.run_id,
            tensors=self.current,
        )  # fmt: skip
        await self._publisher.publish_global(message)

    def _queue_version(self) -> None:
        """Hand the new version's record to scoring, with its adapter where it is scored."""
        every = self.config.eval_every
        scored = (every and self.version % every == 0) or self._finished()
        record = VersionRecord(
            version=self.version, time_s=self.elapsed_s(), eval_loss=None, eval_accuracy=None,
            merged_updates=self._merged_count,
        )  # fmt: skip
        self._scoring.submit(record, self.current if scored else None)

    async def _report_version(self, record: VersionRecord) -> None:
        """Keep a version's record, scored or not, and publish it with the run's counters."""
        self.results.add_version(record)
        stats = self._transport.stats
        metrics = Metrics(
            **asdict(record),
            rejected_updates=self._rejected_count,
            rejected_by_reason=dict(self._rejections),
            staleness=self.results.staleness_counts(),
            bytes_received=stats.received_bytes,
            bytes_sent=stats.published_bytes,
        )
        await self._publisher.publish_metrics(metrics)

    async def _handle(self, delivery: Delivery | BadDelivery) -> None:
        try:
            parsed = topics.parse(delivery.topic)
        except TopicError:
            log.warning("ignoring message on unexpected topic %s", delivery.topic)
            return
        if await self.fleet.handle(parsed, delivery):
            return
        if parsed.kind not in ("update", "intake") or parsed.client_id is None:
            return
        if isinstance(delivery, BadDelivery):
            reason: RejectReason = (
                "too_large" if isinstance(delivery.error, PayloadTooLarge) else "malformed"
            )
            await self._nack_unreadable(
                parsed.client_id, reason, str(delivery.error), size=delivery.size
            )
            return
        message = delivery.message
        if (
            not isinstance(message, Update)
            or message.client_id != parsed.client_id
            or bool(message.parts) != (parsed.kind == "intake")
        ):
            detail = "expected an update whose client_id matches the topic (pre-sums on intake/)"
            await self._nack_unreadable(parsed.client_id, "malformed", detail, size=delivery.size)
            return
        await self._handle_update(message, delivery.size)

    async def _handle_update(self, update: Update, size: int) -> None:
        """Check an update, merge it and answer: the ack waits for its checkpoint, a nack not."""
        previous = self._answered.get(update.update_id)
        if previous is not None:
            await self._answer_repeat(update, previous, size)
            return
        taken = self._presums.merged_before(update, self._answered)
        if taken:
            await self._refuse_presum(update, taken, size)
            return
        try:
            checked = await self._checks.run(update, version=self.version, kept=self._globals)
        except UpdateRejected as exc:
            log.warning("rejected update %s from %s: %s", update.update_id, update.client_id, exc)
            staleness = self.version - update.base_version
            await self._reject(
                exc, client_id=update.client_id, size=size, update=update, staleness=staleness
            )
            return
        with self.merge_seconds.labels(self.config.federation).time():
            result = await self._merge(update, checked)
        result = self._presums.merged(update, result)  # a pre-sum's merge is its devices'
        self._apply_merge(result)
        perturbations = self._next_perturbations(update, perturbations_per_step(update))
        await self._accept(
            update,
            staleness=checked.staleness,
            perturbations=perturbations,
            merged=result,
            size=size,
        )

    async def _merge(self, update: Update, checked: KdContribution | CheckedDelta) -> MergeResult:
        """Hand a checked update to what merges it: the strategy, or the KD handler for logits."""
        if isinstance(checked, CheckedDelta):
            return self._strategy.submit(
                current=self.current,
                base=checked.base,
                delta=ops.scale(checked.delta.delta, self._lr_factor()),
                staleness=checked.staleness,
                num_samples=update.num_samples,
                update_id=update.update_id,
            )
        assert self._kd is not None  # only the KD handler makes contributions
        return await asyncio.to_thread(self._kd.submit, checked, current=self.current)

    def _apply_merge(self, result: MergeResult) -> None:
        """Count what a merge took in and advance to its new global, if it made one."""
        if result.new_global is None:
            return
        for merged_id in result.merged_update_ids:
            self.results.merges[merged_id] = self.results.merges.get(merged_id, 0) + 1
        self._merged_count += len(result.merged_update_ids)
        self._advance(result.new_global)

    async def _accept(
        self,
        update: Update,
        *,
        staleness: int,
        perturbations: int | None,
        merged: MergeResult,
        size: int,
    ) -> None:
        """Record an accepted update; its ack and audit line wait for the checkpoint."""
        ack = Ack(
            update_id=update.update_id,
            client_id=update.client_id,
            accepted=True,
            version=self.version,
            staleness=staleness,
            perturbations=perturbations,
        )
        self._record(update, size, staleness, ack)
        merge = None
        if merged.new_global is not None:
            merge = MergeEntry(version=self.version, update_ids=merged.merged_update_ids)
        entry = UpdateEntry.from_ack(
            ack, decision="accepted", base_version=update.base_version, size=size
        )
        self._ledger.hold(ack, entry, merge=merge)
        for part_ack, part_entry in self._presums.answers(update, version=self.version):
            self._answered[part_ack.update_id] = part_ack
            self._ledger.hold(part_ack, part_entry)
        if self._ledger.due():
            await self._commit()

    async def _answer_repeat(self, update: Update, previous: Ack, size: int) -> None:
        """Answer an update id seen before with the same answer; it is never merged twice."""
        if self._ledger.holds(update.update_id):
            return  # accepted; its ack goes out with the commit that makes it durable
        if previous.client_id != update.client_id:
            log.warning("update id %s reused by %s", update.update_id, update.client_id)
            reused = UpdateRejected(
                "duplicate", "this update_id was already used by another client"
            )
            await self._reject(reused, client_id=update.client_id, size=size, update=update)
            return
        log.info("duplicate update %s from %s: acked again", update.update_id, update.client_id)
        ack = previous.model_copy(update={"duplicate": True})
        entry = UpdateEntry.from_ack(
            ack, decision="duplicate", base_version=update.base_version, size=size
        )
        await self._send_now(ack, entry)

    async def _refuse_presum(self, update: Update, taken: tuple[str, ...], size: int) -> None:
        """Refuse a pre-sum holding device updates taken before; re-ack their devices."""
        for update_id in taken:
            if not self._ledger.holds(update_id):  # else its ack goes out with the commit
                await self._acks.send(
                    self._answered[update_id].model_copy(update={"duplicate": True})
                )
        detail = f"{len(taken)} of its device updates were merged before: send the rest"
        refusal = UpdateRejected("duplicate", detail)
        await self._reject(refusal, client_id=update.client_id, size=size, update=update,
                           merged_before=taken)  # fmt: skip

    async def _reject(
        self,
        rejection: UpdateRejected,
        *,
        client_id: str,
        size: int,
        update: Update | None = None,
        staleness: int | None = None,
        merged_before: tuple[str, ...] = (),
    ) -> None:
        """Count a refused message, then audit and send its nack at once (it changes no state).

        ``update`` is None for a message too broken to carry one. With a ``staleness`` the
        update was examined: its nack also goes into the results and answers its repeats.
        Without one (an id another client used) the first answer stands.
        """
        self._rejected_count += 1
        self._rejections[rejection.reason] += 1
        ack = Ack(
            update_id="unreadable" if update is None else update.update_id,
            client_id=client_id,
            accepted=False,
            reason=rejection.reason,
            detail=rejection.detail,
            version=self.version,
            staleness=staleness,
            merged_before=merged_before,
        )
        if update is not None and staleness is not None:
            self._record(update, size, staleness, ack)
        base_version = None if update is None else update.base_version
        entry = UpdateEntry.from_ack(ack, decision="rejected", base_version=base_version, size=size)
        if update is None:  # the nack's placeholder id is no update's
            entry = entry.model_copy(update={"update_id": None})
            record = UpdateRecord.unreadable(ack, size=size, time_s=self.elapsed_s())
            self.results.add_update(record)
        await self._send_now(ack, entry)

    async def _send_now(self, ack: Ack, entry: UpdateEntry) -> None:
        """Audit an answer and send it without waiting for a checkpoint."""
        self._ledger.record(entry)
        await self._acks.send(ack)

    async def _commit(self) -> None:
        """Checkpoint what is held, then send its acks, then publish a new version if any."""
        for ack in await self._ledger.commit(self._checkpoint):
            await self._acks.send(ack)
        if self.published_version < self.version:
            await self._publish_version()

    async def _commit_held_later(self) -> None:
        """Commit held acks of buffered updates once they waited ``checkpoint_max_delay_s``."""
        while True:
            await self._ledger.held_event.wait()
            await asyncio.sleep(self.config.checkpoint_max_delay_s)
            async with self._lock:
                if self._ledger.held:
                    await self._commit()

    def _checkpoint(self, commit: int, audit: tuple[UpdateEntry | MergeEntry, ...]) -> Checkpoint:
        counters = {"merged": self._merged_count, "rejected": self._rejected_count}
        counters |= {f"rejected.{reason}": n for reason, n in self._rejections.items()}
        return Checkpoint(
            commit=commit,
            federation=self.config.federation,
            task_id=self.config.task_id,
            version=self.version,
            globals=dict(self._globals),
            states={key: part.state_dict() for key, part in self._stateful.items()},
            answered=self._ledger.window(self.version - self.config.max_staleness),
            audit=audit,
            counters=counters,
            published_chunks=dict(self._publisher.chunks),
            run_id=self.run_id,
        )

    def _resume(self, initial: Callable[[], TensorMap]) -> None:
        """Continue from the latest checkpoint when there is one, else start at version 0.

        Raises:
            ConfigError: The checkpoint does not fit this model, strategy or registered state.
        """
        fed, task_id = self.config.federation, self.config.task_id
        checkpoint = self._ledger.resume(federation=fed, task_id=task_id)
        if checkpoint is None:  # a new run: what earlier runs left on the broker loses to it
            self.run_id = new_run_id()
            self._globals[0] = initial()
            self._ledger.recover_audit(())
            return
        self.run_id = checkpoint.run_id
        for version, adapter in checkpoint.globals.items():
            if {name: tuple(t.shape) for name, t in adapter.items()} != self._shapes:
                raise ConfigError(f"checkpointed global {version} does not fit the model's adapter")
        unknown = sorted(set(checkpoint.states) - set(self._stateful))
        if unknown:
            raise ConfigError(f"the checkpoint holds state of {unknown}, which nothing registered")
        for key, state in checkpoint.states.items():
            self._stateful[key].load_state_dict(state)
        self.version = checkpoint.version
        self._globals = OrderedDict(sorted(checkpoint.globals.items()))
        self._publisher.chunks = dict(checkpoint.published_chunks)
        counters = checkpoint.counters
        self._merged_count = counters.get("merged", 0)
        self._rejected_count = counters.get("rejected", 0)
        self._rejections = Counter(
            {key.removeprefix("rejected."): n for key, n in counters.items() if "." in key}
        )
        self._answered = answers_to_keep(
            self._ledger.recover_audit(checkpoint.audit), _ANSWERED_IDS_KEPT
        )
        for entry in checkpoint.answered:
            if entry.update_id is not None:
                self._answered[entry.update_id] = entry.to_ack()
        log.info("resumed %s at version %d", fed, self.version)

    def _next_perturbations(self, update: Update, used: int | None) -> int | None:
        """Fold a forward-gradient update's variance in; the K to ask its sender for next."""
        controller = self._perturbations
        if controller is None or update.method != "fwdgrad":
            return None
        controller.observe(update.variance, used or controller.for_client(update.client_id))
        return controller.for_client(update.client_id)

    def _advance(self, new_global: TensorMap) -> None:
        self.version += 1
        self._globals[self.version] = new_global
        while len(self._globals) > self.config.max_staleness + 1:
            self._globals.popitem(last=False)
        if self._kd is not None:
            self._kd.forget_before(self.version)

    async def wait_for_version(self, version: int) -> None:
        """Return once a global of at least ``version`` is published (retained)."""
        while self.published_version < version:
            await self._published.wait()

    def _record(self, update: Update, size: int, staleness: int, ack: Ack) -> None:
        record = UpdateRecord.answered(
            update, ack, size=size, staleness=staleness, time_s=self.elapsed_s()
        )
        self.results.add_update(record)
        self._answered[update.update_id] = ack
        while len(self._answered) > _ANSWERED_IDS_KEPT:
            self._answered.popitem(last=False)

    async def _nack_unreadable(
        self, client_id: str, reason: RejectReason, detail: str, *, size: int = 0
    ) -> None:
        log.warning("rejected unreadable update from %s: %s", client_id, detail)
        await self._reject(UpdateRejected(reason, detail), client_id=client_id, size=size)
