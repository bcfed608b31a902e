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
    "build_strategy",
    "make_strategy",
    "rule_for",
]

StrategyName = Literal["fedasync", "fedbuff"]
"""Names accepted by :func:`build_strategy` and :func:`make_strategy`."""

STRATEGY_NAMES: tuple[StrategyName, ...] = get_args(StrategyName)

_STRATEGY_PARAMS: dict[StrategyName, frozenset[str]] = {
    "fedasync": frozenset({"alpha"}),
    "fedbuff": frozenset({"buffer_size", "server_lr", "trim_ratio"}),
}

_UNBUFFERED = "fedasync does not buffer, so robust does not apply"


def build_strategy(
    name: StrategyName,
    *,
    rule: StalenessRule | None = None,
    alpha: float = 0.6,
    buffer_size: int = 3,
    server_lr: float = 1.0,
    robust: RobustMode | None = None,
    trim_ratio: float = 0.2,
) -> Strategy:
    """Build a strategy from values that are already typed; each class checks its own ranges.

    Args:
        name: ``fedasync`` or ``fedbuff``.
        rule: The staleness rule; None keeps the strategy's default (see :func:`rule_for`).
        alpha: FedAsync's mixing rate.
        buffer_size: FedBuff's K.
        server_lr: FedBuff's step on the reduced buffer.
        robust: FedBuff's reduction; None means none was asked for (FedBuff: ``mean``).
            FedAsync refuses any, since it has no buffer to reduce.
        trim_ratio: FedBuff's ``trimmed_mean`` cut.

    Returns:
        The configured strategy; the other strategy's parameters are ignored.

    Raises:
        ConfigError: A robust mode for FedAsync, or a value out of its strategy's range.
    """
    if name == "fedasync":
        if robust is not None:
            raise ConfigError(_UNBUFFERED)
        return FedAsync(alpha) if rule is None else FedAsync(alpha, rule=rule)
    mode = robust if robust is not None else "mean"
    if rule is None:
        return FedBuff(buffer_size, server_lr=server_lr, robust=mode, trim_ratio=trim_ratio)
    return FedBuff(buffer_size, server_lr=server_lr, rule=rule, robust=mode, trim_ratio=trim_ratio)


def rule_for(
    strategy: StrategyName, staleness: StalenessName | None, params: Mapping[str, float]
) -> StalenessRule | None:
    """The staleness rule named, or None for the strategy's own default.

    Raises:
        ConfigError: Rule parameters without a rule name (they would be silently dropped),
            or a rule that does not take them.
    """
    if staleness is not None:
        return staleness_rule(staleness, **params)
    if params:
        accepted = _STRATEGY_PARAMS[strategy] | ({"robust"} if strategy == "fedbuff" else set())
        takes = ", ".join(sorted(accepted))
        raise ConfigError(
            f"{strategy} does not take {', '.join(sorted(params))} (takes {takes}); "
            "rule parameters need a staleness rule name"
        )
    return None


def make_strategy(
    name: StrategyName,
    *,
    staleness: str | None = None,
    staleness_params: Mapping[str, float] | None = None,
    **params: float | str,
) -> Strategy:
    """Build a strategy from loose settings, e.g. ``make_strategy("fedbuff", buffer_size=4)``.

    Typed settings (:class:`aggregator.config.StrategySettings`) call :func:`build_strategy`
    directly; this parses keyword values (numbers may arrive as floats) into its arguments.

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
    own, rule_params = _split_params(name, _as_numbers(params), staleness_params or {})
    rule_name = None if staleness is None else _as_staleness_name(staleness)
    return build_strategy(
        name,
        rule=rule_for(name, rule_name, rule_params),
        alpha=own.get("alpha", 0.6),
        buffer_size=_as_int("buffer_size", own.get("buffer_size", 3)),
        robust=_as_requested_robust(name, robust),
        server_lr=own.get("server_lr", 1.0),
        trim_ratio=own.get("trim_ratio", 0.2),
    )


def _as_numbers(params: Mapping[str, float | str]) -> dict[str, float]:
    numbers: dict[str, float] = {}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        numbers[key] = value
    return numbers


def _split_params(
    name: StrategyName, numbers: Mapping[str, float], staleness_params: Mapping[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """Split keyword numbers into the strategy's own and its staleness rule's."""
    own = {key: value for key, value in numbers.items() if key in _STRATEGY_PARAMS[name]}
    rule_params = dict(staleness_params)
    for key, value in numbers.items():
        if key in own:
            continue
        if key in rule_params:
            raise ConfigError(f"rule parameter {key} given twice")
        rule_params[key] = value
    return own, rule_params


def _as_staleness_name(name: str) -> StalenessName:
    for known in STALENESS_NAMES:
        if name == known:
            return known
    raise ConfigError(
        f"unknown staleness rule {name!r}; choose one of {', '.join(STALENESS_NAMES)}"
    )


def _as_requested_robust(name: StrategyName, value: float | str | None) -> RobustMode | None:
    if value is None:
        return None
    if name == "fedasync":
        raise ConfigError(_UNBUFFERED)
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
