"""Split learning in the fleet simulator: the split server runs beside the aggregator."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.budget import Budget
from edge_agent.memory_estimate import model_shape
from edge_agent.planner import Plan, plan_training
from edgefed.cli.main import build_parser
from schemas.errors import ConfigError
from simulator.cli import _flag_config as flag_config
from simulator.fleet import FleetConfig, aggregator_config, run_fleet
from simulator.fleet_spec import load_fleet_spec
from simulator.outcome import fixed_method_plans, fleet_outcome, split_table
from simulator.profiles import DeviceSpec

SPEC = """
[fleet]
model = "{model}"
method = "split"

[stop]
max_versions = 4

[sync]
clients_per_round = 2
round_deadline_s = 30

[[devices]]
profile = "rpi4-4gb"
count = 2
method = "split"
cut = 1
variant = "u_shaped"

[[devices]]
profile = "laptop"
count = 1
method = "lora"

[[devices]]
profile = "jetson-nano-4gb"
count = 2
memory_budget_mb = {small}

[[devices]]
profile = "laptop"
count = 1
memory_budget_mb = 4000
"""


def test_fleet_spec_carries_split_shapes_and_round_options(tmp_path: Path) -> None:
    spec = tmp_path / "split.toml"
    spec.write_text(SPEC.format(model="smollm2-135m", small=700), encoding="utf-8")
    config = load_fleet_spec(spec)
    assert config.method == "split" and config.agents == 6
    assert config.methods == ("split", "split", "lora", "split", "split", "split")
    split = {"split": {"cut": 1, "variant": "u_shaped"}}
    assert config.device_trainer == (split, split, {}, {}, {}, {})
    assert config.budgets_mb == (None, None, None, 700, 700, 4000)
    assert (config.clients_per_round, config.round_deadline_s) == (2, 30)
    # "planner" devices choose split (the task's method) with the deepest cut that fits.
    shape, agg = model_shape(config.model), aggregator_config(config)
    cuts = []
    for budget in (700, 4000):
        plan = plan_training(
            shape,
            budget=Budget(mb=budget, source="config"),
            methods=(agg.method, *agg.accept_methods),
            train=agg.train,
            lora=agg.lora,
        )
        assert isinstance(plan, Plan) and plan.method == "split" and plan.cut is not None
        cuts.append(plan.cut)
    assert cuts[0] < cuts[1]
    # Devices told their cut are estimated at that cut, not the planner's.
    fixed = fixed_method_plans(config)
    assert sorted(fixed) == [0, 1, 2]
    assert fixed[0]["method"] == "split" and fixed[0]["cut"] == 1 and fixed[2]["method"] == "lora"
    assert fixed[0]["estimate_mb"] < fixed[2]["estimate_mb"]
    overridden = load_fleet_spec(spec, clients_per_round=3, round_deadline_s=None)
    assert (overridden.clients_per_round, overridden.round_deadline_s) == (3, None)


def test_shipped_split_spec_mixes_split_planner_and_lora_devices() -> None:
    config = load_fleet_spec(
        Path(__file__).parents[2] / "simulator" / "fleets" / "split_mixed.toml"
    )
    assert config.methods == ("split", "split", "split", "lora", "lora")
    assert config.budgets_mb[2] is not None  # the planner sizes the Jetson's cut
    assert config.device_trainer[0] == {"split": {"cut": 1, "variant": "u_shaped"}}
    assert (config.clients_per_round, config.round_deadline_s) == (3, 1.5)


def test_fleet_spec_refuses_split_options_on_other_methods(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    text = SPEC.format(model="tiny", small=700).replace(
        'method = "lora"', 'method = "lora"\ncut = 2'
    )
    spec.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="cut is a split option"):
        load_fleet_spec(spec)
    spec.write_text(SPEC.format(model="tiny", small=700).replace("= 2\nround", "= 9\nround"))
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_fleet_spec(spec)


@pytest.mark.broker
async def test_fleet_mixed_split_and_lora_lowers_eval_loss(
    mosquitto_url: str, federation: str
) -> None:
    config = FleetConfig(
        model="tiny-4l",
        agents=4,
        method="split",
        methods=("split", "split", "lora", "split"),
        device_trainer=({"split": {"cut": 1}}, {"split": {"cut": 3}}, {}, {}),
        budgets_mb=(None, None, None, 4000.0),
        slowdowns=(1.0,),
        max_versions=6,
        train_samples=600,
        federation=federation,
        aggregator={
            "train": {"local_steps": 6, "batch_size": 8, "seq_len": 32, "lr": 2e-2},
            "strategy": {"buffer_size": 2},
            "eval_data": "synthetic:n=64,seed=999",
        },
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    losses = [h["eval_loss"] for h in results["history"] if h["eval_loss"] is not None]
    assert results["history"][-1]["version"] == 6
    assert losses[-1] < 0.9 * losses[0], losses
    methods = {u["client_id"]: u["method"] for u in results["updates"] if u["accepted"]}
    assert methods == {"dev000": "split", "dev001": "split", "dev002": "lora", "dev003": "split"}
    # Every split device's steps went through the split server; the planned one chose a cut.
    served = {r["client_id"] for r in results["split"] if r["accepted"]}
    assert served == {"dev000", "dev001", "dev003"}
    plan = results["agents"][3]["plan"]
    assert plan["method"] == "split" and plan["cut"] == 2  # half of tiny-4l's blocks

    outcome = fleet_outcome(results, config, real_s=1.0, name="mixed")
    costs = {row["client_id"]: row["split"] for row in outcome["devices"]}
    assert costs["dev002"] is None
    shallow, deep = costs["dev000"], costs["dev001"]
    for cost in (shallow, deep):
        assert cost["steps"] >= 6
        assert cost["bytes_up_per_step"] > 0 and cost["bytes_down_per_step"] > 0
        assert cost["compute_s_per_step"] > 0 and cost["peak_mb"] > 0
    table = split_table([outcome])
    assert "| dev000 |" in table and "| dev001 |" in table and "dev002" not in table


def test_simulate_flags_set_split_shapes_and_rounds() -> None:
    args = build_parser().parse_args(
        [
            "simulate",
            "--model=tiny-4l",
            "--agents=3",
            "--method=split",
            "--cuts=1,3",
            "--variant=u_shaped",
            "--clients-per-round=2",
            "--round-deadline=1.5",
        ]
    )
    config = flag_config(args)
    assert config.method == "split"
    assert config.trainer["split"] == {"variant": "u_shaped"}
    assert config.device_trainer == ({"split": {"cut": 1}}, {"split": {"cut": 3}})
    assert (config.clients_per_round, config.round_deadline_s) == (2, 1.5)
    assert config.train_samples == FleetConfig().train_samples  # not given: the fleet default


def test_simulate_flags_set_the_rows_a_text_fleet_trains_on() -> None:
    every = flag_config(build_parser().parse_args(["simulate", "--train-samples=0"]))
    assert every.train_samples == 0
    some = flag_config(build_parser().parse_args(["simulate", "--train-samples", "8000"]))
    assert some.train_samples == 8000


def test_simulate_flags_set_the_held_out_rows_and_how_often_they_are_scored() -> None:
    args = build_parser().parse_args(["simulate", "--eval-samples=7600", "--eval-every=20"])
    config = flag_config(args)
    assert config.eval_samples == 7600
    assert aggregator_config(config).eval_every == 20
    default = flag_config(build_parser().parse_args(["simulate"]))
    assert (default.eval_samples, default.aggregator) == (FleetConfig().eval_samples, {})


@pytest.mark.broker
async def test_fleet_holds_split_steps_for_the_device_links(
    mosquitto_url: str, federation: str
) -> None:
    slow = DeviceSpec(
        name="slow-link",
        memory_budget_mb=4000,
        relative_speed=1.0,
        uplink_mbps=2.0,
        downlink_mbps=4.0,
        latency_ms=20.0,
    )
    config = FleetConfig(
        model="tiny-4l",
        agents=1,
        method="split",
        methods=("split",),
        device_trainer=({"split": {"cut": 1}},),
        devices=(slow,),
        max_versions=1,
        train_samples=200,
        federation=federation,
        aggregator={
            "train": {"local_steps": 3, "batch_size": 8, "seq_len": 32, "lr": 2e-2},
            "strategy": {"buffer_size": 1},
            "eval_data": "synthetic:n=16,seed=999",
        },
    )
    agent = (await run_fleet(config, url=mosquitto_url, progress=False)).to_dict()["agents"][0]
    steps = [step for fit in agent["split"] for step in fit["steps"]]
    assert len(steps) >= 3
    up = sum(step["bytes_up"] for step in steps)
    down = sum(step["bytes_down"] for step in steps)
    device = agent["device"]
    # Every step's activations went up and its gradients came down over the slow links,
    # on top of the update itself and the global models.
    assert device["bytes_up"] > up and device["bytes_down"] > down
    assert device["upload_s"] > up * 8 / 2e6 + len(steps) * 0.02
    assert device["download_s"] > down * 8 / 4e6 + len(steps) * 0.02
