"""An intake replica: one of several processes that take a federation's device updates in.

One aggregator event loop spends a few milliseconds of CPU on each 1 MiB update (frames,
reassembly, decoding, checks), so with enough devices its intake is the limit. Replicas
share the devices' update topics through an MQTT shared subscription
(``$share/<intake_group>/edgefed/<fed>/update/+``): the broker hands each update to one of
them. A replica checks it as the merger would, against the root's task and latest global
(:class:`~aggregator.following.RootFollower`), and sums up to ``presum_size`` checked updates
into one pre-sum, the mean weighted by samples and staleness as FedBuff weighs them (robust
reductions and the merge step are the merger's), sent to the merger on ``intake/<replica>``.

The merger merges a pre-sum as one update and answers each device in it itself, after the
checkpoint that holds it, so a replica keeps nothing that must survive it: a replica that
dies loses only unacked work, which its devices send again. A device that sends an update
again may reach another replica; the merger refuses a pre-sum naming a device update it has
already taken (``duplicate``, the ids in ``Ack.merged_before``), and the replica sends the
rest as a new pre-sum. So every acked update is merged once, whichever replica took it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from aggregator import ops
from aggregator.acks import AckSender
from aggregator.config import AggregatorConfig
from aggregator.following import RootFollower
from aggregator.parts import until_first_ends
from aggregator.staleness import StalenessRule
from aggregator.strategies.fedbuff import FedBuff
from aggregator.update_checks import CheckedDelta
from edgefed.transport.base import Transport
from edgefed.transport.frames import BadDelivery, Delivery
from schemas import topics
from schemas.errors import ConfigError, TopicError, TransportError, UpdateRejected
from schemas.messages import Ack, Part, TensorMap, Update

log = logging.getLogger(__name__)

_TICK_S = 0.1
_WAIT_LOG_TICKS = 100
"""Ticks between two reports of what a replica still waits for (10 s)."""


@dataclass(frozen=True)
class _Taken:
    """A checked device update, kept until the merger has answered the pre-sum holding it."""

    part: Part
    delta: TensorMap
    base: TensorMap


@dataclass
class _Presum:
    update: Update
    taken: list[_Taken]
    sent_at: float = 0.0


class IntakeReplica:
    """Checks its share of device updates and sends them to the merger as pre-sums."""

    def __init__(self, config: AggregatorConfig, transport: Transport) -> None:
        """Take updates of ``config.federation`` through ``transport`` as ``config.site_id``.

        Raises:
            ConfigError: ``config`` is not an intake replica's.
        """
        if config.role != "intake" or not config.site_id:
            raise ConfigError('an intake replica needs role = "intake" and a site_id')
        self.config = config
        self.replica_id = config.site_id
        self._transport = transport
        self.root = RootFollower(config, transport, config.site_id)
        self._acks = AckSender(transport, config.federation)
        self._rule = _fedbuff_rule(config)
        """FedBuff's staleness discount: a pre-sum weighs its updates as FedBuff would."""
        self._waiting: list[_Taken] = []
        self._waiting_since = 0.0
        self._pending: OrderedDict[str, _Presum] = OrderedDict()
        self._held: set[str] = set()
        """Device update ids waiting or in a pending pre-sum: a repeat of one is ignored."""
        self.taken = 0
        """Device updates this replica checked and passed on."""
        self.merged = 0
        """Device updates in pre-sums the merger accepted."""
        self._started = time.monotonic()

    async def run(self) -> None:
        """Take updates until the root reaches ``max_versions`` and nothing is left to send."""
        fed = self.config.federation
        await self.root.subscribe()
        await self._transport.subscribe(topics.ack(fed, self.replica_id))
        try:
            await until_first_ends(self._receive_all(), self._tick())
        finally:
            await self._acks.close()

    async def _receive_all(self) -> None:
        """Handle deliveries as they come (never under a timeout: that would close the stream)."""
        async for delivery in self._transport.deliveries():
            await self._receive(delivery)

    def _finished(self) -> bool:
        cfg = self.config
        if cfg.max_seconds and time.monotonic() - self._started >= cfg.max_seconds:
            return True
        idle = not self._pending and not self._waiting
        return 0 < cfg.max_versions <= self.root.version and idle

    async def _receive(self, delivery: Delivery | BadDelivery) -> None:
        try:
            parsed = topics.parse(delivery.topic)
        except TopicError:
            log.warning("ignoring message on unexpected topic %s", delivery.topic)
            return
        message = delivery.message if isinstance(delivery, Delivery) else None
        if parsed.kind == "update" and parsed.client_id is not None:
            await self._take(message, parsed.client_id, delivery)
        elif parsed.kind == "ack" and isinstance(message, Ack):
            await self._answered(message)
        elif await self.root.take(message) and not self._sharing:
            await self._transport.subscribe(
                topics.update_filter(self.config.federation, shared_group=self.config.intake_group)
            )
            self._sharing = True
            log.info(
                "intake %s taking updates at root version %d", self.replica_id, self.root.version
            )

    _sharing = False

    @property
    def taking(self) -> bool:
        """Whether it takes its share of the updates (once the root's task and global came)."""
        return self._sharing

    async def _take(
        self, message: object, client_id: str, delivery: Delivery | BadDelivery
    ) -> None:
        """Check one device update; keep it for the next pre-sum, or answer its refusal."""
        if not isinstance(message, Update) or message.client_id != client_id:
            detail = "expected an update whose client_id matches the topic"
            if isinstance(delivery, BadDelivery):  # chunks split among replicas expire
                detail = f"{delivery.error} (intake replicas take updates in one message)"
            await self._refuse(client_id, "unreadable", UpdateRejected("malformed", detail))
            return
        if message.update_id in self._held:
            return  # a repeat: the merger answers it with the pre-sum that holds it
        root = self.root
        assert root.checks is not None  # updates are subscribed to once it is set
        try:
            checked = await root.checks.run(message, version=root.version, kept=root.globals)
        except UpdateRejected as exc:
            await self._refuse(client_id, message.update_id, exc)
            return
        assert isinstance(checked, CheckedDelta)  # a replica takes delta methods only
        part = Part(
            update_id=message.update_id,
            client_id=client_id,
            base_version=message.base_version,
            num_samples=message.num_samples,
            staleness=checked.staleness,
        )
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting.append(_Taken(part, checked.delta.delta, checked.base))
        self._held.add(part.update_id)
        self.taken += 1
        if len(self._waiting) >= self.config.presum_size:
            await self._send_waiting()

    async def _refuse(self, client_id: str, update_id: str, rejection: UpdateRejected) -> None:
        log.warning("refused update %s from %s: %s", update_id, client_id, rejection)
        await self._acks.send(
            Ack(
                update_id=update_id, client_id=client_id, accepted=False,
                reason=rejection.reason, detail=rejection.detail,
                version=max(self.root.version, 0),
            )
        )  # fmt: skip

    async def _tick(self) -> None:
        """Send and re-send pre-sums when due, report waiting; return when the run is done.

        Pre-sums go out once their first update waited ``presum_delay_s``; unanswered ones go
        again after ``site_resend_s``; while the root's task or global is missing, that is
        logged (and asked for) every 10 s.
        """
        ticks = 0
        while not self._finished():
            await asyncio.sleep(_TICK_S)
            ticks += 1
            if self.root.checks is None and ticks % _WAIT_LOG_TICKS == 0:
                await self.root.say_waiting()
            now = time.monotonic()
            if self._waiting and now - self._waiting_since >= self.config.presum_delay_s:
                await self._send_waiting()
            for presum in list(self._pending.values()):
                if now - presum.sent_at >= self.config.site_resend_s:
                    log.info("pre-sum %s unanswered: sending it again", presum.update.update_id)
                    await self._publish(presum)

    async def _send_waiting(self) -> None:
        taken, self._waiting = self._waiting, []
        await self._send(taken)

    async def _send(self, taken: list[_Taken]) -> None:
        """Sum ``taken`` into one pre-sum on the latest root global and send it."""
        root = self.root
        assert root.task is not None
        parts = [
            item.part.model_copy(update={"staleness": root.version - item.part.base_version})
            for item in taken
        ]
        weights = [self._rule(part.staleness) * part.num_samples for part in parts]
        total = sum(weights)
        delta = ops.scale(taken[0].delta, weights[0] / total)
        for item, weight in zip(taken[1:], weights[1:], strict=True):
            delta = ops.add(delta, item.delta, scale=weight / total)
        update = Update(
            client_id=self.replica_id,
            task_id=root.task.task_id,
            run_id=root.run_id,
            base_version=root.version,
            num_samples=sum(part.num_samples for part in parts),
            method=root.task.method,
            delta=delta,
            parts=tuple(parts),
        )
        presum = _Presum(update, taken)
        self._pending[update.update_id] = presum
        await self._publish(presum)

    async def _publish(self, presum: _Presum) -> None:
        presum.sent_at = time.monotonic()
        topic = topics.intake(self.config.federation, self.replica_id)
        try:
            await self._transport.publish(topic, presum.update)
        except TransportError as exc:
            log.warning(
                "pre-sum %s not published (%s); sent again later", presum.update.update_id, exc
            )

    async def _answered(self, ack: Ack) -> None:
        """The merger's answer to a pre-sum: done, send the rest again, or tell the devices."""
        presum = self._pending.pop(ack.update_id, None)
        if presum is None:
            return
        ids = {item.part.update_id for item in presum.taken}
        if ack.accepted:
            self.merged += len(ids)
            self._held -= ids
            return
        if ack.reason == "duplicate" and ack.merged_before:
            before = set(ack.merged_before)
            self._held -= before
            rest = [item for item in presum.taken if item.part.update_id not in before]
            log.info(
                "pre-sum %s: %d of its updates merged before; sending the rest",
                ack.update_id,
                len(before),
            )
            if rest:
                await self._send(rest)
            return
        self._held -= ids
        rejection = UpdateRejected(ack.reason or "internal", f"merger: {ack.detail}")
        for item in presum.taken:
            await self._refuse(item.part.client_id, item.part.update_id, rejection)


def _fedbuff_rule(config: AggregatorConfig) -> StalenessRule:
    """The staleness discount FedBuff would apply with ``config``'s strategy settings."""
    strategy = config.strategy.model_copy(update={"name": "fedbuff"}).build()
    assert isinstance(strategy, FedBuff)
    return strategy.rule
