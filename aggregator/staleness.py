"""Staleness rules: how much an update computed on an old global still counts.

Staleness τ is ``current_version - base_version``. A rule maps τ to a factor s(τ) in (0, 1]
that the strategies multiply into a mixing rate (FedAsync) or an averaging weight (FedBuff).
Each rule is a small frozen dataclass so it can be compared, printed and written to a
checkpoint; strategies are handed a rule instead of being subclassed per rule.

See docs/architecture.md §5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from schemas.errors import ConfigError

StalenessName = Literal["constant", "polynomial", "hinge", "inverse_sqrt"]
"""Names accepted by :func:`staleness_rule`."""

STALENESS_NAMES: tuple[StalenessName, ...] = get_args(StalenessName)


class StalenessRule(Protocol):
    """Maps staleness τ ≥ 0 to a discount factor in (0, 1]."""

    def __call__(self, staleness: int) -> float:
        """Return s(τ); raises ValueError when ``staleness`` is negative."""
        ...


def _check_staleness(staleness: int) -> None:
    # A negative staleness means the caller mixed up versions; never discount silently.
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")


def _check_exponent(name: str, value: float) -> None:
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Constant:
    """s(τ) = 1: every update counts fully, however old (still bounded by max_staleness)."""

    def __call__(self, staleness: int) -> float:
        """Return 1.0 for any valid staleness."""
        _check_staleness(staleness)
        return 1.0


@dataclass(frozen=True)
class Polynomial:
    """s(τ) = (τ + 1)^(−a): a smooth decay; ``a = 0.5`` is the FedAsync paper's choice."""

    a: float = 0.5

    def __post_init__(self) -> None:
        """Refuse exponents that would grow weights with age or produce NaN."""
        _check_exponent("polynomial a", self.a)

    def __call__(self, staleness: int) -> float:
        """Return (τ + 1)^(−a)."""
        _check_staleness(staleness)
        return float((staleness + 1) ** (-self.a))


@dataclass(frozen=True)
class Hinge:
    """s(τ) = 1 for τ ≤ b, else 1 / (a(τ − b) + 1): full weight for recent updates, then decay."""

    a: float = 10.0
    b: int = 4

    def __post_init__(self) -> None:
        """Refuse a negative slope or a non-integral / negative hinge point."""
        _check_exponent("hinge a", self.a)
        if isinstance(self.b, bool) or not isinstance(self.b, int) or self.b < 0:
            raise ConfigError(f"hinge b must be an integer >= 0, got {self.b!r}")

    def __call__(self, staleness: int) -> float:
        """Return 1 up to the hinge point ``b``, then 1 / (a(τ − b) + 1)."""
        _check_staleness(staleness)
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)


@dataclass(frozen=True)
class InverseSqrt:
    """s(τ) = 1 / √(1 + τ): FedBuff's default weighting of a buffered delta."""

    def __call__(self, staleness: int) -> float:
        """Return 1 / √(1 + τ)."""
        _check_staleness(staleness)
        return 1.0 / math.sqrt(1.0 + staleness)


def _build_constant(params: Mapping[str, float]) -> StalenessRule:
    del params
    return Constant()


def _build_polynomial(params: Mapping[str, float]) -> StalenessRule:
    return Polynomial(a=params.get("a", Polynomial.a))


def _build_hinge(params: Mapping[str, float]) -> StalenessRule:
    b = params.get("b", Hinge.b)
    # Settings files and CLI flags deliver numbers as floats; accept 4.0 for b = 4 only.
    if isinstance(b, float):
        if not b.is_integer():
            raise ConfigError(f"hinge b must be an integer >= 0, got {b!r}")
        b = int(b)
    return Hinge(a=params.get("a", Hinge.a), b=b)


def _build_inverse_sqrt(params: Mapping[str, float]) -> StalenessRule:
    del params
    return InverseSqrt()


_RULES: dict[StalenessName, tuple[frozenset[str], Callable[[Mapping[str, float]], StalenessRule]]]
_RULES = {
    "constant": (frozenset(), _build_constant),
    "polynomial": (frozenset({"a"}), _build_polynomial),
    "hinge": (frozenset({"a", "b"}), _build_hinge),
    "inverse_sqrt": (frozenset(), _build_inverse_sqrt),
}


def staleness_rule(name: StalenessName, **params: float) -> StalenessRule:
    """Build a rule from settings, e.g. ``staleness_rule("hinge", a=10, b=4)``.

    Args:
        name: One of ``constant``, ``polynomial``, ``hinge``, ``inverse_sqrt``.
        **params: The rule's own parameters (``a`` for polynomial; ``a`` and ``b`` for hinge).

    Returns:
        The configured rule.

    Raises:
        ConfigError: For an unknown name, a parameter the rule does not take, or a bad value.
    """
    if name not in _RULES:
        raise ConfigError(
            f"unknown staleness rule {name!r}; choose one of {', '.join(STALENESS_NAMES)}"
        )
    accepted, build = _RULES[name]
    unexpected = sorted(set(params) - accepted)
    if unexpected:
        takes = ", ".join(sorted(accepted)) if accepted else "no parameters"
        raise ConfigError(
            f"staleness rule {name!r} does not take {', '.join(unexpected)} (takes {takes})"
        )
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"staleness parameter {key} must be a number, got {value!r}")
    return build(params)
