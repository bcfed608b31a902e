"""Device profiles: the shipped file, and clear errors for broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import ConfigError
from simulator.profiles import load_profiles


def test_shipped_profiles_cover_the_common_edge_boards() -> None:
    profiles = load_profiles()
    for name in ("rpi4-4gb", "rpi5-8gb", "jetson-nano-4gb", "jetson-orin-nano-8gb", "laptop"):
        assert name in profiles, name
    pi4, laptop = profiles["rpi4-4gb"], profiles["laptop"]
    assert pi4.memory_budget_mb < 4096 < laptop.memory_budget_mb
    assert pi4.slowdown == pytest.approx(10.0)
    assert laptop.availability.offline_s == 0
    assert profiles["phone-intermittent"].availability.offline_s > 0
    assert all(0 <= p.availability.dropout < 1 for p in profiles.values())


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "[pi]\nmemory_budget_mb = 100\nuplink_mbps = 1\ndownlink_mbps = 1\n",
            "relative_speed",
        ),
        (
            "[pi]\nmemory_budget_mb = 100\nrelative_speed = -1\nuplink_mbps = 1\n"
            "downlink_mbps = 1\n",
            "greater than 0",
        ),
        (
            "[pi]\nmemory_budget_mb = 100\nrelative_speed = 1\nuplink_mbps = 1\n"
            "downlink_mbps = 1\navailability = { offline_s = 5.0 }\n",
            "never online",
        ),
        (
            "[pi]\nmemory_budget_mb = 100\nrelative_speed = 1\nuplink_mbps = 1\n"
            "downlink_mbps = 1\ncolour = 'red'\n",
            "colour",
        ),
        ("pi = 3\n", "must be a table"),
        ("[pi\n", "cannot read"),
    ],
)
def test_broken_profile_is_refused_with_its_name_and_field(
    tmp_path: Path, body: str, expected: str
) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected) as caught:
        load_profiles(path)
    assert str(path) in str(caught.value)
