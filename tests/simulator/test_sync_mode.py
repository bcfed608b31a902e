"""Synchronous FedAvg rounds on the real aggregator, and async against sync under stragglers."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pytest

from simulator.cli import run as simulate_command
from simulator.fleet import FleetConfig, run_fleet
from simulator.profiles import load_profiles

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_sync_round_merges_exactly_every_device_once(
    mosquitto_url: str, federation: str
) -> None:
    config = FleetConfig(
        agents=3,
        mode="sync",
        max_versions=4,
        slowdowns=(1.0, 2.0, 4.0),
        federation=federation,
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    history = results["history"]
    assert [h["version"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["merged_updates"] for h in history] == [0, 3, 6, 9, 12]
    accepted = [u for u in results["updates"] if u["accepted"]]
    assert len(accepted) == len(results["updates"]) == 12  # nothing arrived between rounds
    rounds: dict[int, list[dict[str, object]]] = defaultdict(list)
    for update in accepted:
        rounds[int(update["base_version"])].append(update)
    assert sorted(rounds) == [0, 1, 2, 3]
    for version, updates in rounds.items():
        assert sorted(u["client_id"] for u in updates) == ["dev000", "dev001", "dev002"]
        assert {u["staleness"] for u in updates} == {0}
        # The round's last update is the one that makes the next version.
        assert [u["version_after"] for u in updates] == [version, version, version + 1]
    assert set(results["merges"].values()) == {1}
    assert len(results["merges"]) == 12
    losses = [h["eval_loss"] for h in history]
    assert losses[-1] < losses[0]


def _tiny_spec(tmp_path: Path) -> Path:
    assert "laptop" in load_profiles()
    spec = tmp_path / "tiny-stragglers.toml"
    spec.write_text(
        """
[fleet]
model = "tiny"
dataset = "synthetic"
train_samples = 600
time_scale = 3.0

[train]
local_steps = 4
batch_size = 8
seq_len = 32

[strategy]
name = "fedbuff"
buffer_size = 2

[stop]
target_loss = 3.9
max_seconds = 12

[[devices]]
profile = "laptop"
count = 3

[[devices]]
profile = "rpi4-4gb"
count = 1
relative_speed = 0.1
availability = { dropout = 0.0 }
""",
        encoding="utf-8",
    )
    return spec


def test_async_reaches_the_target_sooner_than_sync_with_a_straggler(
    mosquitto_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "compare.json"
    args = argparse.Namespace(
        fleet=str(_tiny_spec(tmp_path)), mode="both", json_out=str(out), broker=mosquitto_url
    )
    assert simulate_command(args) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    fast, slow = document["async"], document["sync"]
    assert fast["mode"] == "async" and slow["mode"] == "sync"
    assert fast["time_to_target_s"] is not None and slow["time_to_target_s"] is not None
    assert fast["time_to_target_s"] < slow["time_to_target_s"], document["speedup"]
    assert document["speedup"] == pytest.approx(
        slow["time_to_target_s"] / fast["time_to_target_s"], rel=0.01
    )
    assert slow["staleness"]["max"] == 0 and slow["strategy"]["name"] == "fedavg"
    for run in (fast, slow):
        assert run["final_eval_loss"] <= 3.9
        assert run["bytes_up"] > 0 and run["bytes_down"] > 0 and run["accepted"] > 0
        assert len(run["devices"]) == 4
        assert all(d["peak_memory_mb"] and d["peak_memory_mb"] > 0 for d in run["devices"])
        assert [row["version"] for row in run["series"]] == list(range(run["versions"] + 1))
        # Updates still buffered when the run stopped count in the total, not the series.
        assert 0 < run["series"][-1]["bytes_up"] <= run["bytes_up"]
    straggler = slow["devices"][3]
    assert straggler["profile"] == "rpi4-4gb"
    assert straggler["compute_s"] > 5 * slow["devices"][0]["compute_s"] / slow["versions"]
    lines = (out.parent / "compare.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(fast["series"]) + len(slow["series"])
    for suffix in ("-progress.png", "-bytes.png", "-staleness.png", "-memory.png", ".md"):
        assert (out.parent / f"compare{suffix}").stat().st_size > 0
    assert "| async |" in (out.parent / "compare.md").read_text(encoding="utf-8")
