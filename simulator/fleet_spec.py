"""Fleet specs: a TOML file describing a whole simulated deployment, read into a FleetConfig.

A spec says which devices take part (how many of each profile, with per-class overrides
and a method or ``"planner"``), how the data is split, the task and strategy, and when to
stop (a target eval loss or accuracy, a duration, a version count). Every mistake is a
``ConfigError`` naming the file and the key. Layout (see ``simulator/fleets/``)::

    [fleet]        model, dataset, method, seed, train_samples, eval_samples, profiles,
                   time_scale, ack_timeout_s
    [data]         partition = "iid" | "dirichlet" | "size", alpha
    [train]        TrainSpec fields (local_steps, batch_size, seq_len, lr, ...)
    [strategy]     StrategySettings fields (name, staleness, buffer_size, server_lr, alpha, ...)
    [aggregator]   other AggregatorConfig fields (max_staleness, eval_every, eval_data, ...)
    [stop]         target_loss, target_accuracy, max_seconds, max_versions
    [sync]         clients_per_round, round_deadline_s (synchronous FedAvg rounds)
    [[devices]]    profile, count, method ("planner" or a method), cut and variant (split),
                   profile field overrides
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from aggregator.config import StrategySettings
from edgefed.data.sources import Partition, is_text_spec
from edgefed.settings import Settings
from schemas.errors import ConfigError
from schemas.messages import Method, SplitVariant, TrainSpec
from simulator.fleet import FleetConfig, aggregator_config
from simulator.profiles import DeviceSpec, device_spec, load_profiles

PLANNER: Literal["planner"] = "planner"
"""A device class whose method the memory planner picks from its profile's budget."""


class FleetSection(Settings):
    """``[fleet]``: the task every device works on."""

    name: str = ""
    model: str = "tiny"
    dataset: str = "synthetic"
    method: Method = "lora"
    seed: int = 0
    train_samples: int = Field(default=1600, ge=0)
    eval_samples: int = Field(default=500, ge=1)
    profiles: str | None = None
    """Profiles file, relative to the spec; default: the shipped ``devices.toml``."""
    ack_timeout_s: float = Field(default=30.0, gt=0)
    time_scale: float = Field(default=1.0, ge=1)
    """Run the clock this many times slower than real time (see ``FleetConfig.time_scale``);
    raise it when devices report host overruns."""


class DataSection(Settings):
    """``[data]``: how the training rows are split across the devices."""

    partition: Partition = "iid"
    alpha: float = Field(default=0.5, gt=0)


class StopSection(Settings):
    """``[stop]``: a target, a duration, a version count; at least one."""

    target_loss: float | None = Field(default=None, gt=0)
    target_accuracy: float | None = Field(default=None, gt=0, le=1)
    max_seconds: float = Field(default=0.0, ge=0)
    max_versions: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _bounded(self) -> StopSection:
        if not (self.max_seconds or self.max_versions):
            raise ValueError("set max_seconds or max_versions so a run that misses its target ends")
        return self


class SyncSection(Settings):
    """``[sync]``: how ``--mode sync`` cuts rounds (FedAvg client sampling and a deadline)."""

    clients_per_round: int | None = Field(default=None, ge=1)
    round_deadline_s: float | None = Field(default=None, gt=0)


class DeviceClass(Settings):
    """``[[devices]]``: ``count`` devices of one profile; other keys override the profile."""

    model_config = ConfigDict(frozen=True, extra="allow")
    profile: str = Field(min_length=1)
    count: int = Field(ge=1)
    method: Method | Literal["planner"] = PLANNER
    cut: int | None = Field(default=None, ge=1)
    """``split``: blocks the device runs (a planner device picks its own)."""
    variant: SplitVariant | None = None
    """``split``: ``vanilla`` or ``u_shaped`` (labels stay on the device)."""

    @model_validator(mode="after")
    def _split_options(self) -> DeviceClass:
        if self.method != "split" and self.cut is not None:
            raise ValueError(f"cut is a split option; this class trains {self.method!r}")
        if self.method not in ("split", PLANNER) and self.variant is not None:
            raise ValueError(f"variant is a split option; this class trains {self.method!r}")
        return self

    def trainer(self) -> dict[str, dict[str, bool | int | float | str]]:
        """This class's trainer options by method (the split shape it asks for)."""
        options: dict[str, bool | int | float | str] = {}
        if self.cut is not None:
            options["cut"] = self.cut
        if self.variant is not None:
            options["variant"] = self.variant
        return {"split": options} if options else {}


class FleetSpec(Settings):
    """A whole spec file, validated."""

    fleet: FleetSection = FleetSection()
    data: DataSection = DataSection()
    train: dict[str, Any] = Field(default_factory=dict)
    strategy: dict[str, Any] = Field(default_factory=dict)
    aggregator: dict[str, Any] = Field(default_factory=dict)
    stop: StopSection
    sync: SyncSection = SyncSection()
    devices: list[DeviceClass] = Field(min_length=1)


def load_fleet_spec(path: str | Path, **overrides: Any) -> FleetConfig:
    """Read the spec at ``path`` into a ``FleetConfig`` (``overrides`` replace its fields).

    Raises:
        ConfigError: Unreadable file, unknown key or profile, bad value or combination.
    """
    source = Path(path)
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read fleet spec {source}: {exc}") from exc
    return fleet_config(raw, where=source, **overrides)


def fleet_config(raw: dict[str, Any], *, where: Path, **overrides: Any) -> FleetConfig:
    """Turn a parsed spec into a ``FleetConfig`` (see :func:`load_fleet_spec`).

    Raises:
        ConfigError: As :func:`load_fleet_spec`.
    """
    try:
        spec = FleetSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"fleet spec {where} is invalid: {_problems(exc)}") from exc
    profiles_path = (where.parent / spec.fleet.profiles) if spec.fleet.profiles else None
    profiles = load_profiles(profiles_path)
    devices, methods, budgets = _expand(spec.devices, profiles, where=where)
    device_trainer = tuple(cls.trainer() for cls in spec.devices for _ in range(cls.count))
    task_method = spec.fleet.method
    _check_partition(spec, where=where)
    explicit = any(m is not None for m in methods)
    config = FleetConfig(
        model=spec.fleet.model,
        agents=len(devices),
        method=task_method,
        methods=tuple(task_method if m is None else m for m in methods) if explicit else (),
        budgets_mb=budgets,
        strategy=spec.strategy.get("name", "fedbuff"),
        seed=spec.fleet.seed,
        train_samples=spec.fleet.train_samples,
        dataset=spec.fleet.dataset,
        partition=spec.data.partition,
        alpha=spec.data.alpha,
        eval_samples=spec.fleet.eval_samples,
        max_versions=spec.stop.max_versions,
        max_seconds=spec.stop.max_seconds,
        ack_timeout_s=spec.fleet.ack_timeout_s,
        aggregator=spec.aggregator
        | ({"train": spec.train} if spec.train else {})
        | {"strategy": {k: v for k, v in spec.strategy.items() if k != "name"}},
        devices=tuple(devices),
        target_loss=spec.stop.target_loss,
        target_accuracy=spec.stop.target_accuracy,
        time_scale=spec.fleet.time_scale,
        device_trainer=device_trainer if any(device_trainer) else (),
        clients_per_round=spec.sync.clients_per_round,
        round_deadline_s=spec.sync.round_deadline_s,
    )
    config = replace(config, **overrides) if overrides else config
    _check_tables(spec, config, where=where)
    return config


def _check_partition(spec: FleetSpec, *, where: Path) -> None:
    """Only labelled text can be split by label or size; synthetic tokens have no labels.

    Raises:
        ConfigError: A non-IID partition of a dataset that is not labelled text.
    """
    if spec.data.partition != "iid" and not is_text_spec(spec.fleet.dataset):
        raise ConfigError(
            f"fleet spec {where}: partition {spec.data.partition!r} needs a labelled text "
            f"dataset, not {spec.fleet.dataset!r}"
        )


def _check_tables(spec: FleetSpec, config: FleetConfig, *, where: Path) -> None:
    """Validate the free-form tables now, so a mistake names the spec and not a later run.

    Raises:
        ConfigError: ``[strategy]``, ``[train]`` or the resulting aggregator settings are
            invalid; the message names the table and key.
    """
    for table, check in (
        ("strategy", lambda: StrategySettings.model_validate(spec.strategy)),
        ("train", lambda: TrainSpec.model_validate(spec.train)),
        ("aggregator", lambda: aggregator_config(config)),
    ):
        try:
            check()
        except ValidationError as exc:
            problems = _problems(exc, prefix=f"{table}.")
            raise ConfigError(f"fleet spec {where} is invalid: {problems}") from exc


def _expand(
    classes: list[DeviceClass], profiles: dict[str, DeviceSpec], *, where: Path
) -> tuple[list[DeviceSpec], list[Method | None], tuple[float | None, ...]]:
    """One device spec, method (None: the planner's choice) and budget per device."""
    devices: list[DeviceSpec] = []
    methods: list[Method | None] = []
    budgets: list[float | None] = []
    for index, cls in enumerate(classes):
        base = profiles.get(cls.profile)
        if base is None:
            raise ConfigError(
                f"fleet spec {where}: devices[{index}] names unknown profile {cls.profile!r}; "
                f"known: {', '.join(sorted(profiles))}"
            )
        fields = base.model_dump(exclude={"name"}) | dict(cls.model_extra or {})
        spec = device_spec(cls.profile, fields, where=f"{where} devices[{index}]")
        devices += [spec] * cls.count
        method: Method | None
        match cls.method:
            case "planner":
                method = None
            case chosen:
                method = chosen
        methods += [method] * cls.count
        # The planner sizes "planner" devices from their budget; a fixed method trains as is.
        budgets += [spec.memory_budget_mb if method is None else None] * cls.count
    return devices, methods, tuple(budgets)


def _problems(exc: ValidationError, *, prefix: str = "") -> str:
    return "; ".join(
        f"{prefix}{'.'.join(str(part) for part in error['loc']) or 'spec'}: {error['msg']}"
        for error in exc.errors()
    )
