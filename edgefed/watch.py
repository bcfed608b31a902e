"""One federation as the broker shows it: the task, the latest metrics, every device's status.

``edgefed status`` reads the retained messages (and, with ``--watch``, what follows) through
the same transport as every participant, so it needs no access to the aggregator's host:
an operator's laptop with the broker's URL and a login that may read the federation will do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel, ConfigDict
from rich.table import Table

from edgefed.transport.base import Transport
from edgefed.transport.frames import Delivery
from schemas import topics
from schemas.errors import TopicError
from schemas.messages import Metrics, Status, Task

QUIET_S: Final = 1.0
"""Retained messages come right after subscribing: this long without one more, all have."""
MOST_S: Final = 5.0
"""A busy federation is never quiet for long: read at most this long at a time."""


class DeviceView(BaseModel):
    """One device, from its latest status."""

    model_config = ConfigDict(frozen=True)

    client_id: str
    state: str
    method: str | None
    plan: dict[str, Any] | None
    memory_budget_mb: float | None
    peak_mb: float | None
    base_version: int | None
    staleness: int | None
    """Versions between the global its last update started from and the current one."""
    updates_sent: int
    accepted: int
    rejected: int
    seen_s_ago: float


class FederationView(BaseModel):
    """What ``edgefed status`` shows (and prints as JSON with ``--json``)."""

    model_config = ConfigDict(frozen=True)

    federation: str
    run_id: str | None
    version: int | None
    method: str | None
    metrics: dict[str, Any] | None
    devices: tuple[DeviceView, ...]


class FederationWatch:
    """Keeps the latest task, metrics and statuses of one federation as they arrive."""

    def __init__(self, federation: str, clock: Callable[[], float] = time.time) -> None:
        """Watch ``federation``; ``clock`` gives the wall time statuses are aged against."""
        self.federation = federation
        self._clock = clock
        self.task: Task | None = None
        self.metrics: Metrics | None = None
        self.statuses: dict[str, Status] = {}

    async def subscribe(self, transport: Transport) -> None:
        """Subscribe to the task, metrics and statuses (the retained ones arrive now)."""
        fed = self.federation
        for topic_filter in (topics.task(fed), topics.metrics(fed), topics.status_filter(fed)):
            await transport.subscribe(topic_filter)

    def take(self, delivery: object) -> bool:
        """Keep what ``delivery`` brings; whether it was news of this federation."""
        if not isinstance(delivery, Delivery):
            return False
        try:
            parsed = topics.parse(delivery.topic)
        except TopicError:
            return False
        if parsed.federation != self.federation:
            return False
        message = delivery.message
        if isinstance(message, Task) and parsed.kind == "task":
            self.task = message
        elif isinstance(message, Metrics) and parsed.kind == "metrics":
            self.metrics = message
        elif isinstance(message, Status) and parsed.client_id is not None:
            self.statuses[parsed.client_id] = message
        else:
            return False
        return True

    async def follow(
        self, transport: Transport, quiet_s: float = QUIET_S, most_s: float = MOST_S
    ) -> None:
        """Take deliveries until none came for ``quiet_s`` seconds, or ``most_s`` have passed."""
        deliveries = aiter(transport.deliveries())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(most_s):
                while True:
                    try:
                        async with asyncio.timeout(quiet_s):
                            self.take(await anext(deliveries))
                    except (TimeoutError, StopAsyncIteration):
                        return

    def view(self) -> FederationView:
        """The federation now."""
        version = (
            self.metrics.version if self.metrics else (self.task.version if self.task else None)
        )
        devices = tuple(
            self._device(status, version) for _, status in sorted(self.statuses.items())
        )
        return FederationView(
            federation=self.federation,
            run_id=self.task.run_id if self.task else None,
            version=version,
            method=self.task.method if self.task else None,
            metrics=self.metrics.model_dump(mode="json") if self.metrics else None,
            devices=devices,
        )

    def _device(self, status: Status, version: int | None) -> DeviceView:
        plan = status.plan or {}
        method = status.method or (str(plan["method"]) if "method" in plan else None)
        budget = status.profile.memory_budget_mb or _number(plan.get("budget_mb"))
        stale = None
        if version is not None and status.base_version is not None:
            stale = max(0, version - status.base_version)
        return DeviceView(
            client_id=status.client_id,
            state=status.state,
            method=method,
            plan=status.plan,
            memory_budget_mb=budget,
            peak_mb=_number(plan.get("measured_mb")),
            base_version=status.base_version,
            staleness=stale,
            updates_sent=status.updates_sent,
            accepted=status.accepted,
            rejected=status.rejected,
            seen_s_ago=round(max(0.0, self._clock() - status.heartbeat_at), 1),
        )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def render(view: FederationView) -> Table:
    """One screen of the federation: a caption with the run and evaluation, a row per device."""
    metrics = view.metrics or {}
    loss, accuracy = metrics.get("eval_loss"), metrics.get("eval_accuracy")
    caption = (
        f"run {view.run_id or '-'} · version {_text(view.version)} · method {view.method or '-'} · "
        f"eval loss {_text(loss, '.4f')} · accuracy {_text(accuracy, '.3f')} · "
        f"merged {metrics.get('merged_updates', 0)} · rejected {metrics.get('rejected_updates', 0)}"
    )
    table = Table(title=f"federation {view.federation}", caption=caption)
    for column in ("device", "state", "method", "budget MiB", "peak MiB", "base", "stale",
                   "sent", "accepted", "rejected", "seen"):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("device", "state", "method") else "right"
        )
    for device in view.devices:
        table.add_row(
            device.client_id, device.state, device.method or "-",
            _text(device.memory_budget_mb, ".0f"), _text(device.peak_mb, ".0f"),
            _text(device.base_version), _text(device.staleness), str(device.updates_sent),
            str(device.accepted), str(device.rejected), f"{device.seen_s_ago:.0f} s ago",
        )  # fmt: skip
    return table


def _text(value: object, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
