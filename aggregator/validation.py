"""Checks an update must pass before any strategy sees it (docs/architecture.md §5, §8).

Checks run from cheapest to dearest, so metadata problems are reported without touching the
tensors: who sent it, for which task and method, against which version, then the tensors'
names and shapes, dtypes, finiteness and finally their norm. The first failing check raises
:class:`~schemas.errors.UpdateRejected` whose ``reason`` goes into the nack and whose
``detail`` tells the device what exactly was wrong. The update's tensors are never mutated;
the accepted delta is float32 and may share the update's memory (strategies copy what they
keep), so it is read, never written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from aggregator import ops
from schemas.errors import ConfigError, StaleUpdate, UpdateRejected
from schemas.messages import Method, TensorMap, TrainSpec, Update

NormAction = Literal["clip", "reject"]
"""What to do with an update whose norm exceeds ``max_update_norm``."""

DEFAULT_DTYPES: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16})
"""Delta dtypes accepted unless a policy says otherwise (what the codec's compression emits)."""

_NAME_LIMIT = 5


def _listing(items: Iterable[str]) -> str:
    shown = list(items)
    more = len(shown) - _NAME_LIMIT
    text = ", ".join(shown[:_NAME_LIMIT])
    return f"{text} (+{more} more)" if more > 0 else text


@dataclass(frozen=True)
class ValidationPolicy:
    """Limits an update must respect; built once from the aggregator's settings.

    Attributes:
        max_staleness: Updates with ``current_version - base_version`` above this are nacked.
        max_update_norm: Bound on the delta's global L2 norm; None disables the check.
        norm_action: ``clip`` scales an oversized delta down to the bound (robust against
            a single outlier, keeps honest work); ``reject`` nacks it.
        allowed_dtypes: Floating dtypes a delta may use on the wire.
        known_clients: Client ids allowed to contribute; None accepts anyone.
        allowed_methods: Methods accepted besides the task's own (methods whose result is a
            delta of the same adapter, such as lora and fwdgrad, can mix); None: only the task's.
        max_samples: Largest ``num_samples`` an update may claim. It is the update's weight
            in FedBuff and FedAsync, so without a bound one client could outweigh the rest
            by claiming more; :func:`samples_cap` derives it from the task. None: no bound.
        sites: Site aggregators, whose updates carry all their devices' samples uncapped.
    """

    max_staleness: int = 10
    max_update_norm: float | None = None
    norm_action: NormAction = "clip"
    allowed_dtypes: frozenset[torch.dtype] = DEFAULT_DTYPES
    known_clients: frozenset[str] | None = None
    allowed_methods: frozenset[Method] | None = None
    max_samples: int | None = None
    sites: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        """Refuse a policy that cannot work, before any update meets it."""
        if (
            isinstance(self.max_staleness, bool)
            or not isinstance(self.max_staleness, int)
            or self.max_staleness < 0
        ):
            raise ConfigError(f"max_staleness must be an integer >= 0, got {self.max_staleness!r}")
        if self.max_update_norm is not None and (
            not math.isfinite(self.max_update_norm) or self.max_update_norm <= 0
        ):
            raise ConfigError(
                f"max_update_norm must be a positive number or None, got {self.max_update_norm!r}"
            )
        if self.norm_action not in ("clip", "reject"):
            raise ConfigError(f"norm_action must be 'clip' or 'reject', got {self.norm_action!r}")
        dtypes = frozenset(self.allowed_dtypes)
        if not dtypes or not all(
            isinstance(dtype, torch.dtype) and dtype.is_floating_point for dtype in dtypes
        ):
            raise ConfigError(
                f"allowed_dtypes must be a non-empty set of floating dtypes, got {dtypes!r}"
            )
        object.__setattr__(self, "allowed_dtypes", dtypes)
        if self.known_clients is not None:
            object.__setattr__(self, "known_clients", frozenset(self.known_clients))
        if self.allowed_methods is not None:
            object.__setattr__(self, "allowed_methods", frozenset(self.allowed_methods))
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool)
            or not isinstance(self.max_samples, int)
            or self.max_samples < 1
        ):
            raise ConfigError(
                f"max_samples must be an integer >= 1 or None, got {self.max_samples!r}"
            )


def samples_cap(train: TrainSpec, explicit: int | None = None) -> int:
    """The most samples one update may claim: ``explicit``, else one epoch of the task's plan.

    A device following the task visits at most ``local_steps x batch_size`` sequences per
    update (trainers count distinct ones, and the planner only ever shrinks the batch).
    """
    return explicit if explicit is not None else train.local_steps * train.batch_size


@dataclass(frozen=True)
class ValidatedDelta:
    """An update's delta that passed every check, ready for a strategy.

    Attributes:
        delta: Float32 tensors, to be read only: the update's own when they were float32
            and not clipped (strategies copy what they keep).
        staleness: ``current_version - base_version``.
        norm: Global L2 norm of the delta as received, before any clipping.
        clipped: Whether the delta was scaled down to ``max_update_norm``.
    """

    delta: TensorMap
    staleness: int
    norm: float
    clipped: bool


def _check_shapes(delta: TensorMap, shapes: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(shapes) - set(delta))
    unexpected = sorted(set(delta) - set(shapes))
    mismatched = [
        f"{name} is {tuple(delta[name].shape)}, expected {tuple(shapes[name])}"
        for name in sorted(set(shapes) & set(delta))
        if tuple(delta[name].shape) != tuple(shapes[name])
    ]
    problems: list[str] = []
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise UpdateRejected("wrong_shape", "; ".join(problems))


def _check_dtypes(delta: TensorMap, allowed: frozenset[torch.dtype]) -> None:
    bad = [
        f"{name} is {tensor.dtype}"
        if tensor.dtype not in allowed
        else f"{name} has layout {tensor.layout}"
        for name, tensor in sorted(delta.items())
        if tensor.dtype not in allowed or tensor.layout != torch.strided
    ]
    if bad:
        names = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in allowed))
        raise UpdateRejected("wrong_dtype", f"{_listing(bad)}; allowed: dense tensors of {names}")


def _check_finite(delta: TensorMap) -> None:
    bad: list[str] = []
    for name, tensor in sorted(delta.items()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            bad.append(f"{name} has {nan} NaN and {inf} inf values")
    if bad:
        raise UpdateRejected("non_finite", _listing(bad))


def check_metadata(
    update: Update,
    *,
    task_id: str,
    method: Method,
    current_version: int,
    policy: ValidationPolicy,
) -> int:
    """The checks every update passes before its content is looked at; returns its staleness.

    Order: unknown_client, wrong_task, wrong_method, too_many_samples, future_version, stale.

    Raises:
        StaleUpdate: If the update is older than ``policy.max_staleness``.
        UpdateRejected: For every other failed check.
    """
    if policy.known_clients is not None and update.client_id not in policy.known_clients:
        raise UpdateRejected("unknown_client", f"client {update.client_id!r} is not registered")
    if update.task_id != task_id:
        raise UpdateRejected(
            "wrong_task", f"update is for task {update.task_id!r}, the current task is {task_id!r}"
        )
    allowed = {method} | (policy.allowed_methods or set())
    if update.method not in allowed:
        raise UpdateRejected(
            "wrong_method",
            f"update was trained with {update.method!r}, the current task uses {method!r}"
            + (f" and also accepts {sorted(allowed - {method})}" if len(allowed) > 1 else ""),
        )
    capped = update.client_id not in policy.sites
    if capped and policy.max_samples is not None and update.num_samples > policy.max_samples:
        raise UpdateRejected(
            "too_many_samples",
            f"num_samples {update.num_samples} exceeds the {policy.max_samples} one update "
            "of this task may claim (local_steps x batch_size unless configured)",
        )
    if update.base_version > current_version:
        raise UpdateRejected(
            "future_version",
            f"base_version {update.base_version} is ahead of the current version {current_version}",
        )
    staleness = current_version - update.base_version
    if staleness > policy.max_staleness:
        raise StaleUpdate(staleness, policy.max_staleness)
    return staleness


def validate_update(
    update: Update,
    *,
    task_id: str,
    method: Method,
    current_version: int,
    shapes: Mapping[str, tuple[int, ...]],
    policy: ValidationPolicy,
) -> ValidatedDelta:
    """Check an update against the running task and the policy, in a fixed order.

    Order: unknown_client, wrong_task, wrong_method, too_many_samples, future_version, stale,
    wrong_shape, wrong_dtype, non_finite, norm_bound.

    Args:
        update: The decoded update; its tensors are only read.
        task_id: The task the aggregator runs now.
        method: The method that task uses (``policy.allowed_methods`` may add others).
        current_version: The global version now.
        shapes: Expected name → shape of the delta (the global adapter's layout).
        policy: The limits to enforce.

    Returns:
        The float32 delta (clipped if the policy says so), its staleness and norm.

    Raises:
        StaleUpdate: If the update is older than ``policy.max_staleness``.
        UpdateRejected: For every other failed check, with the reason and a detail.
    """
    staleness = check_metadata(
        update, task_id=task_id, method=method, current_version=current_version, policy=policy
    )
    return check_delta(update, staleness=staleness, shapes=shapes, policy=policy)


def check_delta(
    update: Update,
    *,
    staleness: int,
    shapes: Mapping[str, tuple[int, ...]],
    policy: ValidationPolicy,
) -> ValidatedDelta:
    """The checks of an update's delta, for one whose metadata passed (:func:`check_metadata`).

    Order: malformed (seeds not yet expanded), wrong_shape, wrong_dtype, non_finite,
    norm_bound. :func:`validate_update` runs both parts; a caller that had to look at the
    metadata first (to rebuild a seed update's delta only when it is worth it) runs this one.

    Args:
        update: The update, its tensors only read.
        staleness: What :func:`check_metadata` returned for it.
        shapes: Expected name → shape of the delta.
        policy: The limits to enforce.

    Returns:
        The float32 delta (clipped if the policy says so), its staleness and norm.

    Raises:
        UpdateRejected: For the first failed check, with the reason and a detail.
    """
    if update.seeds is not None:
        raise UpdateRejected("malformed", "seeds must be expanded to a delta before validation")
    _check_shapes(update.delta, shapes)
    _check_dtypes(update.delta, policy.allowed_dtypes)
    norm = ops.global_norm(update.delta)
    if not math.isfinite(norm):  # float64 sums of finite values cannot overflow: NaN or inf
        _check_finite(update.delta)  # names the tensors that hold them
        raise UpdateRejected("non_finite", "the delta's norm is not finite")
    bound = policy.max_update_norm
    if bound is None or norm <= bound:
        return ValidatedDelta(
            delta=ops.as_float32(update.delta), staleness=staleness, norm=norm, clipped=False
        )
    if policy.norm_action == "reject":
        raise UpdateRejected(
            "norm_bound", f"update norm {norm:.6g} exceeds max_update_norm {bound:.6g}"
        )
    clipped, _ = ops.clip_by_norm(update.delta, max_norm=bound)
    return ValidatedDelta(delta=clipped, staleness=staleness, norm=norm, clipped=True)
