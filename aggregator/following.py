"""The root's task and globals as a site aggregator or an intake replica holds them.

Both check device updates as the root would, against the root's task and the latest root
global they hold (staleness counts root versions), and both learn them the way a device
does: the task on its retained topic, then the exact chunk topics of the global it names
(:class:`~edgefed.transport.global_topics.GlobalTopics`). Older globals are kept as the
bases of stale updates, ``max_staleness`` of them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from aggregator.config import AggregatorConfig
from aggregator.update_checks import UpdateChecks
from aggregator.validation import ValidationPolicy, samples_cap
from edgefed.transport.base import Transport
from edgefed.transport.global_topics import GlobalTopics
from schemas import topics
from schemas.messages import GlobalModel, Task, TensorMap

log = logging.getLogger(__name__)


class RootFollower:
    """The root's latest task and globals, and the update checks they imply."""

    def __init__(self, config: AggregatorConfig, transport: Transport, client_id: str) -> None:
        """Follow ``config.federation``'s root through ``transport``, asking as ``client_id``."""
        self.config = config
        self.client_id = client_id
        self.topics = GlobalTopics(transport, config.federation)
        self._transport = transport
        self.task: Task | None = None
        self.global_: GlobalModel | None = None
        self.version = -1
        """The root version whose global is held (-1 before the first)."""
        self.run_id = ""
        self.globals: OrderedDict[int, TensorMap] = OrderedDict()
        self.checks: UpdateChecks | None = None
        """Set once a task and a global of the same version are held."""

    async def subscribe(self) -> None:
        """Subscribe to the root's task; its globals follow each task."""
        await self._transport.subscribe(topics.task(self.config.federation))

    @property
    def current(self) -> TensorMap:
        """The latest root global held."""
        return self.globals[self.version]

    @property
    def max_staleness(self) -> int:
        """The root task's bound, or the configured one before a task came."""
        return self.task.max_staleness if self.task is not None else self.config.max_staleness

    async def take(self, message: object) -> bool:
        """Take a root task or global; True when both now agree on a new version's checks."""
        if isinstance(message, Task) and message.federation == self.config.federation:
            self.task = message
            await self.topics.follow(message)
        elif isinstance(message, GlobalModel) and (
            self.global_ is None or message.version > self.version
        ):
            self._adopt(message)
        else:
            return False
        return self._complete()

    async def say_waiting(self) -> None:
        """Log what is still missing, and ask the root for it."""
        wait = self.topics.waiting_on(self.client_id, self.task, self.global_)
        log.log(wait.level, "%s", wait.line)
        if wait.ask is not None:
            await self.topics.ask(wait.ask)

    def restore(self, version: int, run_id: str, globals_: dict[int, TensorMap]) -> None:
        """Start from checkpointed globals until the root's retained ones arrive."""
        self.version, self.run_id = version, run_id
        self.globals = OrderedDict(sorted(globals_.items()))

    def _adopt(self, message: GlobalModel) -> None:
        self.global_ = message
        self.version = message.version
        self.globals[message.version] = dict(message.tensors)
        while len(self.globals) > self.max_staleness + 1:
            self.globals.popitem(last=False)
        log.info("%s: root version %d", self.client_id, self.version)

    def _complete(self) -> bool:
        task, message = self.task, self.global_
        if task is None or message is None or task.version != message.version:
            return False
        if task.run_id != self.run_id and self.run_id:
            log.warning("the root started run %s (was %s)", task.run_id, self.run_id)
        self.run_id = task.run_id
        self.checks = UpdateChecks(
            task_id=task.task_id,
            method=task.method,
            policy=self._policy(task),
            shapes={name: tuple(t.shape) for name, t in message.tensors.items()},
            max_perturbations=self.config.fwdgrad.max_update_perturbations,
            run_id=task.run_id,
        )
        return True

    def _policy(self, task: Task) -> ValidationPolicy:
        """The root task's limits, with this process's own norm and client settings."""
        cfg = self.config
        return ValidationPolicy(
            max_staleness=task.max_staleness,
            max_update_norm=cfg.max_update_norm,
            norm_action=cfg.norm_action,
            known_clients=cfg.known_clients,
            allowed_methods=frozenset(task.methods or (task.method,)),
            max_samples=samples_cap(task.train, cfg.max_samples_per_update),
            sites=cfg.sites,  # a replica in front of a root with sites takes their updates
        )
