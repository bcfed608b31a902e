"""A site aggregator: merges its own devices' updates and sends one update to the root.

Devices behind a site broker (a factory, a campus, a region) talk to the site aggregator as
to any aggregator. The site follows the root's task and globals on the upstream broker and
relays them as they are (signatures included) onto its own broker, so its devices train on
the root's versions. A device update is checked as the root would check it, against the
root's task and the root version the site holds (staleness counts root versions), and goes
to the configured strategy with that global as the current one. Each merge the strategy
completes becomes one site update: its step, the sum of its devices' samples, and an id
kept until the root answers (:mod:`aggregator.uplink`); the root merges it as a device's.

Exactly once at both levels: a device is acked only after a checkpoint holds its update (in
the strategy's buffer, or in the site update made from it), and the site update is published
only after that checkpoint; the root merges a repeated site update id once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path

from aggregator import ops
from aggregator.acks import AckSender
from aggregator.audit import AUDIT_FILE, Decision, MergeEntry, UpdateEntry
from aggregator.checkpoint import Checkpoint, Stateful
from aggregator.config import AggregatorConfig
from aggregator.durability import Ledger, answers_to_keep
from aggregator.fleet import Fleet, Missing
from aggregator.following import RootFollower
from aggregator.parts import until_first_ends
from aggregator.publisher import Publisher
from aggregator.strategies import Strategy
from aggregator.update_checks import CheckedDelta
from aggregator.uplink import Uplink
from edgefed.transport.base import Transport
from edgefed.transport.frames import BadDelivery, Delivery
from schemas import topics
from schemas.errors import ConfigError, RejectReason, TopicError, UpdateRejected
from schemas.messages import Ack, TensorMap, Update

log = logging.getLogger(__name__)

_ANSWERED_IDS_KEPT = 100_000
_WAIT_LOG_S = 10
"""How often a site still waiting for the root's task or global says so (and asks)."""


class SiteAggregator:
    """One site of a federation; ``run`` returns once the root reaches ``max_versions``."""

    def __init__(self, config: AggregatorConfig, *, down: Transport, up: Transport) -> None:
        """Serve devices on ``down`` (the site broker); reach the root through ``up``.

        Raises:
            ConfigError: ``config`` is not a site's.
        """
        if config.role != "site" or not config.site_id:
            raise ConfigError('a site aggregator needs role = "site" and a site_id')
        self.config = config
        fed = config.federation
        self._down, self._up = down, up
        self._strategy: Strategy = config.strategy.build()
        self._relay = Publisher(down, fed, signer=None)
        self._acks = AckSender(down, fed)
        self.fleet = Fleet(down, fed, self._publish_again)
        self.uplink = Uplink(up, fed, config.site_id, resend_after_s=config.site_resend_s)
        self.root = RootFollower(config, up, config.site_id)
        audit = config.audit_log
        if audit is None and config.checkpoint_dir is not None:
            audit = str(Path(config.checkpoint_dir) / AUDIT_FILE)
        self._ledger = Ledger(checkpoint_dir=config.checkpoint_dir, audit_path=audit, every=1)
        self._stateful: dict[str, Stateful] = {
            "strategy": self._strategy,
            "uplink": self.uplink,
            "site": self,
        }
        self._answered: OrderedDict[str, Ack] = OrderedDict()
        self._samples: dict[str, int] = {}
        """Samples of accepted device updates not yet carried by a site update."""
        self.merged = 0
        """Device updates carried by site updates so far."""
        self._lock = asyncio.Lock()
        self.root_ready = asyncio.Event()
        """Set once the root's task and global are held and relayed to the devices."""
        self._started = time.monotonic()

    # -- the run

    async def run(self) -> None:
        """Follow the root, serve the devices, and send site updates, until done."""
        self._resume()
        fed, site_id = self.config.federation, self.uplink.site_id
        await self.root.subscribe()
        await self._up.subscribe(topics.ack(fed, site_id))
        log.info("site %s of %s: following the root's task", site_id, fed)
        try:
            await until_first_ends(self._follow_root(), self._serve_devices(), self._tick())
        finally:
            await self._acks.close()
            self._ledger.close()

    def _finished(self) -> bool:
        """Done at the root's ``max_versions`` with nothing left to send, or at ``max_seconds``."""
        cfg = self.config
        if cfg.max_seconds and time.monotonic() - self._started >= cfg.max_seconds:
            return True
        return 0 < cfg.max_versions <= self.root.version and not self.uplink.pending

    async def _tick(self) -> None:
        """Every second, send what is due and report waiting; return when the run is done.

        New site updates go out at their commit, unanswered ones again when due; while the
        root's task or global is missing, that is logged (and asked for) every 10 s.
        """
        ticks = 0
        while not self._finished():
            await asyncio.sleep(1.0)
            ticks += 1
            async with self._lock:
                if not self.root_ready.is_set() and ticks % _WAIT_LOG_S == 0:
                    await self.root.say_waiting()
                await self.uplink.send_due()

    # -- the root side

    async def _follow_root(self) -> None:
        """Take the root's tasks, globals and answers.

        No timeout around a delivery: cancelling a pending ``anext`` of the stream would
        close it. Waiting is reported by :meth:`_tick`.
        """
        async for delivery in self._up.deliveries():
            if isinstance(delivery, Delivery):
                async with self._lock:
                    await self._from_root(delivery.message)

    async def _from_root(self, message: object) -> None:
        if isinstance(message, Ack):
            self.uplink.answer(message)
        elif await self.root.take(message):  # a new version: relay it to the devices
            await self._publish_again("global")
            await self._publish_again("task")
            await self._relay.clear_before(self.root.version)
            self.root_ready.set()

    async def _publish_again(self, what: Missing) -> None:
        """Relay the held root global or task onto the site broker (retained)."""
        task = self.root.task
        if what == "global" and self.root.global_ is not None:
            await self._relay.publish_global(self.root.global_)
        elif what == "task" and task is not None:
            chunks = self._relay.chunks.get(task.version, task.global_chunks)
            if chunks != task.global_chunks and task.signature is None:
                task = task.model_copy(update={"global_chunks": chunks})
            elif chunks != task.global_chunks:
                log.error(
                    "the site broker cuts globals into %d chunks, the root's signed task "
                    "names %d: give the site the root's max_payload", chunks, task.global_chunks,
                )  # fmt: skip
            await self._relay.publish_task(task)

    # -- the device side

    async def _serve_devices(self) -> None:
        """Answer the devices' updates, asks and statuses once the root's state is here."""
        if not self.root_ready.is_set():
            log.info("site %s: waiting for the root's task and global", self.uplink.site_id)
        await self.root_ready.wait()
        await self._down.subscribe(topics.update_filter(self.config.federation))
        await self.fleet.subscribe()
        log.info("site %s ready at root version %d", self.uplink.site_id, self.root.version)
        async for delivery in self._down.deliveries():  # :meth:`_tick` ends the run
            async with self._lock:
                await self._from_device(delivery)

    async def _from_device(self, delivery: Delivery | BadDelivery) -> None:
        try:
            parsed = topics.parse(delivery.topic)
        except TopicError:
            log.warning("ignoring message on unexpected topic %s", delivery.topic)
            return
        if await self.fleet.handle(parsed, delivery) or parsed.kind != "update":
            return
        client_id = parsed.client_id or "unknown"
        message = delivery.message if isinstance(delivery, Delivery) else None
        if not isinstance(message, Update) or message.client_id != client_id:
            detail = "expected an update whose client_id matches the topic"
            if isinstance(delivery, BadDelivery):
                detail = str(delivery.error)
            reason: RejectReason = "malformed"
            await self._reject(UpdateRejected(reason, detail), client_id, None, delivery.size)
            return
        await self._take(message, delivery.size)

    async def _take(self, update: Update, size: int) -> None:
        """Check, merge and answer one device update: the ack waits for its checkpoint."""
        previous = self._answered.get(update.update_id)
        if previous is not None:
            if not self._ledger.holds(update.update_id) and previous.client_id == update.client_id:
                ack = previous.model_copy(update={"duplicate": True})
                await self._answer(ack, update, "duplicate", size)
            return
        root = self.root
        assert root.checks is not None  # set before devices are served
        try:
            checked = await root.checks.run(update, version=root.version, kept=root.globals)
        except UpdateRejected as exc:
            log.warning("rejected update %s from %s: %s", update.update_id, update.client_id, exc)
            await self._reject(exc, update.client_id, update, size)
            return
        assert isinstance(checked, CheckedDelta)  # a site takes delta methods only
        result = self._strategy.submit(
            current=root.current,
            base=checked.base,
            delta=checked.delta.delta,
            staleness=checked.staleness,
            num_samples=update.num_samples,
            update_id=update.update_id,
        )
        self._samples[update.update_id] = update.num_samples
        merge = None
        if result.new_global is not None:
            merge = self._site_update(result.new_global, result.merged_update_ids)
        ack = Ack(
            update_id=update.update_id, client_id=update.client_id, accepted=True,
            version=root.version, staleness=checked.staleness,
        )  # fmt: skip
        self._answered[update.update_id] = ack
        entry = UpdateEntry.from_ack(
            ack, decision="accepted", base_version=update.base_version, size=size
        )
        self._ledger.hold(ack, entry, merge=merge)
        await self._commit()

    def _site_update(self, merged: TensorMap, update_ids: tuple[str, ...]) -> MergeEntry:
        """Make the site update that carries ``merged``'s step to the root."""
        root = self.root
        assert root.task is not None
        samples = sum(self._samples.pop(update_id, 0) for update_id in update_ids)
        update = self.uplink.make(
            task_id=root.task.task_id,
            run_id=root.run_id,
            method=root.task.method,
            base_version=root.version,
            delta=ops.sub(merged, root.current),
            num_samples=max(samples, 1),
        )
        self.merged += len(update_ids)
        log.info(
            "site update %s: %d device updates, %d samples, on root version %d",
            update.update_id, len(update_ids), samples, root.version,
        )  # fmt: skip
        return MergeEntry(version=root.version, update_ids=update_ids, sent_as=update.update_id)

    async def _commit(self) -> None:
        """Checkpoint, then ack the devices, then send the site updates the commit holds."""
        for ack in await self._ledger.commit(self._checkpoint):
            await self._acks.send(ack)
        await self.uplink.send_due()

    async def _reject(
        self, rejection: UpdateRejected, client_id: str, update: Update | None, size: int
    ) -> None:
        ack = Ack(
            update_id="unreadable" if update is None else update.update_id,
            client_id=client_id,
            accepted=False,
            reason=rejection.reason,
            detail=rejection.detail,
            version=max(self.root.version, 0),
        )
        await self._answer(ack, update, "rejected", size)

    async def _answer(self, ack: Ack, update: Update | None, decision: Decision, size: int) -> None:
        """Audit an answer that changes no state and send it at once."""
        base = None if update is None else update.base_version
        entry = UpdateEntry.from_ack(ack, decision=decision, base_version=base, size=size)
        if update is None:
            entry = entry.model_copy(update={"update_id": None})
        self._ledger.record(entry)
        await self._acks.send(ack)

    # -- durability

    def _checkpoint(self, commit: int, audit: tuple[UpdateEntry | MergeEntry, ...]) -> Checkpoint:
        root = self.root
        return Checkpoint(
            commit=commit,
            federation=self.config.federation,
            task_id=self.config.task_id,
            version=root.version,
            globals=dict(root.globals),
            states={key: part.state_dict() for key, part in self._stateful.items()},
            answered=self._ledger.window(root.version - root.max_staleness),
            audit=audit,
            counters={"merged": self.merged},
            published_chunks=dict(self._relay.chunks),
            run_id=root.run_id,
        )

    def _resume(self) -> None:
        """Continue from the latest checkpoint: held globals, buffer, unsent site updates."""
        checkpoint = self._ledger.resume(
            federation=self.config.federation, task_id=self.config.task_id
        )
        entries = self._ledger.recover_audit(() if checkpoint is None else checkpoint.audit)
        if checkpoint is None:
            return
        for key, state in checkpoint.states.items():
            if key not in self._stateful:
                raise ConfigError(f"the site checkpoint holds state of {key!r}, not a site's")
            self._stateful[key].load_state_dict(state)
        self.root.restore(checkpoint.version, checkpoint.run_id, dict(checkpoint.globals))
        self._relay.chunks = dict(checkpoint.published_chunks)
        self.merged = checkpoint.counters.get("merged", 0)
        self._answered = answers_to_keep(entries, _ANSWERED_IDS_KEPT)
        for entry in checkpoint.answered:
            if entry.update_id is not None:
                self._answered[entry.update_id] = entry.to_ack()
        log.info(
            "site %s resumed at root version %d, %d site updates to send",
            self.uplink.site_id, self.root.version, len(self.uplink.pending),
        )  # fmt: skip

    def state_dict(self) -> dict[str, object]:
        """Samples of the buffered device updates (the strategy keeps their deltas)."""
        return {"samples": dict(self._samples)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output."""
        samples = state.get("samples", {})
        if not isinstance(samples, dict):
            raise ConfigError("the site checkpoint's samples are not a mapping")
        self._samples = {str(key): int(value) for key, value in samples.items()}
