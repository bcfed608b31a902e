"""The server step's schedule: the pure rule, then a real service applying it and stopping on time."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest
import torch

from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.schedule import lr_factor, run_progress
from aggregator.service import AggregatorService
from edgefed.transport.config import TransportConfig
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import Update


def test_progress_follows_whichever_bound_comes_first() -> None:
    assert run_progress(version=3, max_versions=0, elapsed_s=50.0, max_seconds=0.0) is None
    assert run_progress(version=3, max_versions=12, elapsed_s=50.0, max_seconds=0.0) == 0.25
    assert run_progress(version=3, max_versions=0, elapsed_s=50.0, max_seconds=100.0) == 0.5
    assert run_progress(version=3, max_versions=12, elapsed_s=50.0, max_seconds=100.0) == 0.5
    assert run_progress(version=30, max_versions=12, elapsed_s=1.0, max_seconds=100.0) == 1.0


def test_cosine_decays_from_one_to_its_final_value() -> None:
    assert lr_factor("cosine", 0.0, final=0.0) == 1.0
    assert lr_factor("cosine", 0.5, final=0.0) == pytest.approx(0.5)
    assert lr_factor("cosine", 1.0, final=0.2) == pytest.approx(0.2)
    steps = [lr_factor("cosine", p / 10, final=0.0) for p in range(11)]
    assert all(a > b for a, b in itertools.pairwise(steps))
    assert lr_factor("constant", 0.9, final=0.0) == 1.0
    assert lr_factor("cosine", None, final=0.0) == 1.0  # an open-ended run never decays


async def _steps(url: str, federation: str, schedule: str) -> list[float]:
    """The step each merged update of 0.01 per value moved the global by, versions 1 to 4."""
    config = AggregatorConfig(
        federation=federation,
        strategy=StrategySettings(buffer_size=1, schedule=schedule),  # type: ignore[arg-type]
        max_versions=4,
    )
    transport_config = TransportConfig(url=url, client_id=f"{federation}-aggregator")
    async with MqttTransport(transport_config) as transport:
        service = AggregatorService(config, transport)
        serving = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 60)
        device_config = TransportConfig(url=url, client_id=f"{federation}-dev1")
        steps: list[float] = []
        async with MqttTransport(device_config) as device:
            for version in range(4):
                before = {name: t.clone() for name, t in service.current.items()}
                update = Update(
                    client_id="dev1",
                    task_id=config.task_id,
                    base_version=version,
                    num_samples=8,
                    delta={name: torch.full_like(t, 0.01) for name, t in before.items()},
                )
                await device.publish(topics.update(federation, "dev1"), update)
                await asyncio.wait_for(service.wait_for_version(version + 1), 20)
                name = next(iter(before))
                steps.append(float((service.current[name] - before[name]).mean()))
        await asyncio.wait_for(serving, 20)
    return steps


@pytest.mark.broker
async def test_the_service_decays_its_step_over_max_versions(
    mosquitto_url: str, federation: str
) -> None:
    cosine = await _steps(mosquitto_url, federation + "-cos", "cosine")
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * v / 4)) for v in range(4)]
    assert cosine == pytest.approx(expected, rel=1e-4)
    constant = await _steps(mosquitto_url, federation + "-const", "constant")
    assert constant == pytest.approx([0.01] * 4, rel=1e-4)


@pytest.mark.broker
async def test_the_service_stops_merging_after_max_seconds(
    mosquitto_url: str, federation: str
) -> None:
    config = AggregatorConfig(federation=federation, max_seconds=1.0)
    transport_config = TransportConfig(url=mosquitto_url, client_id=f"{federation}-aggregator")
    async with MqttTransport(transport_config) as transport:
        service = AggregatorService(config, transport)
        started = time.monotonic()
        results = await asyncio.wait_for(service.run(), 60)
        waited = time.monotonic() - started
    assert 1.0 <= waited < 10.0, waited
    assert [record.version for record in results.history] == [0]
