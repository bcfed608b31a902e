"""Real processes for the crash tests: a private Mosquitto with persistence, and a harness that
runs ``edgefed aggregator`` and ``edgefed agent`` as subprocesses, kills them with SIGKILL,
and reads back what each side recorded (the aggregator's audit log and checkpoint, the
agents' outboxes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from aggregator.audit import MergeEntry, UpdateEntry, read_audit
from edge_agent.outbox import OUTBOX_FILE, Answer, Outbox
from edgefed.transport.broker import DURABLE_CONFIG, MosquittoProcess, mosquitto_binary

REQUIRE_MOSQUITTO = "EDGEFED_REQUIRE_MOSQUITTO"


FEDASYNC_AGGREGATOR: dict[str, object] = {
    "eval_data": "synthetic:n=16,seed=9",
    "eval_every": 1000,
    "max_staleness": 50,
    "strategy": {"name": "fedasync"},
    "train": {"local_steps": 3, "batch_size": 4, "seq_len": 16},
}
"""An aggregator of the tiny model merging every update (the failover and bridge tests)."""
PATIENT_AGENT: dict[str, object] = {"ack_timeout_s": 3.0, "max_resends": 100, "slowdown": 3.0}
"""A device that re-sends for as long as a broker is away."""


@pytest.fixture
def durable_broker() -> Iterator[MosquittoProcess]:
    """A private Mosquitto with persistence on (broker_config/durable.conf), on a free port."""
    if mosquitto_binary() is None:
        if os.environ.get(REQUIRE_MOSQUITTO) == "1":
            pytest.fail(f"the mosquitto binary is not installed, and {REQUIRE_MOSQUITTO}=1")
        pytest.skip("the mosquitto binary is not installed")
    with MosquittoProcess(config=DURABLE_CONFIG) as broker:
        yield broker


def _toml(values: dict[str, object]) -> str:
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]")
            tables.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join([*lines, *tables]) + "\n"


@dataclass
class Proc:
    """One ``edgefed`` subprocess; started, killed and paused by its own PID only."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    killed: bool = False

    def start(self) -> Proc:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts} =====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "edgefed.cli", "-v", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.starts += 1
        self.killed = False
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler, no flush, no goodbye, as a crash or a power cut."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.killed = True

    @property
    def failed(self) -> bool:
        """Exited with an error of its own (not by our SIGKILL)."""
        return self.popen is not None and self.popen.poll() not in (None, 0) and not self.killed

    def stop(self) -> None:
        """SIGTERM: the clean stop a service manager asks for."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)

    def pause(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGCONT)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def exited(self, timeout_s: float) -> int:
        assert self.popen is not None
        deadline = time.monotonic() + timeout_s
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout_s} s")
            await asyncio.sleep(0.1)
        return self.popen.returncode

    def cleanup(self) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGCONT)
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()


@dataclass(frozen=True)
class TinyFederation:
    """An aggregator and two agents of the tiny model, each run from its config file alone."""

    aggregator_file: Path
    aggregator: Proc
    agents: list[Proc]


def tiny_federation(
    tmp_path: Path,
    url: str,
    federation: str,
    *,
    aggregator: dict[str, object],
    agent: dict[str, object],
) -> TinyFederation:
    """Write the config files (results to ``tmp_path/results.json``); start nothing."""
    common = {"federation": federation, "mqtt": {"url": url}}
    aggregator_file = tmp_path / "aggregator.toml"
    aggregator_file.write_text(_toml(common | {
        "json_out": str(tmp_path / "results.json"), "eval_data": "synthetic:n=16,seed=9",
        "strategy": {"buffer_size": 2}, "train": {"local_steps": 2, "batch_size": 4, "seq_len": 16},
    } | aggregator))  # fmt: skip
    agents = []
    for i in range(2):
        agent_file = tmp_path / f"dev{i}.toml"
        agent_file.write_text(_toml(common | {
            "client_id": f"dev{i}", "data": f"synthetic:n=32,seed={i + 1}", "seed": i,
            "torch_threads": 1,
        } | agent))  # fmt: skip
        args = ["agent", "--config", str(agent_file)]
        agents.append(Proc(f"dev{i}", args, tmp_path / f"{i}.log"))
    args = ["aggregator", "--config", str(aggregator_file)]
    return TinyFederation(aggregator_file, Proc("aggregator", args, tmp_path / "a.log"), agents)


async def run_to_exit(procs: list[Proc], timeout_s: float) -> dict[str, int]:
    """Start every process, wait for each to exit; their exit codes by name."""
    try:
        for proc in procs:
            proc.start()
        return {proc.name: await proc.exited(timeout_s) for proc in procs}
    finally:
        for proc in procs:
            proc.cleanup()


@dataclass(frozen=True)
class ExactlyOnce:
    """The comparison of what agents saw acked with what the aggregator merged."""

    acked: frozenset[str]
    merged: tuple[str, ...]
    buffered: frozenset[str]
    versions: tuple[int, ...]
    duplicates: int


@dataclass
class Federation:
    """A federation of real processes against one broker, and what they left on disk."""

    root: Path
    url: str
    name: str
    aggregator_settings: dict[str, object]
    agent_settings: dict[str, object]
    procs: list[Proc] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "aggregator"

    def aggregator(self, *, max_versions: int, url: str | None = None) -> Proc:
        config = self.root / "aggregator.toml"
        config.write_text(_toml(self.aggregator_settings))
        args = ["aggregator", "--broker", url or self.url, "--federation", self.name]
        args += ["--config", str(config), "--max-versions", str(max_versions)]
        args += ["--checkpoint-dir", str(self.checkpoint_dir)]
        return self._proc("aggregator", args)

    def site(
        self, site_id: str, *, url: str, max_versions: int, settings: dict[str, object]
    ) -> Proc:
        """A site aggregator serving the broker at ``url``, the federation's broker upstream."""
        config = self.root / f"{site_id}.toml"
        site = {"role": "site", "site_id": site_id, "upstream": {"url": self.url}}
        config.write_text(_toml(site | settings))
        args = ["aggregator", "--broker", url, "--federation", self.name]
        args += ["--config", str(config), "--max-versions", str(max_versions)]
        args += ["--checkpoint-dir", str(self.root / site_id)]
        return self._proc(site_id, args)

    def intake(self, replica_id: str, *, settings: dict[str, object]) -> Proc:
        """An intake replica on the federation's broker, taking its share of the updates."""
        config = self.root / f"{replica_id}.toml"
        config.write_text(_toml({"role": "intake", "site_id": replica_id} | settings))
        args = ["aggregator", "--broker", self.url, "--federation", self.name]
        args += ["--config", str(config)]
        return self._proc(replica_id, args)

    def agent(
        self, client_id: str, *, max_updates: int, seed: int = 0, url: str | None = None
    ) -> Proc:
        config = self.root / f"{client_id}.toml"
        config.write_text(_toml(self.agent_settings | {"seed": seed}))
        args = ["agent", "--broker", url or self.url, "--federation", self.name]
        args += ["--client-id", client_id, "--data", f"synthetic:n=48,seed={seed + 1}"]
        args += ["--config", str(config), "--max-updates", str(max_updates)]
        args += ["--state-dir", str(self.state_dir(client_id))]
        return self._proc(client_id, args)

    def _proc(self, name: str, args: list[str]) -> Proc:
        for proc in self.procs:
            if proc.name == name:
                proc.args = args
                return proc
        proc = Proc(name, args, self.root / f"{name}.log")
        self.procs.append(proc)
        return proc

    def state_dir(self, client_id: str) -> Path:
        return self.root / "agents" / client_id

    # -- what each side recorded

    def audit(self, folder: Path | None = None) -> list[UpdateEntry | MergeEntry]:
        """The audit log of the aggregator, or of the one checkpointing into ``folder``."""
        return read_audit((folder or self.checkpoint_dir) / "audit.jsonl")

    def accepted_in_audit(self) -> int:
        return sum(
            1 for e in self.audit() if isinstance(e, UpdateEntry) and e.decision == "accepted"
        )

    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.checkpoint_dir / "manifest.json").read_text())
        return data

    def answers(self, client_id: str) -> list[Answer]:
        with Outbox(self.state_dir(client_id) / OUTBOX_FILE) as outbox:
            return outbox.answers()

    def pending(self, client_id: str) -> list[str]:
        with Outbox(self.state_dir(client_id) / OUTBOX_FILE) as outbox:
            return outbox.pending_ids()

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.text()[-6000:]}" for p in self.procs)

    def check_exactly_once(self, clients: list[str]) -> ExactlyOnce:
        """Assert every update an agent saw accepted is merged exactly once (or still buffered)."""
        entries = self.audit()
        accepted = [
            e.update_id for e in entries if isinstance(e, UpdateEntry) and e.decision == "accepted"
        ]
        assert len(accepted) == len(set(accepted)), "an update was accepted twice"
        merges = [e for e in entries if isinstance(e, MergeEntry)]
        merged = tuple(uid for m in merges for uid in m.update_ids)
        assert len(merged) == len(set(merged)), "an update was merged twice"
        versions = tuple(m.version for m in merges)
        assert versions == tuple(range(1, len(merges) + 1)), f"versions went wrong: {versions}"
        states = self.manifest()["states"]
        assert isinstance(states, dict)
        buffered = frozenset(states["strategy"].get("update_ids", []))
        assert not buffered & set(merged)
        acked = frozenset(
            answer.update_id for c in clients for answer in self.answers(c) if answer.accepted
        )
        assert acked == set(accepted), "agents and the audit log disagree on what was accepted"
        assert acked == set(merged) | buffered, "an acked update is neither merged nor buffered"
        duplicates = sum(
            1 for e in entries if isinstance(e, UpdateEntry) and e.decision == "duplicate"
        )
        return ExactlyOnce(acked, merged, buffered, versions, duplicates)

    async def until(self, what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            for proc in self.procs:
                if proc.failed:
                    raise AssertionError(f"{proc.name} failed waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            await asyncio.sleep(0.05)


class Broker(Protocol):
    """What a federation needs of a broker: where to connect (URLs separated by commas)."""

    @property
    def url(self) -> str: ...


@pytest.fixture
def federation_of(
    tmp_path: Path, federation: str
) -> Iterator[Callable[[Broker, dict[str, object], dict[str, object]], Federation]]:
    made: list[Federation] = []

    def make(broker: Broker, aggregator: dict[str, object], agent: dict[str, object]) -> Federation:
        fed = Federation(tmp_path, broker.url, federation, aggregator, agent)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        for proc in fed.procs:
            proc.cleanup()
