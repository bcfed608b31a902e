"""Local training methods behind one ``Trainer`` protocol, looked up by method name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from peft import PeftModel
from pydantic import BaseModel, ValidationError

from edge_agent.trainers.base import FitResult, Trainer
from edge_agent.trainers.fwdgrad import FwdGradConfig, FwdGradTrainer
from edge_agent.trainers.kd import KdConfig, KdTrainer
from edge_agent.trainers.lora import LoraConfig, LoraTrainer
from edge_agent.trainers.split import SplitConfig, SplitTrainer
from edgefed.settings import SettingsT
from schemas.errors import ConfigError

__all__ = [
    "TRAINERS",
    "FitResult",
    "FwdGradConfig",
    "FwdGradTrainer",
    "KdConfig",
    "KdTrainer",
    "LoraConfig",
    "LoraTrainer",
    "SplitConfig",
    "SplitTrainer",
    "Trainer",
    "TrainerEntry",
    "check_trainer_options",
    "make_trainer",
    "register_trainer",
]


@dataclass(frozen=True)
class TrainerEntry:
    """How to build one method's trainer: its options model and a factory."""

    config_type: type[BaseModel]
    factory: Callable[[PeftModel, Any], Trainer]


TRAINERS: dict[str, TrainerEntry] = {}
"""Method name -> entry; filled by :func:`register_trainer`."""

_PLANNED: tuple[str, ...] = ()


def register_trainer(
    method: str, config_type: type[BaseModel], factory: Callable[[PeftModel, Any], Trainer]
) -> None:
    """Make ``method`` available to :func:`make_trainer`.

    Raises:
        ConfigError: ``method`` is registered already.
    """
    if method in TRAINERS:
        raise ConfigError(f"a trainer for {method!r} is registered already")
    TRAINERS[method] = TrainerEntry(config_type=config_type, factory=factory)


def check_trainer_options(method: str | None, options: Mapping[str, object]) -> None:
    """Refuse options no trainer takes, or values a trainer would refuse, before any task.

    The ``[trainer]`` table applies to whichever method the agent runs: ``method`` when the
    agent fixes it, else any (the task's or the planner's choice), so each method's own
    options must hold for it.

    Raises:
        ConfigError: An option no candidate method has, or a value of the wrong type or range.
    """
    methods = [method] if method is not None else sorted(TRAINERS)
    known: set[str] = set()
    for name in methods:
        entry = TRAINERS.get(name)
        if entry is None:
            continue  # make_trainer names the unknown method when the agent uses it
        fields = set(entry.config_type.model_fields)
        known |= fields
        _validate(name, entry.config_type, {k: v for k, v in options.items() if k in fields})
    unknown = sorted(options.keys() - known)
    if unknown:
        raise ConfigError(
            f"trainer option(s) {unknown} belong to no trainer of {methods}; options: "
            f"{sorted(known)}"
        )


def _validate(
    method: str, config_type: type[SettingsT], options: Mapping[str, object]
) -> SettingsT:
    try:
        return config_type.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"{method} trainer options: {problems}") from None


def make_trainer(method: str, model: PeftModel, **config: object) -> Trainer:
    """Build the trainer for ``method`` on ``model``; ``config`` fills its options model.

    Raises:
        ConfigError: Unknown or not yet implemented method, or an invalid config option.
    """
    entry = TRAINERS.get(method)
    if entry is None:
        if method in _PLANNED:
            raise ConfigError(
                f"method {method!r} has no trainer yet; available: {sorted(TRAINERS)}"
            )
        raise ConfigError(f"unknown method {method!r}; available: {sorted(TRAINERS)}")
    fields = set(entry.config_type.model_fields)
    unknown = sorted(config.keys() - fields)
    if unknown:
        raise ConfigError(f"{method} trainer has no option(s) {unknown}; options: {sorted(fields)}")
    return entry.factory(model, _validate(method, entry.config_type, config))


register_trainer("lora", LoraConfig, LoraTrainer)
register_trainer("fwdgrad", FwdGradConfig, FwdGradTrainer)
register_trainer("kd", KdConfig, KdTrainer)
register_trainer("split", SplitConfig, SplitTrainer)
