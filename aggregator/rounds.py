"""Synchronous FedAvg rounds on the aggregator: device selection and a round deadline.

A round is one global version. When it opens, ``clients_per_round`` devices are drawn from
the roster with the run's seed (FedAvg's client sampling) and named in the task, so only
they train on it. The strategy is FedBuff with a buffer of that many and max staleness 0:
the round closes when every selected device answered or, with a deadline, once
``deadline_s`` has passed since it opened, with whoever arrived by then (at least one: an
empty round stays open until its first update). An update of a closed round is stale and
refused as such; one from a device that was not selected is refused as ``not_selected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from aggregator.audit import MergeEntry
from aggregator.config import AggregatorConfig
from aggregator.results import Results
from aggregator.service import AggregatorService
from aggregator.strategies.base import MergeResult
from edgefed.transport.base import Transport
from schemas.errors import ConfigError, UpdateRejected
from schemas.messages import Task, TensorMap, Update

log = logging.getLogger(__name__)

Closed = Literal["full", "deadline"]
"""Why a round closed: every selected device answered, or its deadline passed."""


@runtime_checkable
class Flushable(Protocol):
    """A strategy that can apply a partial buffer (FedBuff, SplitFed and PrivateFedBuff)."""

    def flush(self, *, current: TensorMap) -> MergeResult:
        """Apply what is buffered now."""
        ...


@dataclass(frozen=True)
class RoundPlan:
    """Who may take part and how rounds are cut.

    Attributes:
        clients: The roster selection draws from.
        per_round: Devices selected per round (None: all of them).
        deadline_s: Seconds after a round opens that it closes with whoever arrived
            (None: it waits for every selected device).
        seed: The run's seed; round ``v`` draws with ``seed`` and ``v``.
    """

    clients: tuple[str, ...]
    per_round: int | None = None
    deadline_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse an empty roster, a round size outside it, a non-positive deadline.

        Raises:
            ConfigError: With the reason.
        """
        if not self.clients or len(set(self.clients)) != len(self.clients):
            raise ConfigError("synchronous rounds need a roster of distinct client ids")
        if self.per_round is not None and not 1 <= self.per_round <= len(self.clients):
            raise ConfigError(
                f"clients_per_round must be 1..{len(self.clients)} (the fleet), "
                f"got {self.per_round}"
            )
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ConfigError(f"round_deadline_s must be > 0, got {self.deadline_s}")

    @classmethod
    def of(cls, config: AggregatorConfig) -> RoundPlan:
        """The rounds ``config``'s ``[sync]`` table asks for, drawn with its seed.

        Raises:
            ConfigError: ``config`` has no ``[sync]`` table.
        """
        if config.sync is None:
            raise ConfigError("synchronous rounds need a [sync] table")
        sync = config.sync
        return cls(
            clients=sync.clients,
            per_round=sync.clients_per_round,
            deadline_s=sync.round_deadline_s,
            seed=config.seed,
        )

    @property
    def size(self) -> int:
        """Devices per round."""
        return self.per_round or len(self.clients)

    def selected(self, version: int) -> tuple[str, ...]:
        """The devices picked for round ``version``, sorted; the same for the same seed."""
        if self.size == len(self.clients):
            return tuple(sorted(self.clients))
        draw = random.Random(self.seed * 1_000_003 + version)
        return tuple(sorted(draw.sample(sorted(self.clients), self.size)))


@dataclass
class RoundRecord:
    """One round in the results: who was picked, when it opened and closed, and why.

    Times are seconds since the aggregator started, like its version records.
    """

    version: int
    selected: tuple[str, ...]
    opened_s: float
    closed_s: float | None = None
    closed: Closed | None = None


class SyncRoundService(AggregatorService):
    """The aggregator running FedAvg rounds under a :class:`RoundPlan`."""

    def __init__(self, config: AggregatorConfig, transport: Transport, *, plan: RoundPlan) -> None:
        """Serve ``config`` (FedBuff, buffer = ``plan.size``, max staleness 0) in rounds.

        Raises:
            ConfigError: ``config`` is not set up as rounds of ``plan``'s size.
        """
        strategy = config.strategy
        if strategy.name != "fedbuff" or strategy.buffer_size != plan.size:
            raise ConfigError(f"rounds of {plan.size} need fedbuff with buffer_size {plan.size}")
        if config.max_staleness != 0:
            raise ConfigError("synchronous rounds need max_staleness 0 (late updates are stale)")
        super().__init__(config, transport)
        if plan.deadline_s is not None and not isinstance(self._strategy, Flushable):
            raise ConfigError(f"{self._strategy!r} cannot close a round at its deadline")
        self.plan = plan
        self.rounds: list[RoundRecord] = []
        self.results.rounds = self.rounds  # the same list: written with the results
        self._contributed: set[str] = set()
        """Devices whose update the open round has taken."""
        self._overdue = False
        self._timer: asyncio.Task[None] | None = None

    @property
    def selection(self) -> tuple[str, ...]:
        """The devices of the open round."""
        return self.plan.selected(self.version)

    async def run(self) -> Results:
        """Serve rounds until ``max_versions``; the deadline timer stops with it."""
        try:
            return await super().run()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._timer

    def _task(self) -> Task:
        """The task naming this round's devices: what tells a device it trains in rounds."""
        return super()._task().model_copy(update={"round_clients": self.selection})

    async def _publish_version(self) -> None:
        """Open the round of the new version once its global is out and scored.

        The deadline counts from then: scoring the global is the aggregator's time, not
        the devices'.
        """
        now = round(time.monotonic() - self._started, 4)
        if self.rounds and self.rounds[-1].closed is None:
            self.rounds[-1].closed, self.rounds[-1].closed_s = "full", now
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        await super()._publish_version()
        opened = round(time.monotonic() - self._started, 4)
        self.rounds.append(
            RoundRecord(version=self.version, selected=self.selection, opened_s=opened)
        )
        self._overdue = False
        self._contributed.clear()
        if self.plan.deadline_s is not None:
            self._timer = asyncio.create_task(
                self._deadline(self.version, self.plan.deadline_s), name="round-deadline"
            )

    async def _handle_update(self, update: Update, size: int) -> None:
        """Take one update per picked device per round; an overdue round closes on arrival."""
        if update.base_version == self.version and update.update_id not in self._answered:
            client, version = update.client_id, self.version
            if client not in self.selection:
                detail = f"{client} was not selected for round {version}"
                await self._refuse_unselected(update, size, detail)
                return
            if client in self._contributed:
                detail = f"{client} answered round {version} already: one update per round"
                await self._refuse_unselected(update, size, detail)
                return
        before = self.version
        await super()._handle_update(update, size)
        ack = self._answered.get(update.update_id)
        if self.version == before and ack is not None and ack.accepted:
            self._contributed.add(update.client_id)
        if self._overdue and self.version == before and self._strategy.pending:
            await self._close_round()

    async def _refuse_unselected(self, update: Update, size: int, detail: str) -> None:
        log.warning("refused update %s: %s", update.update_id, detail)
        unselected = UpdateRejected("not_selected", detail)
        await self._reject(
            unselected, client_id=update.client_id, size=size, update=update, staleness=0
        )

    async def _deadline(self, version: int, seconds: float) -> None:
        await asyncio.sleep(seconds)
        async with self._lock:
            if self.version != version or self._finished():
                return
            if self._strategy.pending:
                await self._close_round()
            else:
                self._overdue = True  # the first update to arrive closes it
        await self._acks.flush()

    async def _close_round(self) -> None:
        """Merge whoever arrived into the next version and publish it (under the lock)."""
        strategy = self._strategy
        if not isinstance(strategy, Flushable):  # ``use_strategy`` swapped it since
            log.error("strategy %s cannot close a partial round", strategy.name)
            return
        result = strategy.flush(current=self.current)
        if result.new_global is None:
            return
        self.rounds[-1].closed = "deadline"
        self.rounds[-1].closed_s = round(time.monotonic() - self._started, 4)
        log.info(
            "round %d closed at its deadline with %d of %d devices",
            self.version,
            len(result.merged_update_ids),
            self.plan.size,
        )
        self._apply_merge(result)
        self._ledger.merged(MergeEntry(version=self.version, update_ids=result.merged_update_ids))
        await self._commit()


def service_for(config: AggregatorConfig, transport: Transport) -> AggregatorService:
    """The aggregator ``config`` asks for: FedAvg rounds with ``[sync]``, else asynchronous."""
    if config.sync is None:
        return AggregatorService(config, transport)
    return SyncRoundService(config, transport, plan=RoundPlan.of(config))
