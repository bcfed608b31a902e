"""The checks an update passes before it is merged, each run once and cheapest first.

A KD update carries logits, so it goes to the KD handler's checks. A delta update passes
the metadata checks (:func:`~aggregator.validation.check_metadata`) first; only then are its
seeds, if it has any, rebuilt into a dense delta off the event loop, so a stale or foreign
forward-gradient update costs nothing. The dense delta's own checks come next, and last the
lookup of the global it was computed on. The first failure raises
:class:`~schemas.errors.UpdateRejected`; nothing here changes any state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from aggregator.config import AggregatorConfig
from aggregator.fwdgrad import expand_seeds
from aggregator.kd_handler import KdContribution, KdHandler
from aggregator.validation import (
    ValidatedDelta,
    ValidationPolicy,
    check_delta,
    check_metadata,
    samples_cap,
)
from schemas.errors import UpdateRejected
from schemas.messages import Method, TensorMap, Update


@dataclass(frozen=True)
class CheckedDelta:
    """A delta update that passed every check, with the global it was computed on."""

    delta: ValidatedDelta
    base: TensorMap

    @property
    def staleness(self) -> int:
        """Versions the update's base is behind the current global."""
        return self.delta.staleness


@dataclass(frozen=True)
class UpdateChecks:
    """What the checks need that stays the same from one update to the next.

    Attributes:
        task_id: The task the aggregator runs.
        method: That task's method (``policy.allowed_methods`` may add others).
        policy: The limits every update respects.
        shapes: The global adapter's layout, name -> shape.
        max_perturbations: Most perturbations one seed update may ask to have rebuilt.
        kd: The KD handler when the federation accepts ``kd`` updates.
        run_id: The run merged into; an update trained in another one is ``wrong_run``.
    """

    task_id: str
    method: Method
    policy: ValidationPolicy
    shapes: Mapping[str, tuple[int, ...]]
    max_perturbations: int
    kd: KdHandler | None = None
    run_id: str = ""

    @classmethod
    def of(
        cls,
        config: AggregatorConfig,
        policy: ValidationPolicy,
        shapes: Mapping[str, tuple[int, ...]],
        kd: KdHandler | None,
        *,
        run_id: str = "",
    ) -> UpdateChecks:
        """The checks of the federation ``config`` describes, for a model of ``shapes``."""
        return cls(
            run_id=run_id,
            task_id=config.task_id,
            method=config.method,
            policy=policy,
            shapes=shapes,
            max_perturbations=config.fwdgrad.max_update_perturbations,
            kd=kd,
        )

    async def run(
        self, update: Update, *, version: int, kept: Mapping[int, TensorMap]
    ) -> KdContribution | CheckedDelta:
        """Check ``update`` against the global ``version``; ``kept`` maps versions to globals.

        Raises:
            UpdateRejected: At the first check that fails.
        """
        if update.run_id and self.run_id and update.run_id != self.run_id:
            raise UpdateRejected(
                "wrong_run",
                f"update was trained in run {update.run_id}, the current run is {self.run_id}",
            )
        if update.method == "kd" and self.kd is not None:  # logits, not a delta
            return await asyncio.to_thread(self.kd.check, update, current_version=version)
        staleness = check_metadata(
            update,
            task_id=self.task_id,
            method=self.method,
            current_version=version,
            policy=self.policy,
        )
        if update.seeds is not None:
            update = await asyncio.to_thread(
                expand_seeds, update, shapes=self.shapes, max_perturbations=self.max_perturbations
            )
        delta = check_delta(update, staleness=staleness, shapes=self.shapes, policy=self.policy)
        return CheckedDelta(delta, base=_kept_global(kept, update.base_version))


def merger_policy(config: AggregatorConfig) -> ValidationPolicy:
    """The limits every update to the aggregator ``config`` describes must respect."""
    max_update_norm = config.max_update_norm
    if config.privacy is not None:  # DP's sensitivity bound needs every update clipped
        clip = config.privacy.clip_norm
        max_update_norm = min(max_update_norm or clip, clip)
    return ValidationPolicy(
        max_staleness=config.max_staleness,
        max_update_norm=max_update_norm,
        norm_action=config.norm_action,
        known_clients=config.known_clients,
        allowed_methods=frozenset({config.method, *config.accept_methods}),
        max_samples=(  # behind replicas, each device's samples were capped by its replica
            None
            if config.intake == "replicas"
            else samples_cap(config.train, config.max_samples_per_update)
        ),
        sites=config.sites,
    )


def _kept_global(kept: Mapping[int, TensorMap], version: int) -> TensorMap:
    """The global an update started from; only the last ``max_staleness`` are kept."""
    base = kept.get(version)
    if base is None:
        raise UpdateRejected("stale", f"base version {version} is no longer kept")
    return base
