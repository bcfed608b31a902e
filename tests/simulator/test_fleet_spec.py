"""Fleet specs: the shipped ones parse into the fleet they describe; broken ones say why."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from simulator.cli import run as simulate_command
from simulator.fleet import FleetConfig, aggregator_config
from simulator.fleet_spec import load_fleet_spec
from simulator.outcome import fixed_method_plans

FLEETS = Path(__file__).parents[2] / "simulator" / "fleets"

MINIMAL = """
[stop]
target_loss = 3.0
max_seconds = 10

[[devices]]
profile = "laptop"
count = 2
"""


def test_stragglers_spec_has_a_ten_times_slower_class() -> None:
    config = load_fleet_spec(FLEETS / "stragglers.toml")
    speeds = [device.relative_speed for device in config.devices]
    assert config.agents == len(config.devices) == 8
    assert speeds.count(1.0) == 6 and speeds.count(0.1) == 2
    assert {d.name for d in config.devices} == {"laptop", "rpi4-4gb"}
    # "planner" devices hand their profile's budget to the memory planner.
    assert config.budgets_mb == (8192.0,) * 6 + (2800.0,) * 2
    assert config.methods == ()
    assert (config.dataset, config.model, config.mode) == ("synthetic", "tiny", "async")
    assert config.target_loss is not None and config.max_seconds > 0
    agg = aggregator_config(config)
    assert (agg.strategy.name, agg.strategy.buffer_size) == ("fedbuff", 3)


def test_sync_mode_turns_the_strategy_into_fedavg_rounds() -> None:
    config = load_fleet_spec(FLEETS / "stragglers.toml", mode="sync")
    agg = aggregator_config(config)
    assert agg.strategy.name == "fedbuff"
    assert agg.strategy.buffer_size == config.agents
    assert (agg.strategy.staleness, agg.strategy.server_lr, agg.max_staleness) == (
        "constant",
        1.0,
        0,
    )


def test_newsgroups_spec_is_a_dirichlet_split_of_twenty_labels() -> None:
    config = load_fleet_spec(FLEETS / "newsgroups_dirichlet.toml")
    assert (config.dataset, config.partition, config.alpha) == ("20newsgroups", "dirichlet", 0.3)
    assert config.target_accuracy is not None
    assert len({d.name for d in config.devices}) >= 5


def test_fixed_methods_and_overrides_per_class(tmp_path: Path) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(
        MINIMAL
        + '\n[[devices]]\nprofile = "rpi5-8gb"\ncount = 1\nmethod = "fwdgrad"\n'
        + "uplink_mbps = 2.5\n",
        encoding="utf-8",
    )
    config = load_fleet_spec(spec)
    assert config.methods == ("lora", "lora", "fwdgrad")
    assert config.budgets_mb == (8192.0, 8192.0, None)
    assert config.devices[2].uplink_mbps == 2.5
    assert config.devices[2].downlink_mbps == 80.0  # the rest is the profile's
    # The fixed-method device is not planned by its agent; its memory is estimated for it.
    plans = fixed_method_plans(config)
    assert list(plans) == [2]
    assert plans[2]["method"] == "fwdgrad" and plans[2]["budget_mb"] == 6000.0
    assert 0 < plans[2]["estimate_mb"] < 6000.0


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s.replace('"laptop"', '"toaster"'), "unknown profile 'toaster'.*known: "),
        (lambda s: s.replace("count = 2", "count = 0"), "devices.0.count"),
        (lambda s: s.replace("max_seconds = 10", ""), "set max_seconds or max_versions"),
        (lambda s: s + "[fleet]\ncolour = 1\n", "fleet.colour"),
        (lambda s: s + "[strategy]\nbuffer_size = 0\n", "strategy.buffer_size"),
        (lambda s: s + "[strategy]\nname = 'fedprox'\n", "strategy.name"),
        (lambda s: s + "[data]\npartition = 'dirichlet'\n", "needs a labelled text dataset"),
        (lambda s: s + "relative_speed = 0\n", "devices\\[0\\].*relative_speed"),
        (lambda s: s.replace("[[devices]]", "[[device]]"), "devices"),
        (lambda s: s + "[[", "cannot read fleet spec"),
    ],
)
def test_bad_spec_names_the_key(tmp_path: Path, edit: object, expected: str) -> None:
    assert callable(edit)
    spec = tmp_path / "fleet.toml"
    spec.write_text(edit(MINIMAL), encoding="utf-8")
    with pytest.raises(ConfigError, match=expected):
        load_fleet_spec(spec)


def test_fleet_config_refuses_runs_that_cannot_work() -> None:
    with pytest.raises(ConfigError, match="late joiners"):
        FleetConfig(mode="sync", late_joiners=1)
    with pytest.raises(ConfigError, match="kd"):
        FleetConfig(mode="sync", method="kd")
    with pytest.raises(ConfigError, match="time_scale"):
        FleetConfig(time_scale=4.0)  # only emulated devices follow the scaled clock


def test_simulate_command_reports_a_bad_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(MINIMAL.replace('"laptop"', '"toaster"'), encoding="utf-8")
    args = argparse.Namespace(fleet=str(spec), mode="sync", json_out=None, broker=None)
    assert simulate_command(args) == 2
    assert "unknown profile 'toaster'" in capsys.readouterr().out


def test_a_text_task_distils_on_its_own_domain_beside_the_training_rows() -> None:
    agg = aggregator_config(FleetConfig(dataset="ag-news", method="kd", train_samples=1600))
    assert agg.kd.proxy_dataset == "ag-news:skip=1600,n=2000"  # disjoint from devices' rows
    every_row = aggregator_config(FleetConfig(dataset="sst2", method="kd", train_samples=0))
    assert every_row.kd.proxy_dataset == "sst2"
    own = FleetConfig(dataset="sst2", aggregator={"kd": {"proxy_dataset": "synthetic"}})
    assert aggregator_config(own).kd.proxy_dataset == "synthetic"
    assert aggregator_config(FleetConfig()).kd.proxy_dataset.startswith("synthetic")
