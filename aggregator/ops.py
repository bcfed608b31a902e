"""Pure tensor math on named tensor maps, shared by the merge strategies and validation.

Deltas may arrive as float16 or bfloat16 to save bandwidth, but merging in those types loses
small updates to rounding, so every function computes in float32 (sums accumulate in float64,
norms combine per-tensor float32 norms in float64) and returns float32. Results are fresh
tensors (``as_float32`` alone may hand back its input): nothing here mutates its inputs, so
the caller may keep a buffered delta or the previous global untouched.
Mismatched names or shapes raise ``ValueError`` instead of broadcasting silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from schemas.messages import TensorMap

_NAME_LIMIT = 5
_WIDE = frozenset({torch.float32, torch.float64})
"""Dtypes whose norms are taken in their own precision; narrower ones in float32."""


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Return a float32 view for computing; may alias ``t`` when it is already float32."""
    if t.dtype is torch.float32 and not t.requires_grad:
        return t  # the common case, without two calls into torch per tensor
    return t.detach().to(torch.float32)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAME_LIMIT])
    more = len(names) - _NAME_LIMIT
    return f"{shown} (+{more} more)" if more > 0 else shown


def check_same_layout(reference: TensorMap, other: TensorMap, *, what: str = "tensor maps") -> None:
    """Raise ``ValueError`` unless ``other`` has exactly the names and shapes of ``reference``.

    Args:
        reference: The map whose layout is expected.
        other: The map being checked.
        what: Words naming the pair, used in the error message.

    Raises:
        ValueError: Naming missing names, unexpected names or the first shape mismatches.
    """
    missing = sorted(set(reference) - set(other))
    unexpected = sorted(set(other) - set(reference))
    problems: list[str] = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    mismatched = [
        f"{name} {tuple(other[name].shape)} vs {tuple(reference[name].shape)}"
        for name in sorted(set(reference) & set(other))
        if other[name].shape != reference[name].shape
    ]
    if mismatched:
        problems.append(f"shape mismatch {_names(mismatched)}")
    if problems:
        raise ValueError(f"{what} differ: {'; '.join(problems)}")


def _check_all_same_layout(maps: Sequence[TensorMap]) -> None:
    if not maps:
        raise ValueError("need at least one tensor map")
    for index, other in enumerate(maps[1:], start=1):
        check_same_layout(maps[0], other, what=f"maps 0 and {index}")


def clone(x: TensorMap) -> TensorMap:
    """Return an independent float32 copy, e.g. to keep a delta in a buffer."""
    return {
        name: t.detach().clone() if t.dtype is torch.float32 else t.detach().to(torch.float32)
        for name, t in x.items()
    }  # ``clone`` costs half of ``to(copy=True)`` per call, and adapters have many tensors


def as_float32(x: TensorMap) -> TensorMap:
    """Return ``x`` in float32 without copying what already is: read the result, never write it.

    The one exception to this module's fresh results, for validation's hot path: a received
    float32 delta is handed on as it is, and a strategy that keeps it copies it itself.
    """
    return {name: _f32(t) for name, t in x.items()}


def zeros_like(x: TensorMap) -> TensorMap:
    """Return float32 zeros with the names and shapes of ``x``."""
    return {
        name: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for name, t in x.items()
    }


def add(x: TensorMap, delta: TensorMap, *, scale: float = 1.0) -> TensorMap:
    """Return ``x + scale * delta``: applying an update with a server learning rate."""
    check_same_layout(x, delta, what="x and delta")
    return {name: _f32(t) + scale * _f32(delta[name]) for name, t in x.items()}


def scale(x: TensorMap, factor: float) -> TensorMap:
    """``factor * x`` in float32 (``x`` itself when the factor is 1)."""
    return x if factor == 1.0 else {name: _f32(t) * factor for name, t in x.items()}


def sub(a: TensorMap, b: TensorMap) -> TensorMap:
    """Return ``a - b``: the delta that takes ``b`` to ``a``."""
    check_same_layout(a, b, what="a and b")
    return {name: _f32(t) - _f32(b[name]) for name, t in a.items()}


def mix(x: TensorMap, y: TensorMap, *, alpha: float) -> TensorMap:
    """Return ``(1 - alpha) * x + alpha * y``: FedAsync's step towards a client model.

    Raises:
        ValueError: If ``alpha`` is outside [0, 1] (the result would extrapolate) or the
            maps differ in layout.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_same_layout(x, y, what="x and y")
    return {name: torch.lerp(_f32(t), _f32(y[name]), alpha) for name, t in x.items()}


def weighted_mean(maps: Sequence[TensorMap], *, weights: Sequence[float]) -> TensorMap:
    """Return ``Σ w_i m_i / Σ w_i``, accumulated in float64.

    Args:
        maps: At least one map, all with the same names and shapes.
        weights: One finite, non-negative weight per map, not all zero.

    Raises:
        ValueError: On an empty input, a length mismatch, bad weights or differing layouts.
    """
    if len(maps) != len(weights):
        raise ValueError(f"got {len(maps)} maps but {len(weights)} weights")
    _check_all_same_layout(maps)
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    total = math.fsum(weights)
    if total <= 0.0:
        raise ValueError("weights sum to zero")
    shares = [w / total for w in weights]
    # One flat float64 accumulator for the whole map: an adapter has a hundred or more
    # small tensors, and one add per map instead of one per tensor about halves the time.
    first = maps[0]
    if not first:
        return {}
    sizes = [t.numel() for t in first.values()]
    device = next(iter(first.values())).device
    acc = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
    for share, m in zip(shares, maps, strict=True):
        flat = torch.cat([_f32(m[name]).reshape(-1) for name in first])
        acc.add_(flat.to(torch.float64), alpha=share)
    parts = acc.to(torch.float32).split_with_sizes(sizes)
    # Separate tensors, not views of one buffer: safetensors refuses shared storage.
    return {
        name: part.view(t.shape).clone()
        for (name, t), part in zip(first.items(), parts, strict=True)
    }


def global_norm(x: TensorMap) -> float:
    """Return the L2 norm of all tensors taken together (0.0 for an empty map)."""
    if not x:
        return 0.0
    # The merge hot path: one float32 reduction per tensor (half the time of float64 on an
    # adapter's many small tensors), the per-tensor norms combined in float64.
    norms = [
        torch.linalg.vector_norm(t.detach(), dtype=None if t.dtype in _WIDE else torch.float32)
        for t in x.values()
    ]
    total = float(torch.linalg.vector_norm(torch.stack(norms), dtype=torch.float64))
    if math.isfinite(total):
        return total
    # Squares past float32's range (values above ~1e19) overflow, or a value is NaN or inf:
    # in float64 a sum of squares of finite float32 values cannot overflow, so it tells which.
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in x.values()]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def clip_by_norm(x: TensorMap, *, max_norm: float) -> tuple[TensorMap, float]:
    """Scale ``x`` down so its global norm is at most ``max_norm``; never scale it up.

    Returns:
        The float32 result and the scale that was applied (1.0 when no clipping was needed).

    Raises:
        ValueError: If ``max_norm`` is not a positive finite number or ``x`` is not finite
            (a clipped NaN is still NaN).
    """
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
    norm = global_norm(x)
    if not math.isfinite(norm):
        raise ValueError("cannot clip a tensor map with non-finite values")
    if norm <= max_norm:
        return clone(x), 1.0
    scale = max_norm / norm
    return {name: _f32(t) * scale for name, t in x.items()}, scale


def all_finite(x: TensorMap) -> bool:
    """Return True when no tensor holds NaN or ±inf."""
    return all(bool(torch.isfinite(t).all()) for t in x.values())


def _sorted_stack(maps: Sequence[TensorMap], name: str) -> torch.Tensor:
    return torch.stack([_f32(m[name]) for m in maps]).sort(dim=0).values


def coordinate_median(maps: Sequence[TensorMap]) -> TensorMap:
    """Return the coordinate-wise median; an even count averages the two middle values.

    One outlier per coordinate cannot move the median beyond the honest values, which is
    why it is offered over the FedBuff buffer. Weights do not apply.

    Raises:
        ValueError: On an empty input or differing layouts.
    """
    _check_all_same_layout(maps)
    n = len(maps)
    out: TensorMap = {}
    for name in maps[0]:
        ordered = _sorted_stack(maps, name)
        if n % 2:
            out[name] = ordered[n // 2].clone()
        else:
            out[name] = (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return out


def trimmed_mean(maps: Sequence[TensorMap], *, trim_ratio: float) -> TensorMap:
    """Return the coordinate-wise mean without the ``floor(trim_ratio * n)`` extremes at each end.

    With few maps nothing may be dropped: three maps need ``trim_ratio >= 1/3`` to drop one
    value from each end. Weights do not apply.

    Raises:
        ValueError: If ``trim_ratio`` is outside [0, 0.5), on an empty input or differing
            layouts.
    """
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    _check_all_same_layout(maps)
    n = len(maps)
    k = math.floor(trim_ratio * n)
    out: TensorMap = {}
    for name in maps[0]:
        kept = _sorted_stack(maps, name)[k : n - k]
        out[name] = kept.to(torch.float64).mean(dim=0).to(torch.float32)
    return out
