"""An agent that waits on its aggregator says what it waits for, instead of waiting silently."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edge_agent import answers
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.messages import ModelRef, Task

CONFIG = AgentConfig(federation="fed", client_id="dev0", data="synthetic:n=8")


async def _waiting_lines(broker: MemoryBroker, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.clear()
    async with broker.transport("dev0") as transport:
        agent = asyncio.create_task(EdgeAgent(CONFIG, transport).run())
        await asyncio.sleep(0.5)
        agent.cancel()
        await asyncio.gather(agent, return_exceptions=True)
    return [r.getMessage() for r in caplog.records if r.name == "edge_agent.answers"]


async def test_an_agent_says_what_it_waits_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(answers, "WAIT_REPORT_S", 0.1)
    caplog.set_level(logging.INFO, logger="edge_agent.answers")
    broker = MemoryBroker()
    lines = await _waiting_lines(broker, caplog)
    assert lines and "dev0: no task on edgefed/fed/task yet" in lines[0], lines
    # A task whose global never comes: the agent names the topics it listens on.
    task = Task(
        task_id="t", federation="fed", version=3, global_chunks=2, model=ModelRef(name="tiny")
    )
    async with broker.transport("aggregator") as aggregator:
        await aggregator.publish(topics.task("fed"), task, retain=True)
    lines = await _waiting_lines(broker, caplog)
    assert (
        lines
        and "global of version 3 (edgefed/fed/global/3/0, edgefed/fed/global/3/1)" in lines[-1]
    )
