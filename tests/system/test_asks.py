"""A broker that lost its retained messages: devices ask, and the aggregator answers.

The aggregator publishes its task and global retained once per version. A broker restarted
without persistence (or one that keeps no retained messages) hands a device that joins
later nothing; before asks existed such a device waited forever at version 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path

import pytest

from edgefed.cli.main import COMMANDS, build_parser
from edgefed.transport.broker import MosquittoProcess, free_port
from edgefed.transport.raw import raw_client
from tests.system.conftest import tiny_federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def _statuses(url: str, federation: str, wanted: set[str]) -> dict[str, dict[str, object]]:
    """The aggregator's JSON copies of device statuses, read as an operator's tool would."""
    seen: dict[str, dict[str, object]] = {}
    async with raw_client(url, f"{federation}-reader") as reader:
        await reader.subscribe(f"edgefed/{federation}/status/+/json")
        async with asyncio.timeout(30):
            async for message in reader.messages:
                assert isinstance(message.payload, bytes)
                status = json.loads(message.payload)
                seen[str(status["client_id"])] = status
                if set(seen) >= wanted:
                    return seen
    raise AssertionError(seen)


async def test_devices_ask_for_what_a_restarted_broker_lost(
    mosquitto_process: MosquittoProcess, tmp_path: Path, federation: str
) -> None:
    broker = mosquitto_process  # dev.conf: no persistence, so a restart forgets everything
    fed = tiny_federation(
        tmp_path, broker.url, federation,
        aggregator={"max_versions": 2}, agent={"max_updates": 2, "ask_after_s": 1.0},
    )  # fmt: skip
    aggregator, agents, aggregator_file = fed.aggregator, fed.agents, fed.aggregator_file
    procs = [aggregator, *agents]
    try:
        aggregator.start()
        while " ready at " not in aggregator.text():
            assert aggregator.running, aggregator.text()
            await asyncio.sleep(0.1)
        broker.kill()  # the retained task and global of version 0 go with it
        broker.start()
        for agent in agents:
            agent.start()
        assert await aggregator.exited(120) == 0, aggregator.text()
        statuses = await _statuses(broker.url, federation, {"dev0", "dev1"})
    finally:
        for proc in procs:
            proc.cleanup()
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    assert history[-1]["version"] == 2
    log = aggregator.text()
    assert "asked for the task: publishing it again" in log, log
    assert "asked for the global: publishing it again" in log, log
    assert {status["state"] for status in statuses.values()} <= {"waiting", "training", "offline"}
    # The operator clears the finished federation: nothing of it stays retained.
    clear = ["clear", "--config", str(aggregator_file)]
    code, said = await _edgefed(tmp_path, clear)
    assert code == 0, said
    for topic in (
        "task",
        "global/2/0",
        "metrics",
        "metrics/json",
        "status/dev0",
        "status/dev1/json",
    ):
        assert f"deleted: edgefed/{federation}/{topic}\n" in said, said
    # Given a cluster's nodes, it reads the one that is up (nothing listens on the first).
    nodes = f"mqtt://127.0.0.1:{free_port()},{broker.url}"
    code, said = await _edgefed(tmp_path, [*clear, "--broker", nodes, "--dry-run"])
    assert (code, said.strip()) == (0, f"{federation} on {nodes}: 0 retained, 0 retained")


async def _edgefed(tmp_path: Path, args: list[str]) -> tuple[int, str]:
    """Run an ``edgefed`` command in this process; its exit code and what it printed."""
    output = io.StringIO()
    parsed = build_parser().parse_args(args)
    with contextlib.redirect_stdout(output):
        code = await asyncio.to_thread(COMMANDS[args[0]].run, parsed)
    return code, output.getvalue()
