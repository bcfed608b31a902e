"""Seed updates on the aggregator: expansion, the perturbation-count controller, method mixing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import torch

from aggregator.config import AggregatorConfig, FwdGradSettings, StrategySettings
from aggregator.fwdgrad import (
    PerturbationController,
    count_perturbations,
    expand_seeds,
    perturbations_per_step,
)
from aggregator.service import AggregatorService
from aggregator.validation import ValidationPolicy, validate_update
from edgefed.ml.perturbation import Layout, rademacher
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.errors import ConfigError, UpdateRejected
from schemas.messages import Ack, DeviceProfile, SeedDelta, SeedStep, Status, Task, Update

SHAPES = {"l.lora_A.weight": (2, 6), "l.lora_B.weight": (6, 2)}


def _update(seeds: SeedDelta | None = None, **changes: object) -> Update:
    fields: dict[str, object] = {
        "client_id": "dev1",
        "task_id": "task-1",
        "base_version": 0,
        "num_samples": 4,
        "method": "fwdgrad",
        "seeds": seeds,
    }
    return Update.model_validate(fields | changes)


def _seeds(layout: Layout, *, k: int = 3, steps: int = 2) -> SeedDelta:
    return SeedDelta(
        lr=0.5,
        target=layout.target,
        layout=layout.fingerprint,
        steps=tuple(
            SeedStep(seed=s + 10, indices=tuple(range(k)), d=tuple(float(i + s) for i in range(k)))
            for s in range(steps)
        ),
    )


def test_expand_seeds_rebuilds_the_sum_of_steps() -> None:
    layout = Layout.from_shapes(SHAPES, "lora_B")
    update = _update(_seeds(layout))
    assert count_perturbations(update) == 6 and perturbations_per_step(update) == 3
    dense = expand_seeds(update, shapes=SHAPES, max_perturbations=6)
    assert dense.seeds is None and dense.update_id == update.update_id
    expected = torch.zeros(layout.size, dtype=torch.float64)
    for s in range(2):
        mean = sum(float(i + s) * rademacher(s + 10, i, 12, dtype=torch.float64) for i in range(3))
        expected -= 0.5 * mean / 3
    assert torch.allclose(dense.delta["l.lora_B.weight"].reshape(-1).double(), expected, atol=1e-7)
    assert not dense.delta["l.lora_A.weight"].any()
    plain = _update(None, delta={"w": torch.ones(1)})
    assert expand_seeds(plain, shapes=SHAPES, max_perturbations=1) is plain
    assert perturbations_per_step(plain) is None


def test_expand_seeds_bounds_work_and_checks_layout() -> None:
    layout = Layout.from_shapes(SHAPES)
    with pytest.raises(UpdateRejected) as too_many:
        expand_seeds(_update(_seeds(layout)), shapes=SHAPES, max_perturbations=5)
    assert too_many.value.reason == "too_large"
    other = {**SHAPES, "l.lora_B.weight": (7, 2)}
    with pytest.raises(UpdateRejected) as wrong:
        expand_seeds(_update(_seeds(layout)), shapes=other, max_perturbations=100)
    assert wrong.value.reason == "wrong_shape" and "layout" in wrong.value.detail


def test_validation_accepts_allowed_methods_and_refuses_unexpanded_seeds() -> None:
    shapes = {"w": (2,)}
    lora_task = {"task_id": "task-1", "method": "lora", "current_version": 0, "shapes": shapes}
    dense = _update(None, delta={"w": torch.ones(2)})
    with pytest.raises(UpdateRejected) as only_lora:
        validate_update(dense, policy=ValidationPolicy(), **lora_task)  # type: ignore[arg-type]
    assert only_lora.value.reason == "wrong_method"
    mixed = ValidationPolicy(allowed_methods=frozenset({"fwdgrad"}))
    assert validate_update(dense, policy=mixed, **lora_task).delta["w"].sum() == 2  # type: ignore[arg-type]
    with pytest.raises(UpdateRejected) as kd:
        validate_update(dense.model_copy(update={"method": "kd"}), policy=mixed, **lora_task)  # type: ignore[arg-type]
    assert "also accepts ['fwdgrad']" in kd.value.detail
    layout = Layout.from_shapes({"w.lora_B.weight": (2,)})
    with pytest.raises(UpdateRejected) as raw:
        validate_update(_update(_seeds(layout)), policy=mixed, **lora_task)  # type: ignore[arg-type]
    assert raw.value.reason == "malformed"


def test_controller_raises_k_for_noisy_estimates_and_lowers_it_for_quiet_ones() -> None:
    controller = PerturbationController(threshold=1.0, initial=16, maximum=200, merge_size=2)
    assert controller.perturbations == 16 and controller.merged_variance() is None
    controller.observe(10.0, 16)  # s^2 = 160 -> wants 80 per device, moves at most 2x
    assert controller.perturbations == 32
    controller.observe(5.0, 32)
    assert controller.perturbations == 64
    for _ in range(20):
        controller.observe(160.0 / 80, 80)
    assert controller.perturbations == 80
    assert controller.merged_variance() == pytest.approx(1.0)
    for _ in range(20):
        controller.observe(0.001, 80)  # quiet: walk down to the floor
    assert controller.perturbations == 1
    controller.observe(None, 8)  # a lora update: nothing to learn
    controller.observe(float("nan"), 8)
    assert controller.perturbations == 1


def test_controller_asks_faster_devices_for_more() -> None:
    controller = PerturbationController(threshold=1.0, initial=20, minimum=4, maximum=64)
    assert controller.for_client("a") == 20
    controller.set_speed("fast", 1.0)
    controller.set_speed("slow", 0.25)
    controller.set_speed("odd", float("inf"))  # ignored
    assert controller.for_client("fast") == 32  # 20 * 1 / 0.625
    assert controller.for_client("slow") == 8
    assert controller.for_client("unknown") == 20
    controller.set_speed("fast", 100.0)
    assert controller.for_client("fast") == 40  # 20 * 100 / 50.125
    capped = PerturbationController(threshold=1.0, initial=20, maximum=30)
    capped.set_speed("fast", 1.0)
    capped.set_speed("slow", 0.25)
    assert capped.for_client("fast") == 30 and capped.for_client("slow") == 8
    controller.set_speed("fast", None)
    assert controller.for_client("fast") == 20
    with pytest.raises(ConfigError):
        PerturbationController(threshold=0.0, initial=4)
    with pytest.raises(ConfigError):
        PerturbationController(threshold=1.0, initial=4, minimum=8, maximum=4)


def test_controller_state_survives_a_restart() -> None:
    controller = PerturbationController(threshold=1.0, initial=8, maximum=100)
    controller.observe(4.0, 8)
    controller.set_speed("fast", 2.0)
    controller.set_speed("slow", 0.5)
    restored = PerturbationController(threshold=1.0, initial=8, maximum=100)
    restored.load_state_dict(controller.state_dict())
    assert restored.perturbations == controller.perturbations == 16
    assert restored.noise == controller.noise
    assert restored.for_client("fast") == controller.for_client("fast")
    with pytest.raises(ConfigError):
        restored.load_state_dict({"target": "many", "speeds": {}})


@contextlib.asynccontextmanager
async def _service(url: str, federation: str) -> AsyncIterator[AggregatorService]:
    config = AggregatorConfig(
        federation=federation,
        method="lora",
        accept_methods=("fwdgrad",),
        strategy=StrategySettings(name="fedasync", alpha=0.5, staleness="constant"),
        fwdgrad=FwdGradSettings(variance_threshold=1e-3, max_perturbations=64),
    )
    async with MqttTransport(TransportConfig(url=url, client_id=f"{federation}-agg")) as transport:
        service = AggregatorService(config, transport)
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 60)
        try:
            yield service
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _next(transport: MqttTransport, kind: type[Ack] | type[Task]) -> Ack | Task:
    async with asyncio.timeout(20):
        async for delivery in transport.deliveries():
            if isinstance(delivery, Delivery) and isinstance(delivery.message, kind):
                return delivery.message
    raise AssertionError(f"no {kind.__name__}")


@pytest.mark.broker
async def test_service_merges_a_seed_update_and_asks_for_more_perturbations(
    mosquitto_url: str, federation: str
) -> None:
    async with _service(mosquitto_url, federation) as service:
        initial = {name: t.clone() for name, t in service.current.items()}
        layout = Layout.from_shapes({n: tuple(t.shape) for n, t in initial.items()})
        seeds = SeedDelta(
            lr=1e-3,
            layout=layout.fingerprint,
            steps=(SeedStep(seed=7, indices=(0, 1, 2, 3), d=(2.0, -1.0, 0.5, 3.0)),),
        )
        expected = expand_seeds(_update(seeds), shapes=layout.shapes, max_perturbations=10).delta
        device = TransportConfig(url=mosquitto_url, client_id=f"{federation}-dev1")
        async with MqttTransport(device) as client:
            await client.subscribe(topics.ack(federation, "dev1"))
            status = Status(
                client_id="dev1", state="training", profile=DeviceProfile(relative_speed=2.0)
            )
            await client.publish(topics.status(federation, "dev1"), status, retain=True)
            await client.publish(topics.update(federation, "dev1"), _update(seeds, variance=50.0))
            ack = await _next(client, Ack)
            assert isinstance(ack, Ack) and ack.accepted, ack
            assert ack.version == 1
            assert ack.perturbations == 32  # noisy: 16 doubled (the most one report may move)
            for name, tensor in initial.items():  # fedasync, alpha 0.5, staleness weight 1
                moved = service.current[name] - tensor
                assert torch.allclose(moved, 0.5 * expected[name], atol=1e-7), name
            await client.subscribe(topics.task(federation))
            task = await _next(client, Task)
            assert isinstance(task, Task) and task.train.perturbations == 32
            wrong = seeds.model_copy(update={"layout": "0" * 16})
            await client.publish(topics.update(federation, "dev1"), _update(wrong))
            nack = await _next(client, Ack)
            assert isinstance(nack, Ack) and nack.reason == "wrong_shape"
            # Task, method and staleness are checked before any seed is regenerated.
            foreign = _update(wrong, task_id="another-task")
            await client.publish(topics.update(federation, "dev1"), foreign)
            nack = await _next(client, Ack)
            assert isinstance(nack, Ack) and nack.reason == "wrong_task"
            await client.clear_retained(topics.status(federation, "dev1"))
