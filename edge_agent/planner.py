"""Each device picks the method and step shape that fit its memory budget (docs/architecture.md §7).

:func:`plan_training` walks the task's allowed methods in preference order and, for each, the
step shapes from the task's own (batch x sequence length) down by halves; the first that the
estimate (``edge_agent.memory_estimate``, times this device's calibration ratio when that
is above one) fits in the budget wins. A preferred method is taken only at a shape of at least ``min_fraction`` of the
task's tokens per step; when no method reaches that, any shape of any method goes, in the
same order; when nothing fits, the answer is :class:`CannotFit` with the smallest
requirement, never an out-of-memory crash. The LoRA rank is the task's: every device must
train the same adapter layout. K does not change the peak of central differences.

:class:`DeviceSizer` is the agent's side: it plans, measures the real peak of the first fit
of each plan, stores measured/estimated per method (in ``state_dir`` when there is one) and
plans again when the real peak exceeded the budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, get_args

from edge_agent.budget import Budget, PeakMeter, current_rss_mb, device_budget
from edge_agent.memory_estimate import (
    ESTIMATORS,
    RUNTIME_MB,
    ModelShape,
    StepShape,
    estimate,
    model_shape,
)
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, Method, Task, TrainSpec

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

log = logging.getLogger(__name__)

MIN_FRACTION = 0.25
"""A preferred method must fit at least this share of the task's tokens per step."""
HEADROOM = 0.3
"""Kept free beyond the estimated step memory (all but runtime and weights): measured peaks
of the same method scatter by this much between shapes (bench/RESULTS.md, memory planner)."""
CALIBRATION_FILE = "memory_calibration.json"
T = TypeVar("T")
StatusValue = str | int | float | bool
_TrainerOptions = Mapping[str, Mapping[str, object]]
_Candidate = tuple[Method, int, int, int | None]
"""A step to try: method, batch size, sequence length and (split only) cut."""


def estimator_key(method: str, trainer: Mapping[str, object] | None = None) -> str:
    """The estimate for ``method`` with these trainer options (jvp costs more, kd its local)."""
    options = trainer or {}
    if method == "fwdgrad" and options.get("mode") == "jvp":
        return "fwdgrad-jvp"
    if method == "kd" and options.get("local") == "fwdgrad":
        return "kd-fwdgrad"
    return method


@dataclass(frozen=True)
class Plan:
    """The method and step shape a device trains with, and what it expects that to cost."""

    method: Method
    batch_size: int
    seq_len: int
    rank: int
    perturbations: int
    estimate_mb: float
    budget_mb: float
    budget_source: str
    ratio: float = 1.0
    """Calibration (measured/estimated) already applied to ``estimate_mb``."""
    cut: int | None = None
    """``split`` only: blocks the device runs."""
    measured_mb: float | None = None
    state: str = "fits"

    def train_spec(self, base: TrainSpec) -> TrainSpec:
        """The task's ``TrainSpec`` with this plan's batch size and sequence length."""
        return base.model_copy(update={"batch_size": self.batch_size, "seq_len": self.seq_len})

    def to_status(self) -> dict[str, StatusValue]:
        """The plan as the flat map a ``Status`` carries (MiB rounded to 0.1)."""
        return {
            k: round(v, 3 if k == "ratio" else 1) if isinstance(v, float) else v
            for k, v in asdict(self).items()
            if v is not None
        }


@dataclass(frozen=True)
class CannotFit:
    """Nothing allowed fits: the smallest budget that would (headroom included)."""

    required_mb: float
    method: str
    batch_size: int
    seq_len: int
    budget_mb: float
    budget_source: str
    state: str = "cannot_fit"

    def to_status(self) -> dict[str, StatusValue]:
        """The refusal as the flat map a ``Status`` carries."""
        out = asdict(self)
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def _halvings(start: int, floor: int) -> list[int]:
    values = [start]
    while values[-1] // 2 >= floor:
        values.append(values[-1] // 2)
    return values


def candidate_shapes(train: TrainSpec) -> list[tuple[int, int]]:
    """(batch, seq_len) from the task's down by halves, most tokens first, longer seq first.

    Sequence length goes down to a quarter of the task's (not below 2); batch to 1.
    """
    seqs = _halvings(train.seq_len, max(2, train.seq_len // 4))
    pairs = [(b, s) for b in _halvings(train.batch_size, 1) for s in seqs]
    return sorted(pairs, key=lambda p: (-p[0] * p[1], -p[1]))


def split_cuts(layers: int) -> list[int]:
    """Cuts a split device tries, deepest first: half the blocks, then halves down to 1.

    A deeper cut keeps more of the model (and its activations) private and takes load off
    the server; a device goes shallower only when its memory requires it.
    """
    if layers < 2:
        return [1]
    return _halvings(max(1, layers // 2), 1)


def plan_training(
    model: ModelShape,
    *,
    budget: Budget,
    methods: Sequence[Method],
    train: TrainSpec,
    lora: LoraSpec,
    runtime_mb: float = RUNTIME_MB,
    calibration: Mapping[str, float] | None = None,
    trainer: Mapping[str, Mapping[str, object]] | None = None,
    min_fraction: float = MIN_FRACTION,
    headroom: float = HEADROOM,
) -> Plan | CannotFit:
    """Pick the first method (in ``methods`` order) and largest shape that fit ``budget``.

    Args:
        model: Sizes of the base model.
        budget: The device's budget.
        methods: Allowed methods, preferred first.
        train: The task's step settings (the largest shape considered).
        lora: The task's adapter (rank and targets are kept).
        runtime_mb: What the process holds before the model is built.
        calibration: Measured/estimated ratio per estimator key, from earlier steps.
        trainer: Trainer options by method (``fwdgrad`` in ``jvp`` mode costs more).
        min_fraction: Share of the task's tokens a preferred method must reach.
        headroom: Fraction of the step's own memory (all but runtime and weights) kept free;
            a shape fits when ``estimate + headroom x step memory <= budget``.

    Raises:
        ConfigError: No method in ``methods`` has an estimate (others are skipped).
    """
    options = trainer or {}
    sized = _estimated_methods(methods, options)
    costs = _StepCosts(
        model,
        train=train,
        lora=lora,
        runtime_mb=runtime_mb,
        calibration=calibration or {},
        trainer=options,
        headroom=headroom,
    )
    shapes, cuts = candidate_shapes(train), split_cuts(model.layers)
    min_tokens = min_fraction * train.batch_size * train.seq_len
    for method, batch, seq, cut in _candidates(sized, shapes, cuts, min_tokens=min_tokens):
        plan = costs.fitting_plan(method, batch, seq, cut, budget=budget)
        if plan is not None:
            return plan
    return costs.smallest_refusal(sized, shapes[-1], cut=cuts[-1], budget=budget)


def _estimated_methods(methods: Sequence[Method], options: _TrainerOptions) -> list[Method]:
    """The methods that have a memory estimate; the others are logged and left out.

    Raises:
        ConfigError: None of ``methods`` has one.
    """
    sized = [m for m in methods if estimator_key(m, options.get(m)) in ESTIMATORS]
    if len(sized) < len(methods):
        log.warning("no memory estimate for %s: not planned", sorted(set(methods) - set(sized)))
    if not sized:
        raise ConfigError(f"none of the methods {list(methods)} has a memory estimate")
    return sized


def _candidates(
    methods: Sequence[Method],
    shapes: Sequence[tuple[int, int]],
    cuts: Sequence[int],
    *,
    min_tokens: float,
) -> list[_Candidate]:
    """Every (method, batch, seq_len, cut) in the order they are tried.

    First each method in preference order at the shapes of at least ``min_tokens`` per step,
    then every shape, largest first, with any method.
    """

    def cuts_of(method: Method) -> Sequence[int | None]:
        return cuts if method == "split" else (None,)

    preferred = [
        (m, b, s, c) for m in methods for b, s in shapes if b * s >= min_tokens for c in cuts_of(m)
    ]
    any_shape = [(m, b, s, c) for b, s in shapes for m in methods for c in cuts_of(m)]
    return preferred + any_shape


@dataclass(frozen=True)
class _StepCosts:
    """The memory estimate of any candidate step of one task, calibrated, with headroom."""

    model: ModelShape
    train: TrainSpec
    lora: LoraSpec
    runtime_mb: float
    calibration: Mapping[str, float]
    trainer: _TrainerOptions
    headroom: float

    def of(
        self, method: Method, batch: int, seq: int, cut: int | None = None
    ) -> tuple[float, float, float]:
        """(budget needed, calibrated estimate, ratio) of one step (split: at ``cut``)."""
        key = estimator_key(method, self.trainer.get(method))
        step = StepShape(
            batch=batch,
            seq_len=seq,
            rank=self.lora.rank,
            targets=self.lora.target_modules,
            perturbations=self.train.perturbations,
            cut=cut,
        )
        # Calibration only ever raises an estimate: peaks of one shape scatter by ~10% between
        # processes, so a low first measurement must not loosen the next plan into an overrun.
        ratio = max(self.calibration.get(key, 1.0), 1.0)
        found = estimate(self.model, step, key, runtime_mb=self.runtime_mb)
        mb = found.total_mb * ratio
        return mb + self.headroom * found.step_mb, mb, ratio

    def fitting_plan(
        self, method: Method, batch: int, seq: int, cut: int | None, *, budget: Budget
    ) -> Plan | None:
        """The plan for this step when it fits ``budget``, headroom included; else None."""
        need, mb, ratio = self.of(method, batch, seq, cut)
        if need > budget.mb:
            return None
        return Plan(
            method=method,
            batch_size=batch,
            seq_len=seq,
            rank=self.lora.rank,
            perturbations=self.train.perturbations,
            estimate_mb=mb,
            budget_mb=budget.mb,
            budget_source=budget.source,
            ratio=ratio,
            cut=cut,
        )

    def smallest_refusal(
        self, methods: Sequence[Method], shape: tuple[int, int], *, cut: int, budget: Budget
    ) -> CannotFit:
        """The refusal naming the least any method needs, at ``shape`` (split at ``cut``)."""
        batch, seq = shape
        required, method = min(
            (self.of(m, batch, seq, cut if m == "split" else None)[0], m) for m in methods
        )
        return CannotFit(
            required_mb=required,
            method=method,
            batch_size=batch,
            seq_len=seq,
            budget_mb=budget.mb,
            budget_source=budget.source,
        )


class DeviceSizer:
    """An agent's planner: plans, measures the first fit of each plan, corrects itself."""

    def __init__(
        self,
        budget: Budget,
        *,
        methods: tuple[Method, ...] = (),
        trainer: Mapping[str, object] | None = None,
        state_dir: str | None = None,
        calibrate: bool = True,
    ) -> None:
        """Plan within ``budget``; ``methods`` (if any) replaces the task's allowed methods.

        ``calibrate=False`` is for agents sharing a process: no measuring, and the runtime
        term is :data:`RUNTIME_MB` (a process of its own) rather than this process's RSS.
        """
        self.budget = budget
        self._methods = methods
        self._trainer = dict(trainer or {})
        self._path = Path(state_dir) / CALIBRATION_FILE if state_dir else None
        self._calibrate = calibrate
        self.calibration: dict[str, float] = self._load()
        self._runtime_mb: float | None = None
        self._measured: set[Plan] = set()

    @classmethod
    def from_config(cls, config: AgentConfig, *, device: str = "cpu") -> DeviceSizer | None:
        """The sizer an agent's config asks for; None when it has no budget to plan in.

        On a ``cuda`` device the budget is the GPU's memory (unless the profile sets one).
        """
        configured = config.profile.memory_budget_mb
        if configured is None and not config.budget_from_os:
            return None
        return cls(
            device_budget(configured, device=device),
            methods=(config.method,) if config.method else (),
            trainer=config.trainer,
            state_dir=config.state_dir,
            calibrate=not config.shared_process,
        )

    def _load(self) -> dict[str, float]:
        if self._path is None or not self._path.is_file():
            return {}
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable memory calibration %s: %s", self._path, exc)
            return {}
        return {str(k): float(v) for k, v in data.items()}

    def _save(self) -> None:
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._path.write_text(json.dumps(self.calibration, sort_keys=True), encoding="utf-8")

    def plan(self, task: Task) -> Plan | CannotFit:
        """Plan ``task`` on this device (before its model is built: runtime = RSS now).

        Raises:
            ConfigError: The model cannot be sized, or no allowed method can be estimated.
        """
        if self._runtime_mb is None:
            self._runtime_mb = current_rss_mb() if self._calibrate else RUNTIME_MB
        methods = self._methods or task.methods or (task.method,)
        method_options: dict[str, Mapping[str, object]] = dict.fromkeys(methods, self._trainer)
        return plan_training(
            model_shape(task.model.name),
            budget=self.budget,
            methods=methods,
            train=task.train,
            lora=task.lora,
            runtime_mb=self._runtime_mb,
            calibration=self.calibration,
            trainer=method_options,
        )

    def needs_measuring(self, plan: Plan | None) -> bool:
        """Whether the next fit under ``plan`` is the first one (and should be measured)."""
        return self._calibrate and plan is not None and plan not in self._measured

    def measure(self, fit: Callable[[], T], *, device: str = "cpu") -> tuple[T, PeakMeter]:
        """Run ``fit`` and measure its peak (a worker-thread call, like the fit itself)."""
        with PeakMeter(device) as meter:
            result = fit()
        return result, meter

    def observe(self, plan: Plan, task: Task, meter: PeakMeter) -> tuple[Plan, Plan | CannotFit]:
        """Record the measured peak of ``plan``; return it measured, and the plan to go on with.

        The ratio measured/estimated (uncalibrated) is stored for the method; a plan whose
        real peak exceeded the budget is replaced by a new plan made with that ratio.
        """
        key = estimator_key(plan.method, self._trainer)
        raw = plan.estimate_mb / plan.ratio
        if meter.exact:
            self.calibration[key] = meter.peak_mb / raw
            self._save()
        measured = replace(plan, measured_mb=meter.peak_mb)
        self._measured.update((plan, measured))
        if meter.peak_mb <= self.budget.mb:
            return measured, measured
        log.warning(
            "step peak %.0f MB exceeded the %.0f MB budget (estimated %.0f); planning again",
            meter.peak_mb,
            self.budget.mb,
            plan.estimate_mb,
        )
        return measured, self.plan(task)


def run(args: argparse.Namespace) -> int:
    """``edgefed plan``: print the plan for a model and budget, without training."""
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    allowed = get_args(Method)
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        sys.stderr.write(f"edgefed plan: unknown method(s) {bad}; choose from {allowed}\n")
        return 2
    budget = device_budget(args.budget_mb)
    train = TrainSpec(batch_size=args.batch, seq_len=args.seq, perturbations=args.k)
    lora = LoraSpec(rank=args.rank)
    try:
        plan = plan_training(
            model_shape(args.model),
            budget=budget,
            methods=methods,
            train=train,
            lora=lora,
        )
    except ConfigError as exc:
        sys.stderr.write(f"edgefed plan: {exc}\n")
        return 2
    out = {"model": args.model} | plan.to_status()
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.writelines(f"{key:>14}: {value}\n" for key, value in out.items())
    return 0 if isinstance(plan, Plan) else 1
