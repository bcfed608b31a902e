"""The aggregator service against the real broker: hostile input is nacked, state survives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiomqtt
import pytest
import torch

from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from edgefed.transport.config import BrokerURL, TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import Ack, GlobalModel, Update

pytestmark = pytest.mark.broker


@contextlib.asynccontextmanager
async def running_service(url: str, federation: str) -> AsyncIterator[AggregatorService]:
    config = AggregatorConfig(
        federation=federation,
        strategy=StrategySettings(name="fedasync"),
        max_update_norm=1e3,
        norm_action="reject",
    )
    transport_config = TransportConfig(url=url, client_id=f"{federation}-aggregator")
    async with MqttTransport(transport_config) as transport:
        service = AggregatorService(config, transport)
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 60)
        try:
            yield service
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _next_ack(transport: MqttTransport) -> Ack:
    async with asyncio.timeout(20):
        async for delivery in transport.deliveries():
            if isinstance(delivery, Delivery) and isinstance(delivery.message, Ack):
                return delivery.message
    raise AssertionError("no ack")


async def test_service_rejects_bad_updates_and_keeps_state(
    mosquitto_url: str, federation: str
) -> None:
    async with running_service(mosquitto_url, federation) as service:
        initial = {name: t.clone() for name, t in service.current.items()}
        client = TransportConfig(url=mosquitto_url, client_id=f"{federation}-dev1")
        async with MqttTransport(client) as device:
            await device.subscribe(topics.ack(federation, "dev1"))

            broker = BrokerURL.parse(mosquitto_url)
            async with aiomqtt.Client(broker.host, broker.port) as raw:
                await raw.publish(topics.update(federation, "dev1"), b"\x93not msgpack", qos=1)
            nack = await _next_ack(device)
            assert not nack.accepted and nack.reason == "malformed"
            # The results name it too: the sender its topic names, and why.
            unreadable = service.results.updates[-1]
            assert (unreadable.client_id, unreadable.update_id) == ("dev1", "unreadable")
            assert unreadable.reason == "malformed" and unreadable.bytes == 12
            assert unreadable.base_version is None and not unreadable.accepted

            def update(**changes: object) -> Update:
                delta = {name: torch.full_like(t, 0.01) for name, t in initial.items()}
                fields: dict[str, object] = {
                    "client_id": "dev1",
                    "task_id": service.config.task_id,
                    "base_version": 0,
                    "num_samples": 8,
                    "delta": delta,
                }
                return Update.model_validate(fields | changes)

            first_name = next(iter(initial))
            cases = {
                "wrong_shape": {"delta": {first_name: torch.zeros(3, 3)}},
                "non_finite": {
                    "delta": {n: torch.full_like(t, float("nan")) for n, t in initial.items()}
                },
                "norm_bound": {"delta": {n: torch.full_like(t, 1e6) for n, t in initial.items()}},
                "wrong_task": {"task_id": "another-task"},
                "future_version": {"base_version": 5},
                "too_many_samples": {"num_samples": 10**9},  # above local_steps x batch
            }
            for reason, changes in cases.items():
                await device.publish(topics.update(federation, "dev1"), update(**changes))
                nack = await _next_ack(device)
                assert (nack.accepted, nack.reason) == (False, reason), nack
                assert nack.detail

            assert service.version == 0
            for name, tensor in service.current.items():
                assert torch.equal(tensor, initial[name])

            good = update()
            await device.publish(topics.update(federation, "dev1"), good)
            ack = await _next_ack(device)
            assert ack.accepted and ack.version == 1 and not ack.duplicate
            await device.publish(topics.update(federation, "dev1"), good)
            again = await _next_ack(device)
            assert again.accepted and again.duplicate and again.version == 1
            assert service.version == 1
            assert service.results.merges == {good.update_id: 1}
            changed = service.current[first_name] - initial[first_name]
            assert torch.all(changed != 0)


async def test_service_publishes_retained_global_for_late_subscribers(
    mosquitto_url: str, federation: str
) -> None:
    async with running_service(mosquitto_url, federation) as service:
        client = TransportConfig(url=mosquitto_url, client_id=f"{federation}-late")
        async with MqttTransport(client) as device:
            await device.subscribe(topics.global_filter(federation))
            async with asyncio.timeout(20):
                async for delivery in device.deliveries():
                    if isinstance(delivery, Delivery) and isinstance(delivery.message, GlobalModel):
                        received = delivery.message
                        break
            assert received.version == service.version == 0
            for name, tensor in service.current.items():
                assert torch.equal(received.tensors[name], tensor)
