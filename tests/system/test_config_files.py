"""Real ``edgefed`` processes started from config files alone: no flag is required.

A deployment writes one TOML per device and one for the aggregator and starts each with
``--config`` only; an ``EDGEFED_*`` variable overrides a key of the file, a flag overrides
both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aggregator.audit import MergeEntry, UpdateEntry, read_audit
from edge_agent.outbox import OUTBOX_FILE, Answer, Outbox
from edgefed.ml.models import build_model
from edgefed.transport.broker import MosquittoProcess, free_port, mosquitto_binary
from edgefed.transport.config import BrokerURL
from tests.peft_helpers import reload_with_peft
from tests.system.conftest import Proc, _toml, run_to_exit

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _write(path: Path, values: dict[str, object]) -> Path:
    path.write_text(_toml(values))
    return path


def _federation(
    tmp_path: Path,
    url: str,
    federation: str,
    *,
    max_versions: int,
    max_updates: int,
    sync: bool = False,
) -> list[Proc]:
    """An aggregator and two agents, each started with ``--config FILE`` and nothing else."""
    merging: dict[str, object] = (
        {"sync": {"clients": ["dev0", "dev1"]}} if sync else {"strategy": {"buffer_size": 2}}
    )
    aggregator_file = _write(
        tmp_path / "aggregator.toml",
        {
            "federation": federation,
            "max_versions": max_versions,
            "json_out": str(tmp_path / "results.json"),
            "checkpoint_dir": str(tmp_path / "checkpoints"),
            "eval_data": "synthetic:n=16,seed=9",
            "train": {"local_steps": 2, "batch_size": 4, "seq_len": 16},
            "mqtt": {"url": url},
        }
        | merging,
    )
    procs = [
        Proc("aggregator", ["aggregator", "--config", str(aggregator_file)], tmp_path / "a.log")
    ]
    for i in range(2):
        agent_file = _write(
            tmp_path / f"dev{i}.toml",
            {
                "federation": federation,
                "client_id": f"dev{i}",
                "data": f"synthetic:n=32,seed={i + 1}",
                "max_updates": max_updates,
                "seed": i,
                "state_dir": str(tmp_path / f"dev{i}"),
                "torch_threads": 1,
                "mqtt": {"url": url},
            }
            # In rounds a slower device must not let a faster one answer twice in its place.
            | ({"slowdown": 4.0} if sync and i == 1 else {}),
        )
        procs.append(Proc(f"dev{i}", ["agent", "--config", str(agent_file)], tmp_path / f"{i}.log"))
    return procs


def _logs(procs: list[Proc]) -> str:
    return "\n".join(f"--- {p.name}\n{p.text()[-3000:]}" for p in procs)


async def test_aggregator_and_agents_run_from_their_files_alone(
    durable_broker: MosquittoProcess, tmp_path: Path, federation: str
) -> None:
    procs = _federation(tmp_path, durable_broker.url, federation, max_versions=3, max_updates=3)
    codes = await run_to_exit(procs, 120)
    assert codes == {"aggregator": 0, "dev0": 0, "dev1": 0}, _logs(procs)
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    assert history[-1]["version"] == 3, _logs(procs)
    assert (tmp_path / "checkpoints" / "manifest.json").exists()
    assert "dev0: torch uses 1 CPU thread(s)" in procs[1].text()
    # The last global is a PEFT folder, and `edgefed export` writes it the same way.
    kept = tmp_path / "checkpoints" / "adapter"
    assert json.loads((kept / "edgefed.json").read_text())["version"] == 3
    export = Proc("export", ["export", "--checkpoint-dir", str(kept.parent), "--out",
                             str(tmp_path / "v3")], tmp_path / "export.log")  # fmt: skip
    assert await export.start().exited(120) == 0, export.text()
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        outputs = [
            reload_with_peft(build_model("tiny", seed=0), folder)(input_ids=ids).logits
            for folder in (kept, tmp_path / "v3")
        ]
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], build_model("tiny", seed=0)(input_ids=ids).logits)


async def test_a_sync_table_runs_fedavg_rounds_with_agents_that_know_nothing_of_it(
    durable_broker: MosquittoProcess, tmp_path: Path, federation: str
) -> None:
    """Only the aggregator's file says ``[sync]``: each device trains once per round."""
    procs = _federation(
        tmp_path, durable_broker.url, federation, max_versions=3, max_updates=3, sync=True
    )
    codes = await run_to_exit(procs, 120)
    assert codes == {"aggregator": 0, "dev0": 0, "dev1": 0}, _logs(procs)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["history"][-1]["version"] == 3, _logs(procs)
    accepted = [u for u in results["updates"] if u["accepted"]]
    assert len(accepted) == 6 and {u["staleness"] for u in accepted} == {0}, results["updates"]
    assert all(u["accepted"] for u in results["updates"]), results["updates"]
    for client in ("dev0", "dev1"):  # one update per round, on that round's version
        bases = sorted(u["base_version"] for u in accepted if u["client_id"] == client)
        assert bases == [0, 1, 2]
    rounds = results["rounds"]
    assert [r["version"] for r in rounds][:3] == [0, 1, 2]
    assert all(r["selected"] == ["dev0", "dev1"] for r in rounds)
    assert [r["closed"] for r in rounds[:3]] == ["full"] * 3


async def test_sigterm_stops_every_process_cleanly_with_its_results_written(
    durable_broker: MosquittoProcess, tmp_path: Path, federation: str
) -> None:
    """What systemd and ``docker stop`` send: results are written and every exit code is 0;
    started again, the federation merges what the agents kept unanswered exactly once."""
    procs = _federation(tmp_path, durable_broker.url, federation, max_versions=0, max_updates=0)
    series = tmp_path / "results.versions.jsonl"
    try:
        first = await _run_then_sigterm(procs, series, versions=3)  # versions 0, 1, 2
        history = json.loads((tmp_path / "results.json").read_text())["history"]
        # Each version was appended as it was made, not only written at the end.
        lines = series.read_text().splitlines()
        assert [json.loads(line)["version"] for line in lines] == [r["version"] for r in history]
        kept = {c: _outbox(tmp_path, c)[0] for c in ("dev0", "dev1")}
        # A device that starts late resends its kept updates after the other one has made
        # the versions: stop only once each has recorded an answer for them.
        second = await _run_then_sigterm(
            procs,
            series,
            versions=len(lines) + 2,
            until=lambda: all(set(ids) <= _answered_so_far(tmp_path, c) for c, ids in kept.items()),
        )
    finally:
        for proc in procs:
            proc.cleanup()
    assert first == second == {"aggregator": 0, "dev0": 0, "dev1": 0}, _logs(procs)
    assert history[-1]["version"] >= 2, _logs(procs)
    assert "SIGTERM received: stopping cleanly" in procs[0].text()
    entries = read_audit(tmp_path / "checkpoints" / "audit.jsonl")
    accepted = [
        e.update_id for e in entries if isinstance(e, UpdateEntry) and e.decision == "accepted"
    ]
    merged = [uid for e in entries if isinstance(e, MergeEntry) for uid in e.update_ids]
    assert len(accepted) == len(set(accepted)) and len(merged) == len(set(merged))
    for client, pending in kept.items():  # kept over the stop: answered after it, once
        answered = {a.update_id: a for a in _outbox(tmp_path, client)[1]}
        assert set(pending) <= answered.keys(), (client, pending)
        assert all(accepted.count(uid) == 1 for uid in pending if answered[uid].accepted)


def _outbox(tmp_path: Path, client: str) -> tuple[list[str], list[Answer]]:
    """What an agent's outbox holds: pending update ids, and the answers it recorded."""
    with Outbox(tmp_path / client / OUTBOX_FILE) as outbox:
        return outbox.pending_ids(), outbox.answers()


def _recorded(series: Path) -> int:
    """Versions the aggregator has appended to its per-version JSONL so far."""
    return len(series.read_text().splitlines()) if series.exists() else 0


def _answered_so_far(tmp_path: Path, client: str) -> set[str]:
    """Update ids a running agent's outbox has answers for (read-only: the agent writes it)."""
    path = tmp_path / client / OUTBOX_FILE
    if not path.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        return {str(row[0]) for row in db.execute("SELECT update_id FROM answered")}


async def _run_then_sigterm(
    procs: list[Proc],
    series: Path,
    *,
    versions: int,
    until: Callable[[], bool] = lambda: True,
) -> dict[str, int]:
    """Start every process, wait until all are connected, ``versions`` are recorded and
    ``until`` holds, then stop them all with SIGTERM; their exit codes."""
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + 90
    while not (
        _recorded(series) >= versions
        and all(proc.text().count("connected to") >= proc.starts for proc in procs)
        and until()
    ):
        assert time.monotonic() < deadline, _logs(procs)
        assert all(proc.running for proc in procs), _logs(procs)
        await asyncio.sleep(0.2)
    for proc in procs:
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGTERM)
    return {proc.name: await proc.exited(30) for proc in procs}


async def test_an_agent_waits_for_a_broker_that_is_down_and_joins_when_it_comes(
    tmp_path: Path, federation: str
) -> None:
    """No private embedded broker: it logs each failed try with the URL and keeps trying."""
    if mosquitto_binary() is None:
        pytest.skip("the mosquitto binary is not installed")
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    agent_file = _write(
        tmp_path / "dev0.toml",
        {"federation": federation, "client_id": "dev0", "data": "synthetic:n=32,seed=1"}
        | {"mqtt": {"url": url}},
    )
    agent = Proc("dev0", ["agent", "--config", str(agent_file)], tmp_path / "dev0.log")
    try:
        agent.start()
        deadline = time.monotonic() + 30
        while agent.text().count(f"connecting to {url}") < 2:
            assert agent.running and time.monotonic() < deadline, agent.text()
            await asyncio.sleep(0.2)
        with MosquittoProcess(port=port) as broker:
            while "connected to" not in agent.text():
                assert agent.running and time.monotonic() < deadline + 30, agent.text()
                await asyncio.sleep(0.2)
            assert broker.url == url
            assert agent.popen is not None
            agent.popen.send_signal(signal.SIGTERM)
            assert await agent.exited(30) == 0, agent.text()
    finally:
        agent.cleanup()
    assert "an embedded one" not in agent.text()


async def test_operators_read_the_latest_metrics_as_json_with_mosquitto_sub(
    durable_broker: MosquittoProcess, tmp_path: Path, federation: str
) -> None:
    """Retained at QoS 1, so ``mosquitto_sub`` shows the latest report whenever it joins."""
    tool = shutil.which("mosquitto_sub")
    if tool is None:
        pytest.skip("mosquitto_sub is not installed")
    procs = _federation(tmp_path, durable_broker.url, federation, max_versions=2, max_updates=2)
    codes = await run_to_exit(procs, 120)
    assert codes == {"aggregator": 0, "dev0": 0, "dev1": 0}, _logs(procs)
    broker = BrokerURL.parse(durable_broker.url)
    args = ["-h", broker.host, "-p", str(broker.port), "-t", "edgefed/+/metrics/json"]
    command = [tool, *args, "-C", "1", "-W", "10"]
    shown = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, check=True
    )
    report = json.loads(shown.stdout)
    assert (report["version"], report["merged_updates"]) == (2, 4)
    assert report["rejected_updates"] == 0 and report["eval_loss"] > 0
