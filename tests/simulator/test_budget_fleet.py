"""A fleet whose devices have different memory budgets plans different methods.

See docs/architecture.md §7.
"""

from __future__ import annotations

import pytest

from edge_agent.budget import Budget
from edge_agent.memory_estimate import model_shape
from edge_agent.planner import Plan, plan_training
from schemas.messages import LoraSpec, TrainSpec
from simulator.fleet import FleetConfig, run_fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _fwdgrad_budget() -> float:
    """The largest budget (in 5 kB steps) where the tiny task fits fwdgrad but not lora."""
    tiny = model_shape("tiny")
    budget = 420.0
    while budget > 390:
        plan = plan_training(
            tiny,
            budget=Budget(mb=budget, source="config"),
            methods=("lora", "fwdgrad"),
            train=TrainSpec(),
            lora=LoraSpec(),
        )
        if isinstance(plan, Plan) and plan.method == "fwdgrad":
            return budget
        budget -= 0.005
    raise AssertionError("no budget makes the tiny task choose fwdgrad")


async def test_mixed_budget_fleet_chooses_methods_per_device(
    mosquitto_url: str, federation: str
) -> None:
    config = FleetConfig(
        agents=3,
        methods=("lora", "fwdgrad"),
        budgets_mb=(8000.0, _fwdgrad_budget(), 100.0),
        strategy="fedasync",
        max_versions=3,
        slowdowns=(1.0,),
        federation=federation,
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    plans = [agent["plan"] for agent in result.to_dict()["agents"]]
    assert [p["state"] for p in plans] == ["fits", "fits", "cannot_fit"], plans
    assert [p["method"] for p in plans[:2]] == ["lora", "fwdgrad"], plans
    assert all(p["estimate_mb"] <= p["budget_mb"] for p in plans[:2])
    assert plans[2]["required_mb"] > 100
    assert result.final_version == 3
