"""End-to-end federations through the real Mosquitto: agents, aggregator, strategies."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from simulator.fleet import FleetConfig, run_fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _losses(results: dict[str, Any]) -> list[float]:
    return [h["eval_loss"] for h in results["history"] if h["eval_loss"] is not None]


def _assert_learned_and_merged_once(results: dict[str, Any], *, buffer_size: int) -> None:
    losses = _losses(results)
    assert results["history"][-1]["version"] == 20
    assert losses[-1] <= 0.8 * losses[0], losses
    accepted = [u for u in results["updates"] if u["accepted"]]
    assert any(u["staleness"] >= 1 for u in accepted), "no update was ever stale"
    merges: dict[str, int] = results["merges"]
    assert set(merges.values()) == {1}, "an update was merged more than once"
    accepted_ids = {u["update_id"] for u in accepted}
    assert set(merges) <= accepted_ids
    # Every accepted update is merged, except those still waiting in the last buffer.
    assert len(accepted_ids - set(merges)) <= buffer_size - 1
    assert len(accepted) == len(accepted_ids), "an update id was accepted twice"


async def test_fleet_fedbuff_learns_with_stale_updates(mosquitto_url: str, federation: str) -> None:
    config = FleetConfig(agents=4, strategy="fedbuff", max_versions=20, federation=federation)
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    _assert_learned_and_merged_once(results, buffer_size=3)
    assert len(results["merges"]) >= 20 * 3


async def test_fleet_fedasync_polynomial_learns(mosquitto_url: str, federation: str) -> None:
    config = FleetConfig(
        agents=4,
        strategy="fedasync",
        staleness="polynomial",
        max_versions=20,
        federation=federation,
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    _assert_learned_and_merged_once(results, buffer_size=1)
    assert results["config"]["strategy"]["staleness"] == "polynomial"


async def test_fleet_late_joiner_starts_from_retained_global(
    mosquitto_url: str, federation: str
) -> None:
    config = FleetConfig(
        agents=3, late_joiners=1, max_versions=8, federation=federation, slowdowns=(1.0,)
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    late = result.agents[-1]
    assert late.first_base_version is not None and late.first_base_version >= 2
    first = next(u for u in result.results["updates"] if u["client_id"] == late.client_id)
    assert first["base_version"] >= 2
    assert first["accepted"], first


async def test_fleet_stale_update_is_nacked_and_agent_continues(
    mosquitto_url: str, federation: str
) -> None:
    config = FleetConfig(
        agents=3,
        strategy="fedasync",
        max_versions=12,
        federation=federation,
        slowdowns=(1.0, 1.0, 12.0),
        aggregator={"max_staleness": 1},
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    updates = result.results["updates"]
    stale = [u for u in updates if u["reason"] == "stale"]
    assert stale, "the slow agent was never too stale"
    nack = stale[0]
    assert nack["staleness"] > 1 and not nack["accepted"]
    later = [
        u for u in updates if u["client_id"] == nack["client_id"] and u["time_s"] > nack["time_s"]
    ]
    assert later, "the agent stopped after its nack"
    assert all(u["base_version"] >= nack["version_after"] for u in later)
    slow_report = next(a for a in result.agents if a.client_id == nack["client_id"])
    assert Counter(slow_report.rejected)["stale"] >= 1
