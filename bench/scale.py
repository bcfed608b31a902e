"""Many lightweight agents on one broker: connect time, broker memory, merge lag, no loss.

The agents (:mod:`bench.scale_agents`, each a real MQTT connection replaying real
LoRA deltas of the ``tiny`` model) run in a process of their own; a real
:class:`~aggregator.service.AggregatorService` in this process validates, merges and acks
their updates through the broker. Afterwards every update an agent saw accepted is looked
up in the aggregator's merge record: it must be merged exactly once, or still sit in the
FedBuff buffer; anything else is a lost update. Lag is publish (the update's ``sent_at``)
to merged (the audit log's merge entry); both are wall-clock times on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aggregator.audit import MergeEntry, UpdateEntry, read_audit
from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from bench.scale_agents import MODEL, ScaleConfig
from bench.scale_report import ScaleResult, latency_summary, rss_mb
from edgefed.transport.broker import MosquittoProcess
from edgefed.transport.config import TransportConfig
from edgefed.transport.mqtt import MqttTransport
from schemas.errors import ConfigError
from schemas.messages import ModelRef

__all__ = ["ScaleConfig", "ScaleResult", "run_scale", "scale_run"]


def _aggregator_config(config: ScaleConfig, audit: Path) -> AggregatorConfig:
    versions = config.total_updates // config.buffer_size + 1
    return AggregatorConfig(
        federation=config.federation,
        model=ModelRef(name=MODEL),
        seed=config.seed,
        strategy=StrategySettings(name="fedbuff", buffer_size=config.buffer_size),
        max_staleness=versions + 10,  # nothing is refused as stale: every update must merge
        eval_every=0,  # scoring the tiny model is not what this run measures
        eval_data="synthetic:n=8,seed=999",
        audit_log=str(audit),
    )


class _RssSampler:
    """Samples a process's resident memory in the background; keeps the peak."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak_mb = rss_mb(pid)

    def now(self) -> float | None:
        value = rss_mb(self.pid)
        if value is not None and (self.peak_mb is None or value > self.peak_mb):
            self.peak_mb = value
        return value

    async def _loop(self) -> None:
        while True:
            self.now()
            await asyncio.sleep(0.25)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        task = asyncio.create_task(self._loop(), name="scale-rss")
        try:
            yield
        finally:
            task.cancel()


class _AgentProcess:
    """The agents' process and its JSON-lines conversation."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, config: ScaleConfig, share: int, *, url: str, progress: bool
    ) -> _AgentProcess:
        argv = ["-m", "bench.scale_agents", "--url", url, "--share", str(share)]
        argv += ["--config", json.dumps(config.to_json())]
        if not progress:
            argv.append("--no-progress")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=256 * 1024 * 1024,  # the final report holds every record on one line
        )
        return cls(proc)

    async def expect(self, event: str) -> dict[str, Any]:
        """The next message, which must be ``event``.

        Raises:
            ConfigError: The agent process ended or said something else.
        """
        stdout = self.proc.stdout
        line = await stdout.readline() if stdout is not None else b""
        if not line:
            code = await self.proc.wait()
            raise ConfigError(f"the agent process ended (exit code {code}) before {event!r}")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise ConfigError(f"the agent process said {message.get('event')!r}, not {event!r}")
        return message

    async def go(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.write(b"go\n")
            await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                async with asyncio.timeout(30):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass(frozen=True)
class _Observed:
    """What one run leaves behind, read before the aggregator and its folder go away."""

    connected: dict[str, Any]
    """The agents' ``connected`` message (connect time, update size)."""
    done: dict[str, Any]
    """The agents' ``done`` message (send time, every update's record)."""
    connected_mb: float | None
    agents_mb: float | None
    merges: dict[str, int]
    buffered: set[str]
    versions: int
    merge_times: dict[str, float]
    """Update id → when the audit log says it was merged."""


async def run_scale(
    config: ScaleConfig, *, url: str, broker_pid: int | None = None, progress: bool = True
) -> ScaleResult:
    """Run ``config`` against the broker at ``url``; ``broker_pid`` lets us read its RSS."""
    broker = _RssSampler(broker_pid)
    idle_mb = broker.now()
    observed = await _observe(config, url=url, broker=broker, progress=progress)
    return _result(config, observed, idle_mb=idle_mb, peak_mb=broker.peak_mb)


async def _observe(
    config: ScaleConfig, *, url: str, broker: _RssSampler, progress: bool
) -> _Observed:
    """Serve the agents' updates with a real aggregator; keep what it and they reported."""
    with tempfile.TemporaryDirectory(prefix="edgefed-scale-") as folder:
        audit = Path(folder) / "audit.jsonl"
        agg_transport = MqttTransport(
            TransportConfig(url=url, client_id=f"edgefed-{config.federation}-aggregator")
        )
        async with agg_transport:
            service = AggregatorService(_aggregator_config(config, audit), agg_transport)
            serving = asyncio.create_task(service.run(), name="scale-aggregator")
            # One bar, the first process's: the others' would overwrite it on the terminal.
            fleet = [
                await _AgentProcess.start(config, share, url=url, progress=progress and not share)
                for share in range(len(config.shares()))
            ]
            try:
                await service.ready.wait()
                with broker.running():
                    connected = _joined([await agents.expect("connected") for agents in fleet])
                    connected_mb = broker.now()
                    agents_mb = _total([rss_mb(agents.proc.pid) for agents in fleet])
                    for agents in fleet:
                        await agents.go()
                    done = _joined([await agents.expect("done") for agents in fleet])
            finally:
                for agents in fleet:
                    await agents.close()
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
            buffered = set(_buffered_ids(service))
            merges = dict(service.results.merges)
        entries = read_audit(audit)
    return _Observed(
        connected=connected,
        done=done,
        connected_mb=connected_mb,
        agents_mb=agents_mb,
        merges=merges,
        buffered=buffered,
        versions=service.version,
        merge_times=_merge_times(entries),
    )


def _joined(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The agents' processes' reports as one: the slowest one's times, everyone's records."""
    joined = dict(messages[0])
    for key in ("connect_s", "send_s"):
        if key in joined:
            joined[key] = max(message[key] for message in messages)
    if "records" in joined:
        joined["records"] = [record for message in messages for record in message["records"]]
    return joined


def _total(values: list[float | None]) -> float | None:
    """The sum of readings, or None when one is missing."""
    known = [value for value in values if value is not None]
    return sum(known) if len(known) == len(values) else None


def _merge_times(entries: Iterable[UpdateEntry | MergeEntry]) -> dict[str, float]:
    """When each update was merged, from the audit log's merge entries."""
    return {
        update_id: entry.time
        for entry in entries
        if isinstance(entry, MergeEntry)
        for update_id in entry.update_ids
    }


def _result(
    config: ScaleConfig, seen: _Observed, *, idle_mb: float | None, peak_mb: float | None
) -> ScaleResult:
    """Match every record the agents kept against the aggregator's merges and buffer."""
    sent: list[dict[str, Any]] = seen.done["records"]
    accepted = [r for r in sent if r["accepted"]]
    merges = seen.merges
    lost = [
        r["update_id"]
        for r in accepted
        if merges.get(r["update_id"], 0) == 0 and r["update_id"] not in seen.buffered
    ]
    lags = [
        seen.merge_times[r["update_id"]] - r["sent_at"]
        for r in accepted
        if r["update_id"] in seen.merge_times
    ]
    acks = [r["answered_at"] - r["sent_at"] for r in accepted if r["answered_at"] is not None]
    return ScaleResult(
        agents=config.agents,
        updates_sent=len(sent),
        updates_accepted=len(accepted),
        updates_rejected=sum(1 for r in sent if r["accepted"] is False),
        updates_unanswered=sum(1 for r in sent if r["accepted"] is None),
        resends=sum(r["resends"] for r in sent),
        merged_once=sum(1 for r in accepted if merges.get(r["update_id"]) == 1),
        merged_twice_or_more=sum(1 for n in merges.values() if n > 1),
        buffered=len(seen.buffered),
        lost=len(lost),
        versions=seen.versions,
        update_bytes=seen.connected["update_bytes"],
        connect_s=seen.connected["connect_s"],
        send_s=seen.done["send_s"],
        broker_rss_idle_mb=idle_mb,
        broker_rss_connected_mb=seen.connected_mb,
        broker_rss_peak_mb=peak_mb,
        agents_rss_mb=seen.agents_mb,
        merge_lag_ms=latency_summary(lags),
        ack_latency_ms=latency_summary(acks),
        merge_lags_s=lags,
    )


def _buffered_ids(service: AggregatorService) -> list[str]:
    """Accepted updates the FedBuff buffer still holds (acked, durable, not yet merged)."""
    ids = service.strategy.state_dict().get("update_ids", [])
    return [str(update_id) for update_id in ids] if isinstance(ids, list) else []


def scale_run(config: ScaleConfig, *, url: str | None = None, progress: bool = True) -> ScaleResult:
    """Run against ``url``, or against a private Mosquitto started (and stopped) for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if url is not None:
            return asyncio.run(run_scale(config, url=url, progress=progress))
        with MosquittoProcess() as broker:
            return asyncio.run(
                run_scale(config, url=broker.url, broker_pid=broker.pid, progress=progress)
            )
    finally:
        torch.set_num_threads(threads)
