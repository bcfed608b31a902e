"""FedBuff (Nguyen et al., 2022): buffer K client deltas, then apply their weighted mean.

Each delta Δ_i gets weight w_i = s(τ_i)·n_i (staleness discount times sample count). When K
deltas are buffered, x ← x + η_g · Σ w_i Δ_i / Σ w_i is applied to the global current at flush
time and the buffer is cleared; only then does the version advance. Buffering smooths the
noise of single updates and lets fast devices contribute several times per version.

With ``robust="median"`` or ``"trimmed_mean"`` the buffer is reduced coordinate-wise instead,
so a few poisoned deltas cannot move the global far. Those reductions ignore the weights: a
weighted median would let one client with a huge claimed sample count pick the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from aggregator import ops
from aggregator.staleness import InverseSqrt, StalenessRule
from aggregator.strategies.base import MergeResult, check_submission
from schemas.errors import ConfigError
from schemas.messages import TensorMap

RobustMode = Literal["mean", "median", "trimmed_mean"]
"""How the buffer is reduced: weighted mean (the paper), coordinate median or trimmed mean."""

ROBUST_MODES: tuple[RobustMode, ...] = get_args(RobustMode)

_DEFAULT_RULE = InverseSqrt()


@dataclass(frozen=True)
class BufferedDelta:
    """One update waiting in the buffer, with what decided its weight."""

    update_id: str
    delta: TensorMap
    weight: float
    staleness: int
    num_samples: int


class FedBuff:
    """Buffered asynchronous aggregation with staleness- and sample-weighted averaging."""

    def __init__(
        self,
        buffer_size: int = 3,
        *,
        server_lr: float = 1.0,
        rule: StalenessRule = _DEFAULT_RULE,
        robust: RobustMode = "mean",
        trim_ratio: float = 0.2,
    ) -> None:
        """Configure the buffer.

        Args:
            buffer_size: K, the number of deltas merged per new version (≥ 1).
            server_lr: η_g, the step applied to the reduced delta (> 0).
            rule: Staleness discount s(τ); 1/√(1 + τ) by default.
            robust: ``mean`` (weighted), ``median`` or ``trimmed_mean`` (both unweighted).
            trim_ratio: Fraction dropped from each end per coordinate in ``trimmed_mean``,
                in [0, 0.5); with K deltas, ``floor(trim_ratio * K)`` values are dropped.

        Raises:
            ConfigError: On any value outside the ranges above.
        """
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ConfigError(f"fedbuff buffer_size must be an integer >= 1, got {buffer_size!r}")
        if not math.isfinite(server_lr) or server_lr <= 0:
            raise ConfigError(f"fedbuff server_lr must be a positive number, got {server_lr!r}")
        if robust not in ROBUST_MODES:
            raise ConfigError(f"fedbuff robust must be one of {ROBUST_MODES}, got {robust!r}")
        if not math.isfinite(trim_ratio) or not 0.0 <= trim_ratio < 0.5:
            raise ConfigError(f"fedbuff trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
        self.buffer_size = buffer_size
        self.server_lr = float(server_lr)
        self.rule = rule
        self.robust: RobustMode = robust
        self.trim_ratio = float(trim_ratio)
        self._buffer: list[BufferedDelta] = []

    def __repr__(self) -> str:
        """Show the configuration and fill level, for logs."""
        return (
            f"FedBuff(buffer_size={self.buffer_size}, server_lr={self.server_lr}, "
            f"rule={self.rule!r}, robust={self.robust!r}, trim_ratio={self.trim_ratio}, "
            f"pending={self.pending})"
        )

    @property
    def name(self) -> str:
        """``fedbuff``."""
        return "fedbuff"

    @property
    def interpolates(self) -> bool:
        """False: deltas are added to the current global (see ``Strategy``)."""
        return False

    @property
    def pending(self) -> int:
        """Number of deltas buffered since the last flush."""
        return len(self._buffer)

    @property
    def buffered(self) -> tuple[BufferedDelta, ...]:
        """The buffered deltas, oldest first (read-only view for metrics and tests)."""
        return tuple(self._buffer)

    def submit(
        self,
        *,
        current: TensorMap,
        base: TensorMap,
        delta: TensorMap,
        staleness: int,
        num_samples: int,
        update_id: str,
    ) -> MergeResult:
        """Buffer the delta; on the K-th, apply the reduced buffer to ``current``.

        ``base`` is not needed: FedBuff adds deltas to the current global, which is how it
        tolerates staleness. See :class:`Strategy` for the arguments.

        Raises:
            ValueError: If the delta's layout differs from ``current`` or ``update_id`` is
                already buffered; nothing is buffered then.
        """
        del base
        check_submission(staleness=staleness, num_samples=num_samples, update_id=update_id)
        ops.check_same_layout(current, delta, what="current global and delta")
        if any(entry.update_id == update_id for entry in self._buffer):
            raise ValueError(f"update {update_id} is already buffered")
        weight = self.rule(staleness) * num_samples
        self._buffer.append(
            BufferedDelta(
                update_id=update_id,
                delta=ops.clone(delta),
                weight=weight,
                staleness=staleness,
                num_samples=num_samples,
            )
        )
        effective = weight if self.robust == "mean" else 1.0
        if len(self._buffer) < self.buffer_size:
            return MergeResult(new_global=None, weight=effective)
        return self.flush(current=current, weight=effective)

    def flush(self, *, current: TensorMap, weight: float = 0.0) -> MergeResult:
        """Apply whatever is buffered now, full or not (a synchronous round's deadline).

        An empty buffer gives no new global.
        """
        if not self._buffer:
            return MergeResult(new_global=None, weight=weight)
        new_global = ops.add(current, self._reduce(), scale=self.server_lr)
        merged = tuple(entry.update_id for entry in self._buffer)
        self._buffer.clear()
        return MergeResult(new_global=new_global, weight=weight, merged_update_ids=merged)

    def _reduce(self) -> TensorMap:
        deltas = [entry.delta for entry in self._buffer]
        if self.robust == "median":
            return ops.coordinate_median(deltas)
        if self.robust == "trimmed_mean":
            return ops.trimmed_mean(deltas, trim_ratio=self.trim_ratio)
        return ops.weighted_mean(deltas, weights=[entry.weight for entry in self._buffer])

    def state_dict(self) -> dict[str, object]:
        """Return the buffer as plain lists (one entry per buffered update, oldest first).

        Keys: ``name``, ``pending``, ``update_ids``, ``weights``, ``staleness``,
        ``num_samples`` and ``deltas`` (float32 copies).
        """
        return {
            "name": self.name,
            "pending": self.pending,
            "update_ids": [entry.update_id for entry in self._buffer],
            "weights": [entry.weight for entry in self._buffer],
            "staleness": [entry.staleness for entry in self._buffer],
            "num_samples": [entry.num_samples for entry in self._buffer],
            "deltas": [ops.clone(entry.delta) for entry in self._buffer],
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Replace the buffer with one saved by :meth:`state_dict`.

        A saved buffer at least as full as ``buffer_size`` (the setting was lowered between
        runs) is kept whole and flushed by the next submit, so no acked update is lost.

        Raises:
            ConfigError: If the state is from another strategy or is inconsistent.
        """
        if state.get("name") != self.name:
            raise ConfigError(f"cannot load a {state.get('name')!r} state into {self.name}")
        ids = _strs(state, "update_ids")
        weights = _floats(state, "weights")
        staleness = _ints(state, "staleness")
        num_samples = _ints(state, "num_samples")
        deltas = _tensor_maps(state, "deltas")
        count = len(ids)
        if {len(weights), len(staleness), len(num_samples), len(deltas)} != {count}:
            raise ConfigError("fedbuff state lists differ in length")
        if state.get("pending", count) != count or len(set(ids)) != count:
            raise ConfigError("fedbuff state has an inconsistent count or repeated update ids")
        entries = [
            BufferedDelta(
                update_id=update_id,
                delta=ops.clone(delta),
                weight=weight,
                staleness=tau,
                num_samples=n,
            )
            for update_id, weight, tau, n, delta in zip(
                ids, weights, staleness, num_samples, deltas, strict=True
            )
        ]
        self._buffer = entries


def _items(state: dict[str, object], key: str) -> list[object]:
    value = state.get(key)
    if not isinstance(value, list | tuple):
        raise ConfigError(f"fedbuff state needs a list under {key!r}")
    return list(value)


def _bad(key: str, item: object, expected: str) -> ConfigError:
    return ConfigError(f"fedbuff state {key!r} holds {item!r}, expected {expected}")


def _strs(state: dict[str, object], key: str) -> list[str]:
    out: list[str] = []
    for item in _items(state, key):
        if not isinstance(item, str):
            raise _bad(key, item, "str")
        out.append(item)
    return out


def _ints(state: dict[str, object], key: str) -> list[int]:
    out: list[int] = []
    for item in _items(state, key):
        if isinstance(item, bool) or not isinstance(item, int):
            raise _bad(key, item, "int")
        out.append(item)
    return out


def _floats(state: dict[str, object], key: str) -> list[float]:
    out: list[float] = []
    for item in _items(state, key):
        if isinstance(item, bool) or not isinstance(item, int | float) or item < 0:
            raise _bad(key, item, "a number >= 0")
        out.append(float(item))
    return out


def _tensor_maps(state: dict[str, object], key: str) -> list[TensorMap]:
    out: list[TensorMap] = []
    for item in _items(state, key):
        if not isinstance(item, dict):
            raise _bad(key, item, "a tensor map")
        tensors: TensorMap = {}
        for name, tensor in item.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise _bad(key, item, "a tensor map")
            tensors[name] = tensor
        out.append(tensors)
    return out
