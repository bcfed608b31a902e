import dataclasses
import itertools
import math

import pytest

from aggregator.staleness import (
    STALENESS_NAMES,
    Constant,
    Hinge,
    InverseSqrt,
    Polynomial,
    StalenessRule,
    staleness_rule,
)
from schemas.errors import ConfigError


@pytest.mark.parametrize("tau", [0, 1, 5, 1000])
def test_constant_is_one_at_any_staleness(tau: int) -> None:
    assert Constant()(tau) == 1.0


@pytest.mark.parametrize(
    ("a", "tau", "expected"),
    [
        (0.5, 0, 1.0),
        (0.5, 3, 0.5),  # 4^-0.5
        (0.5, 8, 1 / 3),  # 9^-0.5
        (0.5, 15, 0.25),  # 16^-0.5
        (1.0, 1, 0.5),  # 2^-1
        (1.0, 4, 0.2),  # 5^-1
        (2.0, 2, 1 / 9),  # 3^-2
        (0.0, 7, 1.0),  # a = 0 degenerates to constant
    ],
)
def test_polynomial_matches_hand_values(a: float, tau: int, expected: float) -> None:
    assert Polynomial(a)(tau) == pytest.approx(expected, rel=1e-12)


def test_polynomial_default_exponent_is_one_half() -> None:
    assert Polynomial().a == 0.5
    assert Polynomial()(3) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        (0, 1.0),
        (3, 1.0),
        (4, 1.0),  # the hinge point itself still counts fully
        (5, 1 / 11),  # 1 / (10 * 1 + 1)
        (6, 1 / 21),  # 1 / (10 * 2 + 1)
        (14, 1 / 101),  # 1 / (10 * 10 + 1)
    ],
)
def test_hinge_default_matches_hand_values(tau: int, expected: float) -> None:
    assert Hinge()(tau) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("tau", "expected"),
    [(2, 1.0), (3, 2 / 3), (4, 0.5), (6, 1 / 3)],  # 1 / (0.5 * (tau - 2) + 1)
)
def test_hinge_custom_parameters_match_hand_values(tau: int, expected: float) -> None:
    assert Hinge(a=0.5, b=2)(tau) == pytest.approx(expected, rel=1e-12)


def test_hinge_zero_b_decays_from_first_step() -> None:
    rule = Hinge(a=1.0, b=0)
    assert rule(0) == 1.0
    assert rule(1) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("tau", "expected"), [(0, 1.0), (1, 1 / math.sqrt(2)), (3, 0.5), (8, 1 / 3), (24, 0.2)]
)
def test_inverse_sqrt_matches_hand_values(tau: int, expected: float) -> None:
    assert InverseSqrt()(tau) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rule", [Constant(), Polynomial(), Hinge(), InverseSqrt()])
def test_rule_negative_staleness_raises(rule: StalenessRule) -> None:
    with pytest.raises(ValueError, match="staleness"):
        rule(-1)


@pytest.mark.parametrize("rule", [Constant(), Polynomial(), Hinge(), InverseSqrt()])
def test_rule_never_increases_with_staleness(rule: StalenessRule) -> None:
    values = [rule(tau) for tau in range(30)]
    assert all(0 < later <= earlier for earlier, later in itertools.pairwise(values))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Polynomial(-0.5),
        lambda: Polynomial(math.nan),
        lambda: Polynomial(math.inf),
        lambda: Hinge(a=-1.0),
        lambda: Hinge(b=-1),
        lambda: Hinge(b=1.5),  # type: ignore[arg-type]
        lambda: Hinge(b=True),
    ],
)
def test_rule_bad_parameters_raise_config_error(build: object) -> None:
    assert callable(build)
    with pytest.raises(ConfigError):
        build()


def test_rule_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="polynomial a"):
        Polynomial(-1.0)


def test_rule_is_frozen_and_comparable() -> None:
    rule = Hinge(a=2.0, b=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.a = 1.0  # type: ignore[misc]
    assert rule == Hinge(a=2.0, b=3)
    assert len({rule, Hinge(a=2.0, b=3)}) == 1


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("constant", {}, Constant()),
        ("polynomial", {}, Polynomial(0.5)),
        ("polynomial", {"a": 1.0}, Polynomial(1.0)),
        ("hinge", {}, Hinge(10.0, 4)),
        ("hinge", {"a": 2.0, "b": 3.0}, Hinge(2.0, 3)),
        ("hinge", {"b": 2}, Hinge(10.0, 2)),
        ("inverse_sqrt", {}, InverseSqrt()),
    ],
)
def test_staleness_rule_factory_builds_each_rule(
    name: str, params: dict[str, float], expected: StalenessRule
) -> None:
    rule = staleness_rule(name, **params)  # type: ignore[arg-type]
    assert rule == expected


def test_staleness_rule_factory_covers_every_name() -> None:
    assert set(STALENESS_NAMES) == {"constant", "polynomial", "hinge", "inverse_sqrt"}
    for name in STALENESS_NAMES:
        assert staleness_rule(name)(0) == 1.0


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("exponential", {}, "unknown staleness rule"),
        ("constant", {"a": 1.0}, "does not take a"),
        ("polynomial", {"b": 1.0}, "does not take b"),
        ("hinge", {"c": 1.0}, "does not take c"),
        ("hinge", {"b": 2.5}, "integer"),
        ("hinge", {"a": -1.0}, "hinge a"),
        ("polynomial", {"a": "big"}, "must be a number"),
        ("polynomial", {"a": True}, "must be a number"),
    ],
)
def test_staleness_rule_factory_rejects_bad_input(
    name: str, params: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        staleness_rule(name, **params)  # type: ignore[arg-type]
