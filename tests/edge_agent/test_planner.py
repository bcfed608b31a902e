"""The memory planner: choices as the budget shrinks, refusals, self-correction, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.agent import EdgeAgent
from edge_agent.budget import Budget, PeakMeter, device_budget, os_budget
from edge_agent.config import AgentConfig
from edge_agent.memory_estimate import StepShape, estimate, model_shape
from edge_agent.planner import (
    CALIBRATION_FILE,
    CannotFit,
    DeviceSizer,
    Plan,
    estimator_key,
    plan_training,
)
from edgefed.cli import main as cli
from edgefed.ml.models import adapter_parameters, attach_lora, build_model
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.codec import decode, encode
from schemas.messages import DeviceProfile, GlobalModel, LoraSpec, ModelRef, Status, Task, TrainSpec

SMOLLM2 = model_shape("smollm2-135m")
TRAIN = TrainSpec(batch_size=8, seq_len=128)


def _plan(budget_mb: float, methods: tuple[str, ...] = ("lora", "fwdgrad")) -> Plan | CannotFit:
    return plan_training(
        SMOLLM2,
        budget=Budget(mb=budget_mb, source="config"),
        methods=methods,  # type: ignore[arg-type]
        train=TRAIN,
        lora=LoraSpec(),
    )


def test_model_shape_counts_the_real_parameters() -> None:
    base = build_model("tiny")
    shape = model_shape("tiny")
    assert shape.params == sum(p.numel() for p in base.parameters())
    assert shape.attention == "eager"
    adapter = adapter_parameters(attach_lora(base, LoraSpec(rank=4)))
    assert shape.adapter_values(4, ("q_proj", "v_proj")) == sum(p.numel() for p in adapter.values())
    assert SMOLLM2.params == 134_515_008  # SmolLM2-135M, from the built-in table or its folder
    assert SMOLLM2.adapter_values(8, ("q_proj", "v_proj")) == 460_800


def test_planner_moves_from_lora_to_fwdgrad_to_smaller_shapes_then_refuses() -> None:
    budgets = (3500, 3000, 2000, 1500, 1300, 1100, 1000, 900, 500)
    chosen = [_plan(mb) for mb in budgets]
    plans = [p for p in chosen if isinstance(p, Plan)]
    steps = [(p.method, p.batch_size * p.seq_len) for p in plans]
    assert steps[0] == ("lora", 8 * 128)
    methods = [method for method, _ in steps]
    assert "fwdgrad" in methods and methods == sorted(methods, key=("lora", "fwdgrad").index)
    for method in ("lora", "fwdgrad"):  # within a method, smaller budget -> fewer tokens
        tokens = [t for m, t in steps if m == method]
        assert tokens == sorted(tokens, reverse=True) and len(set(tokens)) > 1
    for plan in plans:
        assert plan.estimate_mb < plan.budget_mb
    refusals = chosen[len(plans) :]
    assert refusals and all(isinstance(r, CannotFit) for r in refusals)
    refusal = refusals[0]
    assert isinstance(refusal, CannotFit) and refusal.to_status()["state"] == "cannot_fit"
    smallest = estimate(SMOLLM2, StepShape(batch=1, seq_len=32), "fwdgrad")
    assert refusal.required_mb == pytest.approx(smallest.total_mb + 0.3 * smallest.step_mb)
    assert (refusal.method, refusal.batch_size, refusal.seq_len) == ("fwdgrad", 1, 32)
    assert isinstance(_plan(refusal.required_mb + 0.01), Plan)  # the number is the minimum
    assert isinstance(_plan(refusal.required_mb - 0.01), CannotFit)


def test_kd_costs_its_local_method_plus_the_kept_logits() -> None:
    step = StepShape(batch=8, seq_len=128, proxy_rows=64, top_k=8)
    lora, kd = estimate(SMOLLM2, step, "lora"), estimate(SMOLLM2, step, "kd")
    assert kd.total_mb - lora.total_mb == pytest.approx(64 * 128 * 8 * 6 / 2**20)
    assert estimator_key("kd", {"local": "fwdgrad"}) == "kd-fwdgrad"
    assert estimator_key("fwdgrad", {"mode": "jvp"}) == "fwdgrad-jvp"
    jvp = estimate(SMOLLM2, step, "fwdgrad-jvp").total_mb
    assert estimate(SMOLLM2, step, "fwdgrad").total_mb < jvp < lora.total_mb


def test_planner_follows_the_preference_order() -> None:
    plan = _plan(3000, ("fwdgrad", "lora"))
    assert isinstance(plan, Plan) and (plan.method, plan.batch_size) == ("fwdgrad", 8)


def test_calibration_raises_estimates_but_never_lowers_them() -> None:
    """A first step that measured low must not loosen the next plan past the estimate."""
    options = {
        "budget": Budget(mb=3500, source="config"),
        "methods": ("lora",),
        "train": TRAIN,
        "lora": LoraSpec(),
    }
    plain = plan_training(SMOLLM2, **options)  # type: ignore[arg-type]
    low = plan_training(SMOLLM2, calibration={"lora": 0.5}, **options)  # type: ignore[arg-type]
    high = plan_training(SMOLLM2, calibration={"lora": 1.3}, **options)  # type: ignore[arg-type]
    assert isinstance(plain, Plan) and isinstance(low, Plan) and isinstance(high, Plan)
    assert (low.batch_size, low.seq_len, low.ratio) == (plain.batch_size, plain.seq_len, 1.0)
    assert high.ratio == pytest.approx(1.3)
    assert high.batch_size * high.seq_len < plain.batch_size * plain.seq_len


def test_device_sizer_recalibrates_and_replans_when_the_peak_overran(tmp_path: Path) -> None:
    task = Task(
        task_id="t",
        federation="f",
        version=0,
        methods=("lora", "fwdgrad"),
        model=ModelRef(name="smollm2-135m"),
        train=TRAIN,
    )
    sizer = DeviceSizer(Budget(mb=2000, source="config"), state_dir=str(tmp_path))
    sizer._runtime_mb = 400.0  # as a fresh process; the test process holds more
    plan = sizer.plan(task)
    assert isinstance(plan, Plan) and plan.method == "lora" and sizer.needs_measuring(plan)
    meter = PeakMeter()
    meter.peak_mb = plan.estimate_mb * 1.3  # the real step needed 30% more than estimated
    measured, replan = sizer.observe(plan, task, meter)
    assert measured.measured_mb == pytest.approx(plan.estimate_mb * 1.3)
    assert sizer.calibration["lora"] == pytest.approx(1.3)
    assert isinstance(replan, Plan) and replan != plan
    assert replan.estimate_mb <= 2000 and replan.ratio in (1.0, pytest.approx(1.3))
    assert not sizer.needs_measuring(measured)
    stored = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert stored == {"lora": pytest.approx(1.3)}
    again = DeviceSizer(Budget(mb=2000, source="config"), state_dir=str(tmp_path))
    assert again.calibration == stored


def test_peak_meter_sees_an_allocation_and_budgets_are_positive() -> None:
    with PeakMeter() as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert meter.exact
    assert meter.peak_mb >= 64
    budget = os_budget()
    assert budget.source in ("os", "cgroup") and budget.mb > 0
    assert device_budget(123.0) == Budget(mb=123.0, source="config")


def test_plan_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", "smollm2-135m", "--budget-mb", "1300", "--methods", "lora,fwdgrad"]
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "fwdgrad" and out["estimate_mb"] <= 1300 == out["budget_mb"]
    assert cli.main(["plan", "--budget-mb", "100", "--json"]) == 1
    refusal = json.loads(capsys.readouterr().out)
    assert refusal["state"] == "cannot_fit" and refusal["required_mb"] > 100


async def test_agent_refuses_with_cannot_fit_and_the_requirement() -> None:
    broker = MemoryBroker()
    task = Task(task_id="t", federation="fed", version=0, model=ModelRef(name="tiny"))
    async with broker.transport("aggregator") as aggregator:
        await aggregator.publish(topics.task("fed"), task, retain=True)
        tensors = {"x": torch.zeros(1)}
        await aggregator.publish(
            topics.global_model("fed", 0),
            GlobalModel(task_id="t", version=0, tensors=tensors),
            retain=True,
        )
    config = AgentConfig(
        federation="fed",
        client_id="dev0",
        data="synthetic:n=8",
        profile=DeviceProfile(memory_budget_mb=50),
    )
    async with broker.transport("dev0") as transport:
        report = await EdgeAgent(config, transport).run()
    assert report.plan is not None and report.plan["state"] == "cannot_fit"
    assert float(report.plan["required_mb"]) > 50
    status = decode(broker.retained[topics.status("fed", "dev0")])
    assert isinstance(status, Status) and status.state == "cannot_fit"
    assert status.plan == report.plan


async def test_agent_trains_as_planned_and_reports_its_measured_peak(tmp_path: Path) -> None:
    broker = MemoryBroker()
    aggregator_config = AggregatorConfig.model_validate(
        {
            "federation": "fed",
            "accept_methods": ("fwdgrad",),
            "eval_data": "synthetic:n=8,seed=3",
            "eval_every": 1000,
        }
    )
    config = AgentConfig(
        federation="fed",
        client_id="dev0",
        data="synthetic:n=16",
        max_updates=1,
        state_dir=str(tmp_path),
        profile=DeviceProfile(memory_budget_mb=16_000),
    )
    async with broker.transport("aggregator") as transport:
        service = AggregatorService(aggregator_config, transport)
        serving = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.ready.wait(), 30)
            async with broker.transport("dev0") as device:
                report = await asyncio.wait_for(EdgeAgent(config, device).run(), 60)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
    plan = report.plan
    assert plan is not None and report.accepted == 1
    assert plan["method"] == "lora" and plan["batch_size"] == TrainSpec().batch_size
    assert 0 < float(plan["measured_mb"]) <= 16_000
    stored = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    ratio = float(plan["measured_mb"]) / float(plan["estimate_mb"])  # rounded in the status
    assert stored["lora"] == pytest.approx(ratio, rel=1e-3)


def test_task_methods_travel_in_preference_order() -> None:
    task = Task(
        task_id="t",
        federation="f",
        version=0,
        methods=("fwdgrad", "lora"),
        model=ModelRef(name="tiny"),
    )
    back = decode(encode(task))
    assert isinstance(back, Task) and back.methods == ("fwdgrad", "lora")
    assert Task(task_id="t", federation="f", version=0, model=ModelRef(name="tiny")).methods == ()
