"""Merge strategies (docs/architecture.md §5) and a factory that builds one from settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from aggregator.staleness import STALENESS_NAMES, StalenessName, StalenessRule, staleness_rule
from aggregator.strategies.base import MergeResult, Strategy, StrategyWrapper
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedbuff import ROBUST_MODES, BufferedDelta, FedBuff, RobustMode
from schemas.errors import ConfigError

__all__ = [
    "ROBUST_MODES",
    "STRATEGY_NAMES",
    "BufferedDelta",
    "FedAsync",
    "FedBuff",
    "MergeResult",
    "RobustMode",
    "Strategy",
    "StrategyName",
    "StrategyWrapper",
    "make_strategy",
]

StrategyName = Literal["fedasync", "fedbuff"]
"""Names accepted by :func:`make_strategy`."""

STRATEGY_NAMES: tuple[StrategyName, ...] = get_args(StrategyName)

_STRATEGY_PARAMS: dict[StrategyName, frozenset[str]] = {
    "fedasync": frozenset({"alpha"}),
    "fedbuff": frozenset({"buffer_size", "server_lr", "trim_ratio"}),
}


def _as_staleness_name(name: str) -> StalenessName:
    for known in STALENESS_NAMES:
        if name == known:
            return known
    raise ConfigError(
        f"unknown staleness rule {name!r}; choose one of {', '.join(STALENESS_NAMES)}"
    )


def _as_robust_mode(value: float | str) -> RobustMode:
    for known in ROBUST_MODES:
        if value == known:
            return known
    raise ConfigError(f"fedbuff robust must be one of {', '.join(ROBUST_MODES)}, got {value!r}")


def _as_int(key: str, value: float) -> int:
    # Settings often arrive as floats; 3.0 is a fine buffer size, 2.5 is not.
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    return value


def make_strategy(
    name: StrategyName,
    *,
    staleness: str | None = None,
    staleness_params: Mapping[str, float] | None = None,
    **params: float | str,
) -> Strategy:
    """Build a strategy from settings, e.g. ``make_strategy("fedbuff", buffer_size=4)``.

    Args:
        name: ``fedasync`` or ``fedbuff``.
        staleness: A staleness rule name; None keeps the strategy's default
            (FedAsync: polynomial a = 0.5, FedBuff: inverse_sqrt).
        staleness_params: Parameters of that rule (``a``, ``b``). Rule parameters may also
            be given directly in ``params``.
        **params: The strategy's own parameters: ``alpha`` for FedAsync; ``buffer_size``,
            ``server_lr``, ``trim_ratio`` and ``robust`` (``mean``, ``median`` or
            ``trimmed_mean``, the only text value) for FedBuff. Any other name is taken as a
            parameter of the staleness rule.

    Returns:
        The configured strategy.

    Raises:
        ConfigError: For an unknown name, a parameter that does not apply, or a bad value.
    """
    if name not in _STRATEGY_PARAMS:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    robust = params.pop("robust", None)
    numbers: dict[str, float] = {}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        numbers[key] = value
    own = {key: value for key, value in numbers.items() if key in _STRATEGY_PARAMS[name]}
    rule_params = dict(staleness_params or {})
    for key, value in numbers.items():
        if key in own:
            continue
        if key in rule_params:
            raise ConfigError(f"rule parameter {key} given twice")
        rule_params[key] = value
    rule: StalenessRule | None = None
    if staleness is not None:
        rule = staleness_rule(_as_staleness_name(staleness), **rule_params)
    elif rule_params:
        accepted = _STRATEGY_PARAMS[name] | ({"robust"} if name == "fedbuff" else set())
        takes = ", ".join(sorted(accepted))
        raise ConfigError(
            f"{name} does not take {', '.join(sorted(rule_params))} (takes {takes}); "
            "rule parameters need a staleness rule name"
        )
    if name == "fedasync":
        if robust is not None:
            raise ConfigError("fedasync does not buffer, so robust does not apply")
        alpha = own.get("alpha", 0.6)
        return FedAsync(alpha, rule=rule) if rule is not None else FedAsync(alpha)
    buffer_size = _as_int("buffer_size", own.get("buffer_size", 3))
    server_lr = own.get("server_lr", 1.0)
    trim_ratio = own.get("trim_ratio", 0.2)
    mode = _as_robust_mode(robust if robust is not None else "mean")
    if rule is None:
        return FedBuff(buffer_size, server_lr=server_lr, robust=mode, trim_ratio=trim_ratio)
    return FedBuff(buffer_size, server_lr=server_lr, rule=rule, robust=mode, trim_ratio=trim_ratio)
