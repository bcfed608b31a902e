"""``bench hierarchy`` with three private Mosquittos: a root, two sites, six tiny agents."""

from __future__ import annotations

import pytest

from bench.hierarchy import HierarchyConfig, hierarchy_run


@pytest.mark.broker
@pytest.mark.usefixtures("mosquitto_installed")
def test_a_root_and_two_sites_lose_nothing_and_learn_as_the_flat_fleet() -> None:
    result = hierarchy_run(HierarchyConfig(updates_per_agent=2))
    assert (result["sites"], result["agents"], result["versions"]) == (2, 6, 2)
    assert result["acked"] == result["merged_once"] == 12, result
    assert result["lost"] == result["doubled"] == 0
    # Each site sends one update per version: the root takes in 4 where flat it takes 12.
    assert (result["root_updates"], result["flat_root_updates"]) == (4, 12)
    first, last, flat = (
        result["eval_loss_first"],
        result["eval_loss_last"],
        result["flat_eval_loss_last"],
    )
    assert last < first
    assert abs(last - flat) <= 0.1 * flat, result
