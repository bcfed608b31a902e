"""Loading TOML configuration files into validated pydantic settings.

Agents and the aggregator each define their settings as a frozen pydantic model;
this module is the one place that reads the file and turns validation failures
into a readable ``ConfigError``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseModel)


class Settings(BaseModel):
    """Base of configuration models: immutable and strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def load_settings(cls: type[SettingsT], path: str | Path | None, **overrides: Any) -> SettingsT:
    """Read ``path`` (TOML) if given, apply command-line ``overrides``, validate.

    Overrides whose value is ``None`` are ignored so unset options keep the file's value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    raw.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration for {cls.__name__}: {exc}") from exc
