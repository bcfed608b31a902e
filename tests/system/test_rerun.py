"""A federation run again without a checkpoint: what the earlier run left never stalls it.

Each fresh aggregator starts a new run id, carried by its task, globals and the updates
trained from them. The earlier run's retained global (at a higher version than the new
run's) is still on the broker, and agents that lived through the restart still hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefed.transport.broker import MosquittoProcess
from tests.system.conftest import Proc, _toml

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _aggregator(tmp_path: Path, url: str, federation: str, run: int, versions: int) -> Proc:
    config = tmp_path / f"aggregator-{run}.toml"
    config.write_text(
        _toml(
            {
                "federation": federation,
                "max_versions": versions,
                "json_out": str(tmp_path / f"results-{run}.json"),
                "eval_data": "synthetic:n=16,seed=9",
                "train": {"local_steps": 2, "batch_size": 4, "seq_len": 16},
                "strategy": {"buffer_size": 2},
                "mqtt": {"url": url},
            }
        )
    )
    return Proc(f"aggregator-{run}", ["aggregator", "--config", str(config)], tmp_path / "a.log")


def _agent(tmp_path: Path, url: str, federation: str, name: str) -> Proc:
    config = tmp_path / f"{name}.toml"
    config.write_text(
        _toml(
            {
                "federation": federation,
                "client_id": name,
                "data": "synthetic:n=32,seed=1",
                "state_dir": str(tmp_path / name),
                "torch_threads": 1,
                "mqtt": {"url": url},
            }
        )
    )
    return Proc(name, ["agent", "--config", str(config)], tmp_path / f"{name}.log")


def _last_version(tmp_path: Path, run: int) -> int:
    history = json.loads((tmp_path / f"results-{run}.json").read_text())["history"]
    return int(history[-1]["version"])


async def test_a_rerun_without_a_checkpoint_reaches_its_versions(
    durable_broker: MosquittoProcess, tmp_path: Path, federation: str
) -> None:
    url = durable_broker.url
    agents = [_agent(tmp_path, url, federation, f"dev{i}") for i in range(2)]
    procs = list(agents)
    try:
        for agent in agents:
            agent.start()
        for run, versions in ((1, 4), (2, 2)):  # run 2 starts below run 1's retained global
            aggregator = _aggregator(tmp_path, url, federation, run, versions)
            procs.append(aggregator.start())
            assert await aggregator.exited(120) == 0, aggregator.text()
            assert _last_version(tmp_path, run) == versions, aggregator.text()
        # Agents that start now find run 2's leftovers retained; run 3 is what they follow.
        for agent in agents:
            agent.cleanup()
        fresh = [_agent(tmp_path, url, federation, f"new{i}") for i in range(2)]
        procs += [agent.start() for agent in fresh]
        aggregator = _aggregator(tmp_path, url, federation, 3, 3)
        procs.append(aggregator.start())
        assert await aggregator.exited(120) == 0, aggregator.text()
        assert _last_version(tmp_path, 3) == 3, aggregator.text()
    finally:
        for proc in procs:
            proc.cleanup()
    assert "future_version" not in "".join(p.text() for p in procs)
