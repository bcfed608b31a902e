"""End-to-end federations through the real Mosquitto: agents, aggregator, strategies."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edgefed.cli.main import COMMANDS, build_parser
from edgefed.transport.broker import DEV_CONFIG, MosquittoProcess, mosquitto_binary
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
        aggregator={"strategy": {"schedule": "constant"}},  # the threshold counts full steps
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
    # The slow agent must answer twice before the fast pair reaches the last version, however
    # long the fits take on a loaded host: 6x slower, against 15 fast fits each.
    config = FleetConfig(
        agents=3,
        strategy="fedasync",
        max_versions=30,
        federation=federation,
        slowdowns=(1.0, 1.0, 6.0),
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


_FWDGRAD_TRAINER: dict[str, dict[str, bool | int | float | str]] = {
    "fwdgrad": {"lr": 30.0, "max_step_rms": 0.03}
}


async def test_fleet_fwdgrad_seed_updates_lower_loss(mosquitto_url: str, federation: str) -> None:
    config = FleetConfig(
        agents=3,
        method="fwdgrad",
        max_versions=8,
        federation=federation,
        slowdowns=(1.0, 1.5, 2.0),
        trainer=_FWDGRAD_TRAINER,
        aggregator={
            "train": {"local_steps": 3, "perturbations": 8},
            "fwdgrad": {"variance_threshold": 20.0, "max_perturbations": 16},
        },
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    losses = _losses(results)
    assert results["history"][-1]["version"] == 8
    assert losses[-1] < losses[0] - 0.1, losses
    updates = results["updates"]
    assert updates and all(u["accepted"] for u in updates), updates
    # Seeds, not tensors: 3 local steps of at most 16 perturbations each.
    assert max(u["bytes"] for u in updates) <= 2048
    assert len({u["bytes"] for u in updates}) > 1, "the controller never changed K"
    assert set(results["merges"].values()) == {1}


async def test_fleet_mixed_lora_and_fwdgrad_lower_loss(mosquitto_url: str, federation: str) -> None:
    config = FleetConfig(
        agents=4,
        method="lora",
        methods=("lora", "fwdgrad"),
        max_versions=10,
        federation=federation,
        slowdowns=(1.0,),
        trainer=_FWDGRAD_TRAINER,
        aggregator={"train": {"perturbations": 8}},
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    results = result.to_dict()
    assert results["config"]["accept_methods"] == ["fwdgrad"]
    losses = _losses(results)
    assert losses[-1] <= 0.85 * losses[0], losses
    by_client = {a.client_id: a for a in result.agents}
    fwd_clients = {"dev001", "dev003"}
    merged = set(results["merges"])
    fwd_merged = [
        u for u in results["updates"] if u["client_id"] in fwd_clients and u["update_id"] in merged
    ]
    assert fwd_merged, "no forward-gradient update was merged"
    assert all(by_client[c].rejected.get("wrong_method", 0) == 0 for c in by_client)


@pytest.mark.parametrize("flags", [["--max-payload", "16384"], []], ids=["flag", "no-flag"])
async def test_a_broker_with_a_small_packet_limit_federates(
    tmp_path: Path, federation: str, flags: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that closes any connection sending a packet over 20 KiB (rumqttd's default)
    while the tiny-4l global is 34 kB: ``--max-payload`` makes every participant chunk under
    it; without it, each finds the limit (two lost connections) and chunks smaller."""
    if mosquitto_binary() is None:
        pytest.skip("the mosquitto binary is not installed")
    conf = tmp_path / "small.conf"
    conf.write_text(
        DEV_CONFIG.read_text().replace("max_packet_size 268435455", "max_packet_size 20480")
    )
    with MosquittoProcess(config=conf) as broker:
        args = build_parser().parse_args(
            ["simulate", "--broker", broker.url, "--model", "tiny-4l", "--agents", "2",
             "--max-versions", "3", "--json-out", str(tmp_path / "r.json"), *flags]
        )  # fmt: skip
        assert await asyncio.to_thread(COMMANDS["simulate"].run, args) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["history"][-1]["version"] == 3
    shrunk = [r.getMessage() for r in caplog.records if "its packet limit is lower" in r.message]
    assert bool(shrunk) == (not flags), shrunk
