"""A site aggregator's updates on their way to the root, kept until the root answers them.

A site merges its devices' updates into one update for the root (:mod:`aggregator.site`).
That update is made, and checkpointed with the site's state, before any device whose work
it holds is acked; it is published only after that commit, and published again every
``resend_after_s`` until the root's Ack or Nack arrives. Its ``update_id`` is made once and
kept, so however often a site crash or a lost link makes it go out again, the root merges
it once and acks the repeats as duplicates (docs/scaling-out.md).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping

import torch

from edgefed.transport.base import Transport
from schemas import topics
from schemas.errors import ConfigError, TransportError
from schemas.messages import Ack, Method, TensorMap, Update

log = logging.getLogger(__name__)


class Uplink:
    """The site updates the root has not answered yet, and what it answered so far."""

    def __init__(
        self, transport: Transport, federation: str, site_id: str, *, resend_after_s: float
    ) -> None:
        """Publish to the root through ``transport`` as client ``site_id`` of ``federation``."""
        self._transport = transport
        self._federation = federation
        self.site_id = site_id
        self.resend_after_s = resend_after_s
        self.pending: OrderedDict[str, Update] = OrderedDict()
        """Made and not yet answered, oldest first."""
        self._sent_at: dict[str, float] = {}
        self.accepted = 0
        self.refused = 0

    def make(
        self,
        *,
        task_id: str,
        run_id: str,
        method: Method,
        base_version: int,
        delta: TensorMap,
        num_samples: int,
    ) -> Update:
        """A new site update, pending from now on; the caller checkpoints, then sends it."""
        update = Update(
            client_id=self.site_id,
            task_id=task_id,
            run_id=run_id,
            base_version=base_version,
            num_samples=num_samples,
            method=method,
            delta={name: tensor.contiguous() for name, tensor in delta.items()},
        )
        self.pending[update.update_id] = update
        return update

    async def send_due(self) -> None:
        """Publish every pending update never sent, or sent ``resend_after_s`` ago unanswered."""
        now = time.monotonic()
        for update_id, update in list(self.pending.items()):
            sent = self._sent_at.get(update_id)
            if sent is not None and now - sent < self.resend_after_s:
                continue
            if sent is not None:
                log.info(
                    "site update %s unanswered for %.0f s: sending it again", update_id, now - sent
                )
            try:
                await self._transport.publish(topics.update(self._federation, self.site_id), update)
            except TransportError as exc:
                log.warning("site update %s not published (%s); it stays pending", update_id, exc)
                return
            self._sent_at[update_id] = now

    def answer(self, ack: Ack) -> bool:
        """Take the root's answer to a site update; False when it answers none pending."""
        update = self.pending.pop(ack.update_id, None)
        self._sent_at.pop(ack.update_id, None)
        if update is None:
            return False
        if ack.accepted:
            self.accepted += 1
            log.info(
                "root %s site update %s (%d samples) at version %d",
                "re-acked" if ack.duplicate else "accepted", ack.update_id, update.num_samples,
                ack.version,
            )  # fmt: skip
        else:
            self.refused += 1
            log.warning(
                "root refused site update %s (%d samples): %s %s",
                ack.update_id, update.num_samples, ack.reason, ack.detail,
            )  # fmt: skip
        return True

    def state_dict(self) -> dict[str, object]:
        """The pending updates (tensors and all) and the answer counts, for the checkpoint."""
        pending = [_update_state(update) for update in self.pending.values()]
        return {"pending": pending, "accepted": self.accepted, "refused": self.refused}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output; every restored update is sent again."""
        items = state.get("pending", [])
        if not isinstance(items, list):
            raise ConfigError("the checkpoint's site updates are not a list")
        pending = [_update_from_state(item, self.site_id) for item in items]
        self.pending = OrderedDict((update.update_id, update) for update in pending)
        self._sent_at.clear()
        self.accepted = _int(state, "accepted")
        self.refused = _int(state, "refused")


def _update_state(update: Update) -> dict[str, object]:
    names = list(update.delta)
    fields = update.model_dump(include={"update_id", "task_id", "run_id", "base_version"})
    return fields | {
        "num_samples": update.num_samples,
        "method": update.method,
        "names": names,
        "tensors": [update.delta[name] for name in names],
    }


def _update_from_state(item: object, site_id: str) -> Update:
    """The update :func:`_update_state` saved, sent by ``site_id``."""
    try:
        assert isinstance(item, Mapping)
        names, tensors = item["names"], item["tensors"]
        delta = dict(zip(names, tensors, strict=True))
        assert all(isinstance(t, torch.Tensor) for t in delta.values())
        fields = {key: item[key] for key in ("update_id", "task_id", "run_id", "base_version")}
        more = {"num_samples": item["num_samples"], "method": item["method"], "delta": delta}
        return Update.model_validate(fields | more | {"client_id": site_id})
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"a checkpointed site update cannot be read: {exc}") from exc


def _int(state: dict[str, object], key: str) -> int:
    value = state.get(key, 0)
    if not isinstance(value, int):
        raise ConfigError(f"the checkpoint's site {key} count is not an integer")
    return value
