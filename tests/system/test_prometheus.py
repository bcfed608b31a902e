"""The aggregator's Prometheus endpoint, scraped over HTTP while ``edgefed aggregator`` runs."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefed.transport.broker import MosquittoProcess, free_port
from tests.system.conftest import Proc, _toml

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "edgefed-federation.json"


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_the_endpoint_agrees_with_the_results_file(
    mosquitto_process: MosquittoProcess, tmp_path: Path, federation: str
) -> None:
    port = free_port()
    common = {"federation": federation, "mqtt": {"url": mosquitto_process.url}}
    aggregator_file = tmp_path / "aggregator.toml"
    aggregator_file.write_text(_toml(common | {
        "metrics_port": port, "json_out": str(tmp_path / "results.json"),
        "eval_data": "synthetic:n=16,seed=9", "strategy": {"buffer_size": 2},
        "train": {"local_steps": 2, "batch_size": 4, "seq_len": 16},
    }))  # fmt: skip
    aggregator = Proc(
        "aggregator", ["aggregator", "--config", str(aggregator_file)], tmp_path / "a.log"
    )
    agents = []
    for i in range(2):
        agent_file = tmp_path / f"dev{i}.toml"
        agent_file.write_text(_toml(common | {
            "client_id": f"dev{i}", "data": f"synthetic:n=32,seed={i + 1}", "max_updates": 3,
            "seed": i, "torch_threads": 1,
        }))  # fmt: skip
        agents.append(
            Proc(f"dev{i}", ["agent", "--config", str(agent_file)], tmp_path / f"{i}.log")
        )
    fed = federation
    try:
        aggregator.start()
        while "Prometheus metrics on" not in aggregator.text():
            assert aggregator.running, aggregator.text()
            await asyncio.sleep(0.1)
        before = _scrape(port)
        for agent in agents:
            agent.start()
        for agent in agents:
            assert await agent.exited(120) == 0, agent.text()
        await asyncio.sleep(1.0)  # the agents' offline statuses reach the aggregator
        after = _scrape(port)
        assert aggregator.popen is not None
        aggregator.popen.send_signal(signal.SIGTERM)
        assert await aggregator.exited(30) == 0, aggregator.text()
    finally:
        for proc in (aggregator, *agents):
            proc.cleanup()
    results = json.loads((tmp_path / "results.json").read_text())
    accepted = [u for u in results["updates"] if u["accepted"]]
    labels = (("federation", fed),)
    assert before[("edgefed_global_version", labels)] == 0
    assert after[("edgefed_global_version", labels)] == results["history"][-1]["version"] == 3
    updates = (("decision", "accepted"), ("federation", fed), ("method", "lora"), ("reason", ""))
    assert after[("edgefed_updates_total", updates)] == len(accepted) == 6
    assert after[("edgefed_update_staleness_count", labels)] == 6
    assert after[("edgefed_merge_seconds_count", labels)] == 6
    assert after[("edgefed_eval_loss", labels)] == pytest.approx(
        results["history"][-1]["eval_loss"]
    )
    assert after[("edgefed_agents", (("federation", fed), ("state", "offline")))] == 2
    assert after[("edgefed_bytes_received_total", labels)] >= sum(u["bytes"] for u in accepted)
    assert (
        after[("edgefed_bytes_sent_total", labels)] > before[("edgefed_bytes_sent_total", labels)]
    )
    # The Grafana dashboard asks only for series the endpoint has.
    dashboard = json.loads(DASHBOARD.read_text())
    used = set(re.findall(r"edgefed_[a-z_]+", json.dumps(dashboard["panels"])))
    assert used and used <= {name for name, _ in after}, used - {name for name, _ in after}
