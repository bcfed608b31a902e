"""An agent that waits on its aggregator says what it waits for, instead of waiting silently."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from edge_agent import answers
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.memory import MemoryBroker
from schemas import topics
from schemas.messages import Ask, ModelRef, Task

CONFIG = AgentConfig(federation="fed", client_id="dev0", data="synthetic:n=8", ask_after_s=0.05)


async def _waiting(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> tuple[list[str], list[Ask]]:
    """What an agent logs and asks for while it waits half a second."""
    caplog.clear()
    asks: list[Ask] = []
    async with broker.transport("aggregator") as aggregator, broker.transport("dev0") as device:
        await aggregator.subscribe(topics.ask_filter("fed"))
        agent = asyncio.create_task(EdgeAgent(CONFIG, device).run())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for delivery in aggregator.deliveries():
                    assert isinstance(delivery, Delivery)
                    assert isinstance(delivery.message, Ask)
                    asks.append(delivery.message)
        agent.cancel()
        await asyncio.gather(agent, return_exceptions=True)
    return [r.getMessage() for r in caplog.records if r.name == "edge_agent.answers"], asks


async def test_an_agent_says_what_it_waits_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(answers, "WAIT_REPORT_S", 0.1)
    caplog.set_level(logging.INFO, logger="edge_agent.answers")
    broker = MemoryBroker()
    lines, asks = await _waiting(broker, caplog)
    assert lines and "dev0: no task on edgefed/fed/task yet" in lines[0], lines
    assert asks and {(ask.client_id, ask.missing) for ask in asks} == {("dev0", "task")}
    # A task whose global never comes: the agent names the topics it listens on.
    task = Task(
        task_id="t", federation="fed", version=3, global_chunks=2, model=ModelRef(name="tiny")
    )
    async with broker.transport("aggregator") as aggregator:
        await aggregator.publish(topics.task("fed"), task, retain=True)
    lines, asks = await _waiting(broker, caplog)
    assert {(ask.missing, ask.version) for ask in asks} == {("global", 3)}
    assert (
        lines
        and "global of version 3 (edgefed/fed/global/3/0, edgefed/fed/global/3/1)" in lines[-1]
    )
