"""The device process: follow the task, train on local data, publish updates, obey acks.

One receive task keeps the latest task and global adapter and resolves acks; the training
loop runs each fit in a worker thread so the MQTT connection breathes while torch works.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.answers import answer_or_due, renew_ack_subscription, wait_for_news
from edge_agent.config import AgentConfig
from edge_agent.device import fit_device, resolve_device
from edge_agent.emulation import DeviceEmulation
from edge_agent.fit_stop import stoppable
from edge_agent.outbox import OUTBOX_FILE, Outbox
from edge_agent.planner import CannotFit, DeviceSizer, Plan
from edge_agent.privacy import DevicePrivacy
from edge_agent.report import AgentReport
from edge_agent.split_channel import MqttSplitChannel
from edge_agent.task_model import task_model
from edge_agent.trainers import KdTrainer, SplitTrainer, Trainer, make_trainer
from edge_agent.trainers.base import FitResult
from edgefed.data.loading import load_data
from edgefed.ml.tokens import TokenDataset
from edgefed.security.signing import GlobalVerifier
from edgefed.transport.base import Transport
from edgefed.transport.config import BrokerAddress, Will
from edgefed.transport.frames import BadDelivery
from edgefed.transport.global_topics import GlobalTopics, Wait
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.codec import DEFAULT_MAX_MESSAGE_BYTES as WHOLE_BYTES
from schemas.errors import ConfigError, SignatureError, TransportError
from schemas.messages import (
    Ack,
    AgentState,
    GlobalModel,
    SplitReply,
    Status,
    Task,
    TrainSpec,
    Update,
)

__all__ = ["AgentReport", "EdgeAgent", "run_agent"]

log = logging.getLogger(__name__)
_LEAVE_TIMEOUT_S = 5.0
"""How long a stopping agent waits to say it is offline."""


def _order(message: GlobalModel | Task) -> tuple[str, int]:
    """The newer message sorts higher: a later run (by start time), then a higher version."""
    return message.run_id, message.version


def _back(current: Task, arrived: Task) -> bool:
    """The aggregator started again (a new session), or this agent reconnected (same task)."""
    return arrived.session != current.session or _order(arrived) == _order(current)


class _CpuTimed:
    """Calls a fit and keeps the CPU time of the calling thread it used (contention-free)."""

    def __init__(self, fit: Callable[[], FitResult]) -> None:
        self._fit = fit
        self.cpu_s = 0.0

    def __call__(self) -> FitResult:
        started = time.thread_time()
        try:
            return self._fit()
        finally:
            self.cpu_s = time.thread_time() - started


@dataclass(slots=True)
class _Training:
    """What the training loop carries from one fit to the next."""

    task: Task
    trainer: Trainer
    data: TokenDataset
    plan: Plan | None
    replan: Plan | CannotFit | None
    """The plan to follow from the next fit on; another one after a peak overran the budget."""
    spec: TrainSpec
    round_index: int
    """Fits made by this device, earlier runs included, so no two share a seed."""
    answered_base: tuple[str, int] | None = None
    """(run, version) of the global the last accepted update started from."""


class EdgeAgent:
    """One device taking part in one federation."""

    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        *,
        data: TokenDataset | None = None,
        report: AgentReport | None = None,
        fit_filter: Callable[[FitResult], FitResult] | None = None,
        emulation: DeviceEmulation | None = None,
    ) -> None:
        """Set up; ``fit_filter`` rewrites each fit before it is sent (the simulator's attacks).

        ``emulation`` (the simulator's device profiles) delays fits and transfers and may
        drop a fit.

        Raises:
            ConfigError: a trusted signing key cannot be loaded, or a GPU asked for is missing.
        """
        self.config = config
        self._transport = transport
        self._data = data
        self._fit_filter = fit_filter
        self._emulation = emulation
        self._verifier = (
            GlobalVerifier.from_files(config.trusted_global_keys)
            if config.trusted_global_keys
            else None
        )
        self._privacy = DevicePrivacy(config.privacy) if config.privacy is not None else None
        self._task: Task | None = None
        self._global: GlobalModel | None = None
        self._news = asyncio.Event()
        self._global_topics = GlobalTopics(transport, config.federation)
        self._due_again = asyncio.Event()  # the task came again: send unanswered updates now
        self._pending: dict[str, asyncio.Future[Ack]] = {}
        self._outbox: Outbox | None = None
        self._rounds_before = 0
        """Updates created by earlier runs (from the outbox), so seeds do not repeat."""
        self._device = resolve_device(config.device)  # a missing GPU stops the agent here
        self._sizer = DeviceSizer.from_config(config, device=self._device)
        self._state: AgentState = "offline"
        self._split: MqttSplitChannel | None = None
        self.report = report or AgentReport(client_id=config.client_id)
        """Filled in while running, so a caller holding it sees progress even after a cancel."""

    @staticmethod
    def will(config: AgentConfig) -> Will:
        """The last will the broker publishes if this device vanishes."""
        status = Status(client_id=config.client_id, state="offline", profile=config.profile)
        return Will(topic=topics.status(config.federation, config.client_id), message=status)

    async def run(self) -> AgentReport:
        """Take part until ``max_updates`` updates are answered (or forever).

        With ``state_dir`` set, updates left unanswered by an earlier run are published
        again first, and the counts of earlier runs carry over.
        """
        with self._opened_outbox():
            return await self._run()

    @contextlib.contextmanager
    def _opened_outbox(self) -> Iterator[None]:
        if self.config.state_dir is None:
            yield
            return
        with Outbox(Path(self.config.state_dir) / OUTBOX_FILE) as outbox:
            counts = outbox.counts()
            self.report.updates_sent = counts.answered
            self.report.accepted = counts.accepted
            self.report.rejected = Counter(
                answer.reason or "unknown" for answer in outbox.answers() if not answer.accepted
            )
            self._rounds_before = counts.created
            self._outbox = outbox
            try:
                yield
            finally:
                self._outbox = None

    async def _run(self) -> AgentReport:
        fed, me = self.config.federation, self.config.client_id
        for topic_filter in (topics.task(fed), topics.ack(fed, me)):  # globals: by the task
            await self._transport.subscribe(topic_filter)
        await self._transport.subscribe(topics.split_bwd(fed, me))
        self._loop = asyncio.get_running_loop()
        await self._announce("waiting")
        try:
            async with asyncio.TaskGroup() as group:
                receiver = group.create_task(self._receive(), name=f"agent-{me}-receive")
                try:
                    await self._train_loop()
                finally:
                    receiver.cancel()
        finally:  # also when stopped by a signal: observers see it leave, not vanish
            if self._state != "cannot_fit":  # the refusal stays retained for operators
                await self._leave()
        return self.report

    async def _leave(self) -> None:
        """Publish the offline status, waiting at most a few seconds for the broker."""
        try:
            async with asyncio.timeout(_LEAVE_TIMEOUT_S):
                await self._announce("offline")
        except (TimeoutError, TransportError) as exc:
            log.warning("%s: could not publish the offline status: %r", self.config.client_id, exc)

    async def _announce(self, state: AgentState) -> None:
        """Publish the status; one lost while no broker answers is replaced by the next."""
        self._state = state
        base_version = self._global.version if self._global else None
        status = self.report.status(state, self.config.profile, base_version)
        topic = topics.status(self.config.federation, self.config.client_id)
        try:
            await self._transport.publish(topic, status, retain=True)
        except TransportError as exc:
            log.warning("%s: status %s not published: %s", self.config.client_id, state, exc)

    async def _receive(self) -> None:
        async for delivery in self._transport.deliveries():
            if isinstance(delivery, BadDelivery):
                me, topic = self.config.client_id, delivery.topic
                log.warning("%s: unreadable message on %s: %s", me, topic, delivery.error)
                continue
            message = delivery.message
            if isinstance(message, Task):
                if not self._trusted(message) or self._stale(message):
                    continue  # keep following the last genuine, current task
                if self._task is not None and _back(self._task, message):
                    self._due_again.set()
                if message.whole_updates:  # behind intake replicas: never in chunks
                    self._transport.max_payload = max(self._transport.max_payload, WHOLE_BYTES)
                if self._global is None or _order(self._global) < _order(message):
                    await self._global_topics.follow(message)
                self._task = message
                self._news.set()
            elif isinstance(message, GlobalModel):
                self.report.bytes_down += delivery.size
                if self._emulation is not None:
                    await self._emulation.downlink(delivery.size)
                if self._global is None or _order(message) > _order(self._global):
                    if not self._trusted(message):
                        continue
                    self._global = message
                    self._news.set()
            elif isinstance(message, SplitReply) and self._split is not None:
                self._split.deliver(message, delivery.size)
            elif isinstance(message, Ack):
                waiter = self._pending.get(message.update_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
                elif not message.accepted:
                    log.warning(
                        "%s: nack %s: %s", self.config.client_id, message.reason, message.detail
                    )

    def _trusted(self, message: GlobalModel | Task) -> bool:
        """Whether ``message`` may be acted on: signed by a trusted key, when keys are set."""
        if self._verifier is None:
            return True
        try:
            self._verifier.verify(message, federation=self.config.federation)
        except SignatureError as exc:
            if isinstance(message, Task):
                self.report.refused_tasks += 1
            else:
                self.report.refused_globals += 1
            log.error("%s: %s", self.config.client_id, exc)  # noqa: TRY400 (expected, explained)
            return False
        return True

    def _stale(self, task: Task) -> bool:
        """Whether ``task`` is an older version of the task followed: a replay, ignored."""
        current = self._task
        if current is None or task.task_id != current.task_id or _order(task) >= _order(current):
            return False
        self.report.stale_tasks += 1
        log.warning(
            "%s: ignoring task %s at (run, version) %s, older than %s",
            self.config.client_id, task.task_id, _order(task), _order(current),
        )  # fmt: skip
        return True

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Wait until the receive task brings news and ``ready()`` holds (logged when long)."""
        ask = self._global_topics.ask
        await wait_for_news(self._news, ready, self._waiting_on, ask, self.config.ask_after_s)

    def _waiting_on(self) -> Wait:
        return self._global_topics.waiting_on(self.config.client_id, self._task, self._global)

    def _aligned(self) -> bool:
        return bool(self._task and self._global and self._task.version == self._global.version)

    async def _wait_for_version(self, version: int) -> None:
        await self._wait_for(lambda: self._global is not None and self._global.version >= version)

    async def _wait_until_picked(self) -> None:
        """Synchronous rounds: wait for a round whose task names this device (or nobody)."""
        me = self.config.client_id
        while True:
            await self._wait_for(self._aligned)
            assert self._task is not None and self._global is not None
            if not self._task.round_clients or me in self._task.round_clients:
                return
            await self._wait_for_version(self._global.version + 1)

    async def _resend_pending(self) -> None:
        """Publish again, with the same ids, the updates an earlier run left unanswered."""
        if self._outbox is None:
            return
        for update in await asyncio.to_thread(self._outbox.pending):
            log.warning("%s: re-sending unanswered %s", self.config.client_id, update.update_id)
            self._count_answer(await self._deliver(update))

    async def _train_loop(self) -> None:
        """Fit and send updates until ``max_updates`` are answered, or the plan is refused."""
        await self._resend_pending()
        training = await self._start_training()
        if training is None:
            return
        while not 0 < self.config.max_updates <= self.report.updates_sent:
            await self._wait_for_turn(training)
            if not await self._follow_replan(training):
                return
            await self._train_round(training)

    async def _start_training(self) -> _Training | None:
        """Wait for the task and its global, then plan and build; None when it cannot fit."""
        await self._wait_for(
            lambda: (
                self._task is not None
                and self._global is not None
                and self._global.task_id == self._task.task_id
            )
        )
        assert self._task is not None
        task = self._task
        plan = await asyncio.to_thread(self._sizer.plan, task) if self._sizer else None
        if isinstance(plan, CannotFit):
            await self._refuse(plan)
            return None
        self.report.plan = plan.to_status() if plan else None
        trainer = await asyncio.to_thread(self._build_trainer, task, plan)
        data = self._data or load_data(
            self.config.data, seq_len=task.train.seq_len, model=self.config.model or task.model
        )
        return _Training(
            task=task,
            trainer=trainer,
            data=data,
            plan=plan,
            replan=plan,
            spec=plan.train_spec(task.train) if plan else task.train,
            round_index=self._rounds_before,
        )

    async def _wait_for_turn(self, training: _Training) -> None:
        """Wait until the device is online and, in synchronous rounds, picked for a new one."""
        answered = training.answered_base
        in_rounds = self.config.once_per_version or bool(training.task.round_clients)
        if in_rounds and answered is not None:  # a newer version or run
            await self._wait_for(lambda: bool(self._global and _order(self._global) > answered))
        if self._emulation is not None:
            await self._emulation.before_fit()
        if in_rounds:
            await self._wait_until_picked()

    async def _follow_replan(self, training: _Training) -> bool:
        """Take up the plan made after a measured peak overran the budget; False if refused."""
        plan, replan = training.plan, training.replan
        if replan is plan:
            return True
        if isinstance(replan, CannotFit):
            await self._refuse(replan)
            return False
        assert plan is not None and replan is not None
        if replan.method != plan.method:
            training.trainer = await asyncio.to_thread(self._build_trainer, training.task, replan)
        training.plan, training.spec = replan, replan.train_spec(training.spec)
        return True

    async def _train_round(self, training: _Training) -> None:
        """Fit from the newest global and send the update, unless the device lost the fit."""
        start = self._global
        assert start is not None
        await self._announce("training")
        fit = await self._fit(training, start)
        if fit is None:
            return
        fit = await self._ready_to_send(fit)
        await self._send(training, self._update_of(training, start, fit))

    async def _fit(self, training: _Training, start: GlobalModel) -> FitResult | None:
        """Run one fit in a worker thread; None when the emulated device dropped off during it."""
        trainer = training.trainer
        if isinstance(trainer, KdTrainer):  # logits answer the newest announced slice
            await asyncio.to_thread(self._use_proxy, trainer, self._task or training.task)
        seed = self.config.seed * 1_000_003 + training.round_index
        fit_call = functools.partial(
            trainer.fit, start.tensors, training.data, training.spec, seed=seed
        )
        stop = threading.Event()
        timed = _CpuTimed(stoppable(fit_call, stop, getattr(trainer, "model", None)))
        fit_started = time.monotonic()
        try:
            fit, training.replan = await self._sized_fit(timed, training.task, training.plan)
        except asyncio.CancelledError:
            stop.set()  # the worker thread stops at its next forward pass
            raise
        training.round_index += 1
        if isinstance(trainer, SplitTrainer):
            self.report.split.append(trainer.history)
        if self._emulation is not None and not await self._emulation.after_fit(
            wall_s=time.monotonic() - fit_started, cpu_s=timed.cpu_s
        ):
            log.info("%s: dropped off during the fit; its work is lost", self.config.client_id)
            return None
        return fit

    async def _ready_to_send(self, fit: FitResult) -> FitResult:
        """The fit as it is sent: filtered (simulated attacks), privatised, slowed down."""
        if self._fit_filter is not None:
            fit = self._fit_filter(fit)
        if self._privacy is not None:
            fit = self._privacy.apply(fit)
            self.report.privacy = self._privacy.accountant.report()
        if fit.diverged:
            self.report.diverged += 1
            log.warning("%s: training diverged; sending what came before", self.config.client_id)
        if self.config.slowdown > 1:
            await asyncio.sleep((self.config.slowdown - 1) * fit.compute_s)
        return fit

    def _update_of(self, training: _Training, start: GlobalModel, fit: FitResult) -> Update:
        """The update carrying ``fit``: seeds instead of the delta when the fit has them."""
        return Update(
            client_id=self.config.client_id,
            task_id=training.task.task_id,
            base_version=start.version,
            run_id=start.run_id,
            num_samples=fit.num_samples,
            method=training.trainer.method,
            delta=fit.delta if fit.seeds is None else {},
            seeds=fit.seeds,
            variance=fit.variance,
            logits=fit.logits or {},
            proxy_slice=fit.proxy_slice,
            train_loss=fit.train_loss,
            compute_s=fit.compute_s,
        )

    async def _send(self, training: _Training, update: Update) -> None:
        """Deliver ``update`` and act on its ack: a new K, or waiting for a newer global."""
        ack = await self._deliver(update)
        if ack.perturbations is not None and ack.perturbations != training.spec.perturbations:
            training.spec = training.spec.model_copy(update={"perturbations": ack.perturbations})
        self._count_answer(ack)
        self.report.answered(update.method)
        if self.report.first_base_version is None:
            self.report.first_base_version = update.base_version
        if ack.accepted:
            training.answered_base = (update.run_id, update.base_version)
            return
        log.info(
            "%s: update rejected (%s: %s); refetching the global",
            self.config.client_id,
            ack.reason,
            ack.detail,
        )
        if ack.reason in ("stale", "future_version"):
            await self._wait_for_version(ack.version)
        elif ack.reason == "wrong_run":  # trained on an earlier run's global: take the new one
            await self._wait_for(
                lambda: self._global is None or self._global.run_id != update.run_id
            )

    def _count_answer(self, ack: Ack) -> None:
        """Count an answered update in the report: accepted, or rejected for its reason."""
        self.report.updates_sent += 1
        self.report.last_version = ack.version
        if ack.accepted:
            self.report.accepted += 1
        else:
            self.report.rejected[ack.reason or "unknown"] += 1

    async def _refuse(self, refusal: CannotFit) -> None:
        self.report.plan = refusal.to_status()
        log.error(
            "%s: cannot fit the task in %.0f MB: it needs at least %.0f MB (%s)",
            self.config.client_id,
            refusal.budget_mb,
            refusal.required_mb,
            refusal.method,
        )
        await self._announce("cannot_fit")

    async def _sized_fit(
        self, fit: Callable[[], FitResult], task: Task, plan: Plan | None
    ) -> tuple[FitResult, Plan | CannotFit | None]:
        """Run ``fit``; measure it when it is the first under ``plan``; return the next plan."""
        if plan is None or self._sizer is None or not self._sizer.needs_measuring(plan):
            return await asyncio.to_thread(fit), plan
        device = fit_device(self._device, plan.method)
        result, meter = await asyncio.to_thread(self._sizer.measure, fit, device=device)
        measured, replan = await asyncio.to_thread(self._sizer.observe, plan, task, meter)
        self.report.plan = measured.to_status()
        return result, measured if replan is measured else replan

    def _build_trainer(self, task: Task, plan: Plan | None = None) -> Trainer:
        method = (plan.method if plan else None) or self.config.method or task.method
        if self.config.model is not None and method != "kd":
            raise ConfigError(f"a device model of its own needs method 'kd', not {method!r}")
        options = dict(self.config.trainer)
        if method == "split" and plan is not None and plan.cut is not None:
            options.setdefault("cut", plan.cut)
        model = task_model(task, model=self.config.model, device=fit_device(self._device, method))
        trainer = make_trainer(method, model, **options)
        if isinstance(trainer, SplitTrainer):
            self._split = MqttSplitChannel(
                self._transport,
                self._loop,
                federation=self.config.federation,
                client_id=self.config.client_id,
                task_id=task.task_id,
                timeout_s=trainer.config.timeout_s,
                retries=trainer.config.retries,
                emulation=self._emulation,
            )
            trainer.connect(self._split)
        return trainer

    def _use_proxy(self, trainer: KdTrainer, task: Task) -> None:
        if task.proxy is None:
            raise ConfigError(f"task {task.task_id!r} announces no proxy slice for kd")
        model = self.config.model or task.model
        trainer.use_proxy(task.proxy, seq_len=task.train.seq_len, model=model)

    async def _deliver(self, update: Update) -> Ack:
        """Publish ``update`` until it is answered; re-sends keep the same update_id."""
        topic = topics.update(self.config.federation, self.config.client_id)
        waiter: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending[update.update_id] = waiter
        try:
            if self._outbox is not None:
                await asyncio.to_thread(self._outbox.put, update)  # on disk before it leaves
            # The emulated link delays the bytes the transport sends, chunk headers included.
            uplink = self._emulation.uplink if self._emulation is not None else None
            for attempt in range(self.config.max_resends + 1):
                if attempt:
                    self.report.resends += 1
                    log.warning(
                        "%s: no ack for %s, re-sending", self.config.client_id, update.update_id
                    )
                    await renew_ack_subscription(self._transport, self.config, attempt)
                self._due_again.clear()
                try:
                    await self._transport.publish(topic, update, before_send=uplink)
                except TransportError as exc:  # no broker for a while: it is kept, try again
                    log.warning("%s: %s", self.config.client_id, exc)
                    continue
                ack = await answer_or_due(waiter, self.config.ack_timeout_s, self._due_again)
                if ack is None:
                    continue
                if self._outbox is not None:
                    await asyncio.to_thread(self._outbox.answer, ack)
                return ack
            raise TransportError(f"update {update.update_id} was never answered")
        finally:
            del self._pending[update.update_id]


async def run_agent(
    config: AgentConfig,
    *,
    url: BrokerAddress,
    data: TokenDataset | None = None,
    report: AgentReport | None = None,
    fit_filter: Callable[[FitResult], FitResult] | None = None,
    emulation: DeviceEmulation | None = None,
) -> AgentReport:
    """Connect to the broker at ``url`` (TLS and identity from ``config.mqtt``) and run."""
    transport_config = config.mqtt.transport_config(
        url=url,
        client_id=f"edgefed-{config.federation}-{config.client_id}",
        will=EdgeAgent.will(config),
        max_payload=config.max_payload,
    )
    async with MqttTransport(transport_config) as transport:
        agent = EdgeAgent(config, transport, data=data, report=report, fit_filter=fit_filter,
                          emulation=emulation)  # fmt: skip
        return await agent.run()
