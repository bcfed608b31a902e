"""The device process: follow the task, train on local data, publish updates, obey acks.

One receive task keeps the latest task and global adapter and resolves acks; the
training loop runs each fit in a worker thread (``asyncio.to_thread``) so the
MQTT connection keeps breathing while torch works.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.config import AgentConfig
from edge_agent.trainers import Trainer, make_trainer
from edgefed.data import TokenDataset, load_data
from edgefed.modeling import attach_lora, build_model
from edgefed.transport import BadDelivery, MqttTransport, Transport, TransportConfig, Will
from schemas import topics
from schemas.errors import TransportError
from schemas.messages import Ack, AgentState, GlobalModel, Status, Task, Update

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AgentReport:
    """What one agent did, for logs, tests and the simulator."""

    client_id: str
    updates_sent: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    resends: int = 0
    last_version: int | None = None
    first_base_version: int | None = None


class EdgeAgent:
    """One device taking part in one federation."""

    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        *,
        data: TokenDataset | None = None,
        report: AgentReport | None = None,
    ) -> None:
        self.config = config
        self._transport = transport
        self._data = data
        self._task: Task | None = None
        self._global: GlobalModel | None = None
        self._news = asyncio.Event()
        self._pending: dict[str, asyncio.Future[Ack]] = {}
        self.report = report or AgentReport(client_id=config.client_id)
        """Filled in while running, so a caller holding it sees progress even after a cancel."""

    @staticmethod
    def will(config: AgentConfig) -> Will:
        """The last will the broker publishes if this device vanishes."""
        status = Status(client_id=config.client_id, state="offline", profile=config.profile)
        return Will(topic=topics.status(config.federation, config.client_id), message=status)

    async def run(self) -> AgentReport:
        """Take part until ``max_updates`` updates are answered (or forever)."""
        fed, me = self.config.federation, self.config.client_id
        for topic_filter in (topics.task(fed), topics.global_filter(fed), topics.ack(fed, me)):
            await self._transport.subscribe(topic_filter)
        await self._announce("waiting")
        async with asyncio.TaskGroup() as group:
            receiver = group.create_task(self._receive(), name=f"agent-{me}-receive")
            try:
                await self._train_loop()
            finally:
                receiver.cancel()
        await self._announce("offline")
        return self.report

    async def _announce(self, state: AgentState) -> None:
        status = Status(
            client_id=self.config.client_id,
            state=state,
            profile=self.config.profile,
            base_version=self._global.version if self._global else None,
            updates_sent=self.report.updates_sent,
        )
        topic = topics.status(self.config.federation, self.config.client_id)
        await self._transport.publish(topic, status, retain=True)

    async def _receive(self) -> None:
        async for delivery in self._transport.deliveries():
            if isinstance(delivery, BadDelivery):
                log.warning(
                    "%s: unreadable message on %s: %s",
                    self.config.client_id,
                    delivery.topic,
                    delivery.error,
                )
                continue
            message = delivery.message
            if isinstance(message, Task):
                self._task = message
                self._news.set()
            elif isinstance(message, GlobalModel):
                if self._global is None or message.version > self._global.version:
                    self._global = message
                    self._news.set()
            elif isinstance(message, Ack):
                waiter = self._pending.get(message.update_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
                elif not message.accepted:
                    log.warning(
                        "%s: nack %s: %s", self.config.client_id, message.reason, message.detail
                    )

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Wait until the receive task brings news and ``ready()`` holds."""
        while not ready():
            self._news.clear()
            await self._news.wait()

    async def _wait_for_version(self, version: int) -> None:
        await self._wait_for(lambda: self._global is not None and self._global.version >= version)

    async def _train_loop(self) -> None:
        await self._wait_for(
            lambda: (
                self._task is not None
                and self._global is not None
                and self._global.task_id == self._task.task_id
            )
        )
        assert self._task is not None
        task = self._task
        trainer = await asyncio.to_thread(self._build_trainer, task)
        data = self._data or load_data(self.config.data, seq_len=task.train.seq_len)
        round_index = 0
        while not 0 < self.config.max_updates <= self.report.updates_sent:
            start = self._global
            assert start is not None
            await self._announce("training")
            fit = await asyncio.to_thread(
                trainer.fit,
                start.tensors,
                data,
                task.train,
                seed=self.config.seed * 1_000_003 + round_index,
            )
            round_index += 1
            if self.config.slowdown > 1:
                await asyncio.sleep((self.config.slowdown - 1) * fit.compute_s)
            update = Update(
                client_id=self.config.client_id,
                task_id=task.task_id,
                base_version=start.version,
                num_samples=fit.num_samples,
                method=task.method,
                delta=fit.delta,
                train_loss=fit.train_loss,
                compute_s=fit.compute_s,
            )
            ack = await self._deliver(update)
            self.report.updates_sent += 1
            if self.report.first_base_version is None:
                self.report.first_base_version = start.version
            self.report.last_version = ack.version
            if ack.accepted:
                self.report.accepted += 1
                continue
            self.report.rejected[ack.reason or "unknown"] += 1
            log.info(
                "%s: update rejected (%s: %s); refetching the global",
                self.config.client_id,
                ack.reason,
                ack.detail,
            )
            if ack.reason in ("stale", "future_version"):
                await self._wait_for_version(ack.version)

    def _build_trainer(self, task: Task) -> Trainer:
        model = attach_lora(build_model(task.model, seed=task.seed), task.lora)
        return make_trainer(task.method, model, **self.config.trainer)

    async def _deliver(self, update: Update) -> Ack:
        """Publish ``update`` until it is answered; re-sends keep the same update_id."""
        topic = topics.update(self.config.federation, self.config.client_id)
        waiter: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending[update.update_id] = waiter
        try:
            for attempt in range(self.config.max_resends + 1):
                if attempt:
                    self.report.resends += 1
                    log.warning(
                        "%s: no ack for %s, re-sending", self.config.client_id, update.update_id
                    )
                await self._transport.publish(topic, update)
                try:
                    async with asyncio.timeout(self.config.ack_timeout_s):
                        return await asyncio.shield(waiter)
                except TimeoutError:
                    continue
            raise TransportError(f"update {update.update_id} was never answered")
        finally:
            del self._pending[update.update_id]


async def run_agent(
    config: AgentConfig,
    *,
    url: str,
    data: TokenDataset | None = None,
    report: AgentReport | None = None,
) -> AgentReport:
    """Connect to the broker at ``url`` and run one agent until it is done."""
    transport_config = TransportConfig(
        url=url,
        client_id=f"edgefed-{config.federation}-{config.client_id}",
        will=EdgeAgent.will(config),
        max_payload=config.max_payload,
    )
    async with MqttTransport(transport_config) as transport:
        return await EdgeAgent(config, transport, data=data, report=report).run()
