"""Synchronous FedAvg rounds with device selection and a round deadline, through the broker."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from aggregator.rounds import RoundPlan
from schemas.errors import ConfigError
from simulator.fleet import FleetConfig, run_fleet
from simulator.profiles import load_profiles

pytestmark = pytest.mark.broker

TRAIN = {"train": {"local_steps": 2, "batch_size": 8, "seq_len": 32}}


def _accepted_by_round(results: dict[str, Any]) -> dict[int, list[str]]:
    rounds: dict[int, list[str]] = defaultdict(list)
    for update in results["updates"]:
        if update["accepted"]:
            rounds[int(update["base_version"])].append(update["client_id"])
    return rounds


def test_round_plan_draws_k_distinct_devices_reproducibly() -> None:
    plan = RoundPlan(clients=("a", "b", "c", "d", "e"), per_round=2, seed=7)
    picks = [plan.selected(v) for v in range(20)]
    assert all(len(set(p)) == 2 and set(p) <= set(plan.clients) for p in picks)
    assert picks == [
        RoundPlan(clients=plan.clients, per_round=2, seed=7).selected(v) for v in range(20)
    ]
    assert len(set(picks)) > 1, "every round drew the same devices"
    assert RoundPlan(clients=("a", "b")).selected(3) == ("a", "b")
    with pytest.raises(ConfigError, match="clients_per_round"):
        RoundPlan(clients=("a", "b"), per_round=3)
    with pytest.raises(ConfigError, match="clients_per_round"):
        FleetConfig(agents=2, mode="sync", clients_per_round=0)


async def test_sync_rounds_train_only_the_selected_devices(
    mosquitto_url: str, federation: str
) -> None:
    config = FleetConfig(
        agents=4,
        mode="sync",
        clients_per_round=2,
        seed=5,
        max_versions=4,
        slowdowns=(1.0,),
        federation=federation,
        aggregator=TRAIN,
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    assert results["history"][-1]["version"] == 4
    plan = RoundPlan(clients=("dev000", "dev001", "dev002", "dev003"), per_round=2, seed=5)
    rounds = results["rounds"]
    assert [r["version"] for r in rounds] == [0, 1, 2, 3, 4]
    accepted = _accepted_by_round(results)
    for record in rounds[:4]:
        version, selected = record["version"], record["selected"]
        assert tuple(selected) == plan.selected(version)
        assert len(set(selected)) == 2
        # Exactly the selected devices trained on this round, once each.
        assert sorted(accepted[version]) == sorted(selected)
        assert record["closed"] == "full"
    assert len({tuple(r["selected"]) for r in rounds}) > 1
    assert results["merges"] and set(results["merges"].values()) == {1}
    assert not any(u["reason"] == "not_selected" for u in results["updates"])


async def test_sync_round_closes_at_its_deadline_without_the_straggler(
    mosquitto_url: str, federation: str
) -> None:
    # The straggler's link takes 1.5 s each way: every update it sends misses its round.
    laptop = load_profiles()["laptop"]
    config = FleetConfig(
        agents=3,
        mode="sync",
        round_deadline_s=1.0,
        max_versions=4,
        devices=(laptop, laptop, laptop.model_copy(update={"latency_ms": 1500.0})),
        federation=federation,
        aggregator=TRAIN,
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    history = results["history"]
    assert history[-1]["version"] == 4
    assert [r["closed"] for r in results["rounds"][:4]] == ["deadline"] * 4
    accepted = _accepted_by_round(results)
    for version in range(4):
        assert sorted(accepted[version]) == ["dev000", "dev001"]
    # Each round waited for its deadline, not for the straggler (nor closed early).
    spans = [r["closed_s"] - r["opened_s"] for r in results["rounds"][:4]]
    assert all(1.0 <= span < 2.0 for span in spans), spans
    # It hears of each round (the task) 1.5 s late and fetches its global only then, so it
    # may never catch a round at all; whatever it sends is refused as stale.
    late = [u for u in results["updates"] if u["client_id"] == "dev002"]
    assert all(not u["accepted"] and u["reason"] == "stale" for u in late), late
    losses = [h["eval_loss"] for h in history]
    assert losses[-1] < losses[0]
