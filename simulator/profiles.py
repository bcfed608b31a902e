"""Device profiles: what a class of device can hold, how fast it computes, how it is linked.

Profiles live in TOML files (``simulator/profiles/devices.toml`` ships the common edge
boards); a fleet spec names them and may override any field per device class. The
simulator emulates a profile on this host: compute by scaling each step's measured CPU time
by ``1 / relative_speed``, the network by delaying each transfer by latency plus
size / bandwidth, availability by offline periods and dropped fits (``simulator.network``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from edgefed.settings import Settings
from schemas.errors import ConfigError

PROFILES_FILE = Path(__file__).parent / "profiles" / "devices.toml"
"""The profiles shipped with the simulator."""


class Availability(Settings):
    """When a device is reachable, and how often it vanishes mid-fit."""

    online_s: float = Field(default=0.0, ge=0)
    """Length of each online period (0 with ``offline_s`` 0: always online)."""
    offline_s: float = Field(default=0.0, ge=0)
    """Length of each offline period between online ones (0: never offline)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Chance that one fit is lost (the device drops off before sending it)."""

    @model_validator(mode="after")
    def _periods_pair(self) -> Availability:
        if self.offline_s > 0 and self.online_s <= 0:
            raise ValueError("offline_s > 0 needs online_s > 0 (the device is never online)")
        return self


class DeviceSpec(Settings):
    """One device class: memory, compute and network as the simulator emulates them."""

    name: str = Field(min_length=1)
    description: str = ""
    memory_budget_mb: float = Field(gt=0)
    relative_speed: float = Field(gt=0, le=100)
    """Compute speed relative to the simulating host (0.1 = ten times slower)."""
    uplink_mbps: float = Field(gt=0)
    downlink_mbps: float = Field(gt=0)
    latency_ms: float = Field(default=0.0, ge=0)
    availability: Availability = Availability()

    @property
    def slowdown(self) -> float:
        """How many times longer a step takes than on the host."""
        return 1.0 / self.relative_speed


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceSpec]:
    """Read a profiles file (default: the shipped one) into specs keyed by name.

    Raises:
        ConfigError: The file cannot be read, or a profile is incomplete or out of range
            (the message names the profile and the field).
    """
    source = Path(path) if path is not None else PROFILES_FILE
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read device profiles {source}: {exc}") from exc
    profiles: dict[str, DeviceSpec] = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: profile {name!r} must be a table, got {table!r}")
        profiles[name] = device_spec(name, table, where=str(source))
    if not profiles:
        raise ConfigError(f"{source} defines no device profiles")
    return profiles


def device_spec(name: str, fields: dict[str, Any], *, where: str) -> DeviceSpec:
    """Validate one profile's fields; errors say which file and profile.

    Raises:
        ConfigError: A field is missing, unknown or out of range.
    """
    try:
        return DeviceSpec.model_validate({"name": name, **fields})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'profile'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"{where}: device profile {name!r} is invalid: {problems}") from exc
