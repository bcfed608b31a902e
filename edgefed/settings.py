"""Loading a command's configuration: TOML file, then ``EDGEFED_*`` variables, then flags.

Every table of a configuration is a frozen pydantic model (:class:`Settings`). The
top-level settings of a command (the agent's, the aggregator's) are a
:class:`CommandSettings`, which pydantic-settings fills from three sources when
:func:`load_settings` reads them for a command: the TOML file, environment variables named
``EDGEFED_<KEY>`` (``EDGEFED_<TABLE>__<KEY>`` inside a table), and the command line's flags,
each overriding the one before. Built in code (the simulator, tests), the same models take
only what the caller passes. This module turns every failure into a ``ConfigError`` that
names the key and where it came from.
"""

from __future__ import annotations

import contextvars
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseModel)

ENV_PREFIX = "EDGEFED_"
"""Environment variables that set a key: ``EDGEFED_FEDERATION``, ``EDGEFED_MQTT__URL``."""


PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A finite number above zero (a rate, a step, a clip bound)."""


class Settings(BaseModel):
    """Base of configuration models: immutable and strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class _Loading:
    """What :func:`load_settings` reads besides the flags: the file, if any, and the env."""

    path: Path | None


_LOADING: contextvars.ContextVar[_Loading | None] = contextvars.ContextVar(
    "edgefed_settings_loading", default=None
)


class CommandSettings(BaseSettings):
    """Top-level settings of a command: one key per command-line option, same names.

    Read by :func:`load_settings`, a key comes from the flags, else the environment, else
    the TOML file; built directly, only from the arguments given.
    """

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then ``EDGEFED_*``, then the file, only while a command loads its config."""
        del dotenv_settings, file_secret_settings  # no .env files, no secret directories
        loading = _LOADING.get()
        if loading is None:
            return (init_settings,)
        if loading.path is None:
            return (init_settings, env_settings)
        toml = TomlConfigSettingsSource(settings_cls, toml_file=loading.path)
        return (init_settings, env_settings, toml)


def load_settings(cls: type[SettingsT], path: str | Path | None, **overrides: Any) -> SettingsT:
    """The settings a command runs with: ``path`` (TOML), ``EDGEFED_*``, then ``overrides``.

    Overrides whose value is ``None`` (flags not given) are ignored, so the environment's or
    the file's value stays. A model that is not a :class:`CommandSettings` reads the file
    and the overrides only.

    Raises:
        ConfigError: The file cannot be read, a key is unknown or missing, or a value is
            invalid; the message names the key and the file.
    """
    file = None if path is None else Path(path)
    raw: dict[str, Any] = {}
    if file is not None:
        try:  # read here too, so an unreadable file is named before any source runs
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read configuration {file}: {exc}") from exc
    given = {key: value for key, value in overrides.items() if value is not None}
    token = _LOADING.set(_Loading(path=file))
    try:
        if issubclass(cls, CommandSettings):
            return cls(**given)
        return cls.model_validate(raw | given)
    except ValidationError as exc:
        raise ConfigError(_explain(cls, exc, file)) from None
    finally:
        _LOADING.reset(token)


def _explain(cls: type[BaseModel], exc: ValidationError, file: Path | None) -> str:
    """One line per problem, naming the key and every place it may be set."""
    where = f" in {file}" if file is not None else ""
    lines = [f"invalid configuration for {cls.__name__}{where}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "missing" and len(error["loc"]) == 1:
            flag = "--" + key.replace("_", "-")
            env = ENV_PREFIX + key.upper()
            lines.append(f"  {key}: missing; set it in the file, as {flag} or as {env}")
        elif error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{where}")
        else:
            lines.append(f"  {key}: {error['msg']}")
    return "\n".join(lines)
