"""The estimator against real peaks: one step of the tiny model per plan, each in a fresh process."""

from __future__ import annotations

import pytest

from bench.fwdgrad import run_child
from edge_agent.budget import Budget
from edge_agent.memory_estimate import model_shape
from edge_agent.planner import Plan, plan_training
from schemas.messages import LoraSpec, Method, TrainSpec

pytestmark = pytest.mark.slow

CHILD = {"lora": "lora-backprop", "fwdgrad": "fwdgrad-fd"}
"""Method -> ``bench.fwdgrad`` memory child (LoRA r8 on q, v; fresh process)."""
TOLERANCE = 0.25
"""Acceptance: the calibrated estimate within 25% of the measured peak."""
OVERSHOOT = 0.05
"""The same step's RSS peak varies by a few percent between fresh processes (564 MB against a
560 MB budget was seen once); a device whose first step overshoots re-plans (test_planner)."""


def _row(method: str, batch: int, seq: int) -> dict[str, float]:
    return run_child(CHILD[method], model="tiny", batch=batch, seq=seq, steps=1, k=1, threads=2)


def _peak(method: str, batch: int, seq: int) -> float:
    return float(_row(method, batch, seq)["peak_rss_mb"])


def test_planned_tiny_steps_stay_within_budget_and_near_the_estimate() -> None:
    """As a device does: the first step of each method calibrates the plans after it."""
    tiny = model_shape("tiny")
    # A device plans with its own RSS as the runtime term (DeviceSizer): what a process of
    # this venv holds with torch, transformers and peft loaded, before any step.
    runtime_mb = float(_row("fwdgrad", 1, 8)["loaded_rss_mb"])
    train = TrainSpec(batch_size=64, seq_len=256, perturbations=1)
    calibration: dict[str, float] = {}
    uncalibrated: list[float] = []
    # Budgets above that runtime, so the shapes chosen do not depend on the venv's size.
    cases: list[tuple[tuple[Method, ...], float]] = [
        (("lora", "fwdgrad"), runtime_mb + 750.0),  # lora at the task's shape
        (("fwdgrad",), runtime_mb + 300.0),  # fwdgrad only
        (("lora", "fwdgrad"), runtime_mb + 160.0),  # lora again, smaller, with its calibration
    ]
    seen: list[tuple[str, int, int]] = []
    for methods, budget_mb in cases:
        plan = plan_training(
            tiny,
            budget=Budget(mb=budget_mb, source="config"),
            methods=methods,
            train=train,
            lora=LoraSpec(),
            calibration=calibration,
            runtime_mb=runtime_mb,
        )
        assert isinstance(plan, Plan), plan
        measured = _peak(plan.method, plan.batch_size, plan.seq_len)
        raw = plan.estimate_mb / plan.ratio
        uncalibrated.append(raw / measured - 1)
        seen.append((plan.method, plan.batch_size, plan.seq_len))
        assert measured <= budget_mb * (1 + OVERSHOOT), (plan, measured)
        assert abs(plan.estimate_mb / measured - 1) <= TOLERANCE, (plan, measured, uncalibrated)
        calibration.setdefault(plan.method, measured / raw)
    assert seen[0] == ("lora", 64, 256)
    assert seen[1][0] == "fwdgrad"
    assert seen[2][0] == "lora" and seen[2][1] * seen[2][2] < 64 * 256
    assert 0.75 < calibration["lora"] < 1.25, calibration
    assert max(abs(e) for e in uncalibrated) <= TOLERANCE, uncalibrated
