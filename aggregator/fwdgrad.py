"""Forward-gradient updates on the aggregator: seeds back to deltas, and how many to ask for.

Pure: no I/O and no logging. :func:`expand_seeds` turns an update that carries seeds into
the dense update every later stage (validation, strategies) already understands;
:class:`PerturbationController` decides how many perturbations per step devices should use
so the variance of a merged gradient estimate stays under a bound (docs/architecture.md §6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from edgefed.ml.perturbation import Layout, rebuild_delta
from schemas.errors import ConfigError, UpdateRejected
from schemas.messages import Update

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig


def count_perturbations(update: Update) -> int:
    """Perturbations an update's seeds describe in all (0 for a dense update)."""
    if update.seeds is None:
        return 0
    return sum(len(step.indices) for step in update.seeds.steps)


def perturbations_per_step(update: Update) -> int | None:
    """Mean perturbations per step of a seed update; None for a dense one (K unknown)."""
    if update.seeds is None or not update.seeds.steps:
        return None
    return round(count_perturbations(update) / len(update.seeds.steps))


def expand_seeds(
    update: Update, *, shapes: Mapping[str, tuple[int, ...]], max_perturbations: int
) -> Update:
    """The same update with its seeds rebuilt into a dense float32 delta (and seeds dropped).

    The cost is one generated perturbation of the adapter's size per (step, perturbation),
    so the count is bounded before any work is done. A dense update is returned unchanged.

    Args:
        update: A decoded update.
        shapes: The global adapter's layout (name -> shape).
        max_perturbations: Most perturbations one update may ask the aggregator to rebuild.

    Raises:
        UpdateRejected: ``too_large`` over ``max_perturbations``; ``wrong_shape`` when the
            seeds were drawn over another layout (generator, target, names or shapes).
    """
    seeds = update.seeds
    if seeds is None:
        return update
    count = count_perturbations(update)
    if count > max_perturbations:
        raise UpdateRejected(
            "too_large", f"{count} perturbations to rebuild, more than {max_perturbations}"
        )
    try:
        layout = Layout.from_shapes(shapes, seeds.target)
        delta = rebuild_delta(layout, seeds)
    except ConfigError as exc:
        raise UpdateRejected("wrong_shape", str(exc)) from exc
    # Built from an update that validated, with a delta the rebuild just made: no re-check.
    return update.model_copy(update={"delta": delta, "seeds": None})


class PerturbationController:
    """Chooses the perturbations per step (K) that keep the merged variance under a bound.

    Each forward-gradient update reports the variance of its per-step estimate at the K it
    used, so ``variance * K`` estimates the per-perturbation variance ``s^2``; an exponential
    average of it is the running view. A merge of ``merge_size`` updates, each averaging K
    perturbations, has variance about ``s^2 / (merge_size * K)``, so the fleet-wide K is
    ``s^2 / (merge_size * threshold)``, moved by at most ``max_factor`` per observation so one
    odd report cannot swing it. A device of relative speed r is asked for K times r over the
    mean speed of the devices known: the same wall time buys fast devices more perturbations,
    and the merged variance falls for the same round time.
    """

    def __init__(
        self,
        *,
        threshold: float,
        initial: int,
        minimum: int = 1,
        maximum: int = 1024,
        merge_size: int = 1,
        smoothing: float = 0.3,
        max_factor: float = 2.0,
    ) -> None:
        """Start at ``initial`` perturbations per step; nothing is known about noise yet.

        Raises:
            ConfigError: A bound or factor that cannot work.
        """
        if not (math.isfinite(threshold) and threshold > 0):
            raise ConfigError(f"variance threshold must be a positive number, got {threshold!r}")
        if not 1 <= minimum <= maximum:
            raise ConfigError(f"need 1 <= minimum <= maximum, got {minimum}, {maximum}")
        if merge_size < 1 or not 0 < smoothing <= 1 or not max_factor > 1:
            raise ConfigError(
                f"need merge_size >= 1, 0 < smoothing <= 1, max_factor > 1; "
                f"got {merge_size}, {smoothing}, {max_factor}"
            )
        self.threshold = threshold
        self.minimum = minimum
        self.maximum = maximum
        self.merge_size = merge_size
        self.smoothing = smoothing
        self.max_factor = max_factor
        self._target = float(self._clamp(initial))
        self.noise: float | None = None
        """Running estimate of the per-perturbation variance s^2."""
        self._speeds: dict[str, float] = {}

    def _clamp(self, k: float) -> int:
        return max(self.minimum, min(self.maximum, math.ceil(k)))

    @property
    def perturbations(self) -> int:
        """K per step for a device of average speed (what the task announces)."""
        return self._clamp(self._target)

    def merged_variance(self) -> float | None:
        """Expected variance of a merged estimate at the current K, once noise is known."""
        if self.noise is None:
            return None
        return self.noise / (self.merge_size * self.perturbations)

    def observe(self, variance: float | None, perturbations: int) -> None:
        """Fold in one update's reported variance, measured at ``perturbations`` per step."""
        if variance is None or not math.isfinite(variance) or variance < 0 or perturbations < 1:
            return
        sample = variance * perturbations
        self.noise = (
            sample
            if self.noise is None
            else (1 - self.smoothing) * self.noise + self.smoothing * sample
        )
        wanted = self.noise / (self.merge_size * self.threshold)
        low, high = self._target / self.max_factor, self._target * self.max_factor
        self._target = float(min(max(wanted, low), high, self.maximum))
        self._target = max(self._target, float(self.minimum))

    def state_dict(self) -> dict[str, object]:
        """What a checkpoint keeps, so a restarted aggregator asks for the same K."""
        return {"target": self._target, "noise": self.noise, "speeds": dict(self._speeds)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ConfigError: The state is not what :meth:`state_dict` writes.
        """
        target, noise, speeds = state.get("target"), state.get("noise"), state.get("speeds")
        if not isinstance(target, int | float) or not isinstance(speeds, dict):
            raise ConfigError(f"not a perturbation controller state: {sorted(state)}")
        if noise is not None and not isinstance(noise, int | float):
            raise ConfigError(f"controller noise must be a number, got {noise!r}")
        self._target = float(target)
        self.noise = None if noise is None else float(noise)
        self._speeds = {}
        for client_id, speed in speeds.items():
            if isinstance(client_id, str) and isinstance(speed, int | float):
                self.set_speed(client_id, float(speed))

    def set_speed(self, client_id: str, relative_speed: float | None) -> None:
        """Record a device's relative speed from its status (None forgets it)."""
        if relative_speed is None or not (math.isfinite(relative_speed) and relative_speed > 0):
            self._speeds.pop(client_id, None)
        else:
            self._speeds[client_id] = relative_speed

    def for_client(self, client_id: str) -> int:
        """K per step to ask of ``client_id``: the fleet's K scaled by its relative speed."""
        speed = self._speeds.get(client_id)
        if speed is None or not self._speeds:
            return self.perturbations
        mean = math.fsum(self._speeds.values()) / len(self._speeds)
        return self._clamp(self._target * speed / mean)


def perturbation_controller(config: AggregatorConfig) -> PerturbationController | None:
    """The controller ``config.fwdgrad`` asks for; None keeps the task's K fixed."""
    fwd, strategy = config.fwdgrad, config.strategy
    if fwd.variance_threshold is None:
        return None
    return PerturbationController(
        threshold=fwd.variance_threshold,
        initial=config.train.perturbations,
        minimum=fwd.min_perturbations,
        maximum=fwd.max_perturbations,
        merge_size=strategy.buffer_size if strategy.name == "fedbuff" else 1,
    )
