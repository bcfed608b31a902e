"""Poisoned clients and private aggregation, end to end through the real Mosquitto."""

from __future__ import annotations

from typing import Any

import pytest

from simulator.attacks import Attack
from simulator.fleet import FleetConfig, run_fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]

VERSIONS = 15


def _losses(results: dict[str, Any]) -> list[float]:
    return [h["eval_loss"] for h in results["history"] if h["eval_loss"] is not None]


async def _run(url: str, federation: str, **options: Any) -> dict[str, Any]:
    config = FleetConfig(agents=4, max_versions=VERSIONS, federation=federation, **options)
    return (await run_fleet(config, url=url, progress=False)).to_dict()


async def test_fleet_sign_flipped_client_is_contained_by_clipping_and_median(
    mosquitto_url: str, federation: str
) -> None:
    # The poisoned device is the fastest: about a third of all updates are its own.
    results = await _run(
        mosquitto_url,
        federation,
        slowdowns=(1.0, 1.5, 1.5, 1.5),
        attack=Attack(kind="sign_flip", factor=10.0, clients=(0,)),
        aggregator={
            "max_update_norm": 2.0,  # honest deltas here are about 1.0-1.2
            "strategy": {"buffer_size": 5, "robust": "median"},
        },
    )
    losses = _losses(results)
    assert losses[-1] < 0.75 * losses[0], losses
    assert results["config"]["strategy"]["robust"] == "median"
    poisoned = {u["update_id"] for u in results["updates"] if u["client_id"] == "dev000"}
    assert len(poisoned & set(results["merges"])) >= 3  # merged (clipped), not refused


async def test_fleet_central_dp_still_learns_at_sigma_0_3(
    mosquitto_url: str, federation: str
) -> None:
    privacy = {"noise_multiplier": 0.3, "clip_norm": 1.0, "population": 4, "seed": 1}
    results = await _run(
        mosquitto_url,
        federation,
        slowdowns=(1.0,),
        aggregator={"strategy": {"buffer_size": 4}, "privacy": privacy},
    )
    losses = _losses(results)
    assert losses[-1] < 0.92 * losses[0], losses
    report = results["privacy"]
    assert report["noise_multiplier"] == 0.3
    assert report["clip_norm"] == 1.0
    assert report["steps"] == VERSIONS
    assert report["sample_rate"] == 1.0  # K = 4 of a population of 4
    assert 0 < report["epsilon"] < float("inf")
    assert report["accountant"].startswith("dp_accounting")
