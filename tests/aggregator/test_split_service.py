"""Split learning through the real broker: fleets learn, vanished devices and garbage do not hurt."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
import pytest
import torch

from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from aggregator.split_service import SplitService
from aggregator.split_training import SplitServerConfig
from edge_agent.agent import AgentReport, EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.split_channel import MqttSplitChannel
from edgefed.transport.config import BrokerURL, TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.messages import LoraSpec, ModelRef, SplitReply, SplitRequest, TrainSpec

pytestmark = pytest.mark.broker

LORA = LoraSpec(rank=4, target_modules=("q_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Running:
    service: AggregatorService
    split: SplitService


@contextlib.asynccontextmanager
async def running(
    url: str, federation: str, *, versions: int = 0, step_timeout_s: float = 30.0
) -> AsyncIterator[Running]:
    config = AggregatorConfig(
        federation=federation,
        method="split",
        model=ModelRef(name="tiny-4l"),
        lora=LORA,
        train=TrainSpec(local_steps=8, batch_size=8, seq_len=32, lr=2e-2),
        strategy=StrategySettings(name="fedasync", alpha=0.6),
        eval_data="synthetic:n=64,seed=999",
        max_versions=versions,
    )
    agg_config = TransportConfig(url=url, client_id=f"{federation}-aggregator")
    split_config = TransportConfig(url=url, client_id=f"{federation}-split")
    async with MqttTransport(agg_config) as agg, MqttTransport(split_config) as side:
        service = AggregatorService(config, agg)
        settings = SplitServerConfig(lr=2e-2, step_timeout_s=step_timeout_s)
        split = SplitService.beside(service, side, settings=settings)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(split.run())]
        await asyncio.wait_for(service.ready.wait(), 30)
        await asyncio.wait_for(split.ready.wait(), 30)
        try:
            yield Running(service, split)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _agent(url: str, federation: str, name: str, seed: int, **trainer: object) -> AgentReport:
    config = AgentConfig(
        federation=federation,
        client_id=name,
        data=f"synthetic:n=96,seed={seed}",
        seed=seed,
        max_updates=2,
        trainer=trainer,  # type: ignore[arg-type]
    )
    transport_config = TransportConfig(url=url, client_id=f"{federation}-{name}")
    async with MqttTransport(transport_config) as transport:
        return await EdgeAgent(config, transport).run()


@pytest.mark.parametrize(("variant", "cuts"), [("vanilla", (1, 2, 3)), ("u_shaped", (1, 3))])
async def test_split_fleet_lowers_eval_loss(
    mosquitto_url: str, federation: str, variant: str, cuts: tuple[int, ...]
) -> None:
    async with running(mosquitto_url, federation) as run:
        reports = await asyncio.wait_for(
            asyncio.gather(
                *(
                    _agent(mosquitto_url, federation, f"dev{i}", i, cut=cut, variant=variant)
                    for i, cut in enumerate(cuts)
                )
            ),
            60,
        )
        assert all(r.accepted == 2 for r in reports), reports
        for report in reports:  # the device side of the comparison table, per step
            assert len(report.split) == 2 and report.split[0].peak_mb > 0
            steps = [step for fit in report.split for step in fit.steps]
            assert len(steps) == 16
            assert all(s.bytes_up > 0 and s.bytes_down > 0 and s.compute_s > 0 for s in steps)
        history = run.service.results.history
        async with asyncio.timeout(10):  # the last version is evaluated after its ack
            while history[-1].version < 2 * len(cuts):  # noqa: ASYNC110 (no event to await)
                await asyncio.sleep(0.05)
        first, last = history[0].eval_loss, history[-1].eval_loss
        assert first is not None and last is not None
        assert last < 0.9 * first, [h.eval_loss for h in history]
        assert run.split.server.served >= 8 * 2 * len(cuts)
        assert not run.split.rejected
        assert run.split.bytes_in > 0 and run.split.bytes_out > 0
        records = run.split.results.split
        assert len(records) == (2 if variant == "u_shaped" else 1) * 16 * len(cuts)
        assert all(r.accepted and r.bytes_up > 0 and r.bytes_down > 0 for r in records)
        times = [r.time_s for r in records]  # on the clock of the versions' records
        assert times == sorted(times) and 0 < times[-1] <= history[-1].time_s, times


def _request(federation: str, client: str, **changes: object) -> SplitRequest:
    fields: dict[str, object] = {
        "step_id": "s1",
        "client_id": client,
        "task_id": "task-1",
        "cut": 2,
        "tensors": {
            "hidden": torch.randn(2, 8, 64),
            "labels": torch.randint(0, 64, (2, 8)),
        },
    }
    return SplitRequest.model_validate(fields | changes)


async def _reply(transport: MqttTransport) -> SplitReply:
    async with asyncio.timeout(10):
        async for delivery in transport.deliveries():
            if isinstance(delivery, Delivery) and isinstance(delivery.message, SplitReply):
                return delivery.message
    raise AssertionError("no split reply")


async def test_split_server_survives_vanished_devices_and_garbage(
    mosquitto_url: str, federation: str
) -> None:
    async with running(mosquitto_url, federation, step_timeout_s=0.5) as run:
        server = run.split.server
        device_config = TransportConfig(url=mosquitto_url, client_id=f"{federation}-dev")
        async with MqttTransport(device_config) as device:
            await device.subscribe(topics.split_bwd(federation, "dev"))
            await device.subscribe(topics.split_bwd(federation, "ghost"))
            fwd = topics.split_fwd(federation, "dev")

            broker = BrokerURL.parse(mosquitto_url)
            async with aiomqtt.Client(broker.host, broker.port) as raw:
                await raw.publish(fwd, b"\x93not msgpack", qos=1)
            refusal = await _reply(device)
            assert (refusal.accepted, refusal.reason) == (False, "malformed")
            assert refusal.detail

            cases = {
                "wrong_task": {"task_id": "other"},
                "wrong_shape": {
                    "tensors": {
                        "hidden": torch.randn(2, 8, 63),
                        "labels": torch.zeros(2, 8, dtype=torch.long),
                    }
                },
                "non_finite": {
                    "tensors": {
                        "hidden": torch.full((2, 8, 64), float("nan")),
                        "labels": torch.zeros(2, 8, dtype=torch.long),
                    }
                },
                "malformed": {
                    "tensors": {"hidden": torch.randn(2, 8, 64), "labels": torch.full((2, 8), 999)}
                },
            }
            before = {n: t.clone() for n, t in server.model.state_dict().items() if "lora" in n}
            for reason, changes in cases.items():
                await device.publish(fwd, _request(federation, "dev", **changes))
                reply = await _reply(device)
                assert (reply.accepted, reply.reason) == (False, reason), reply
                assert reply.detail
            after = server.model.state_dict()
            assert all(torch.equal(t, after[n]) for n, t in before.items())
            backward = _request(
                federation,
                "dev",
                variant="u_shaped",
                phase="backward",
                tensors={"grad": torch.randn(2, 8, 64)},
            )
            await device.publish(fwd, backward)
            reply = await _reply(device)
            assert (reply.accepted, reply.reason) == (False, "malformed")
            assert "no open forward" in reply.detail

            # A device opens a U-shaped step and vanishes: others are served meanwhile.
            ghost = _request(
                federation, "ghost", variant="u_shaped", tensors={"hidden": torch.randn(2, 8, 64)}
            )
            await device.publish(topics.split_fwd(federation, "ghost"), ghost)
            assert "hidden" in (await _reply(device)).tensors
            assert server.open_steps == 1
            good = _request(federation, "dev")
            await device.publish(fwd, good)
            reply = await asyncio.wait_for(_reply(device), 5)
            assert reply.accepted and reply.tensors["grad"].shape == (2, 8, 64)
            # A retry of the same request gets the same answer and trains nothing twice.
            served = server.served
            await device.publish(fwd, good)
            again = await _reply(device)
            assert again.request_id == good.request_id and server.served == served
            await asyncio.sleep(0.6)
            await device.publish(fwd, _request(federation, "dev"))
            assert (await _reply(device)).accepted
            assert server.open_steps == 0 and server.expired == 1


async def test_split_channel_ignores_late_replies_and_times_out(
    mosquitto_url: str, federation: str
) -> None:
    device_config = TransportConfig(url=mosquitto_url, client_id=f"{federation}-dev")
    async with MqttTransport(device_config) as device:
        await device.subscribe(topics.split_bwd(federation, "dev"))
        loop = asyncio.get_running_loop()
        channel = MqttSplitChannel(
            device,
            loop,
            federation=federation,
            client_id="dev",
            task_id="task-1",
            timeout_s=0.3,
            retries=1,
        )

        async def route() -> None:
            async for delivery in device.deliveries():
                if isinstance(delivery, Delivery) and isinstance(delivery.message, SplitReply):
                    channel.deliver(delivery.message, delivery.size)

        router = asyncio.create_task(route())
        try:
            stray = SplitReply(
                request_id="nobody-waits",
                client_id="dev",
                accepted=False,
                reason="malformed",
                detail="late",
            )
            await device.publish(topics.split_bwd(federation, "dev"), stray)
            with pytest.raises(TimeoutError, match="2 tries"):  # no server is running
                await asyncio.to_thread(
                    channel.exchange, _request(federation, "dev"), compression="fp16"
                )
            assert channel.ignored == 1
        finally:
            router.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await router
