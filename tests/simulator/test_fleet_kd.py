"""A KD federation through the real Mosquitto: devices of two depths teach the global model."""

from __future__ import annotations

import pytest

from simulator.fleet import FleetConfig, run_fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_fleet_kd_with_two_model_depths_lowers_global_loss(
    mosquitto_url: str, federation: str
) -> None:
    config = FleetConfig(
        agents=4,
        method="kd",
        models=("tiny", "tiny-4l"),
        max_versions=8,
        federation=federation,
        slowdowns=(1.0, 1.5),
        aggregator={"strategy": {"buffer_size": 2}},
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    losses = [h["eval_loss"] for h in results["history"] if h["eval_loss"] is not None]
    assert results["history"][-1]["version"] == 8
    assert losses[-1] <= 0.85 * losses[0], losses
    updates = results["updates"]
    assert updates
    assert all(u["accepted"] and u["method"] == "kd" for u in updates), updates
    assert any(u["staleness"] >= 1 for u in updates), "no logits were ever stale"
    # Same proxy slice size and k: a 2-layer and a 4-layer device upload the same bytes.
    shallow = {u["bytes"] for u in updates if u["client_id"] in {"dev000", "dev002"}}
    deep = {u["bytes"] for u in updates if u["client_id"] in {"dev001", "dev003"}}
    assert shallow == deep
    assert len(shallow) == 1
    assert set(results["merges"].values()) == {1}
    assert all(not agent.rejected for agent in result.agents)
