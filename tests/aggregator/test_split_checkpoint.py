"""The split server's own progress and optimizer survive an aggregator restart.

Globals carry the server part's LoRA only as of the last merge; what it learned since then
and AdamW's moments live in the checkpoint, next to the FedBuff buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from aggregator.checkpoint import Checkpoint, CheckpointStore
from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from aggregator.split_service import SPLIT_STATE, SplitService
from aggregator.split_training import SplitServer, SplitServerConfig
from edgefed.ml.models import attach_lora, build_model, get_adapter
from edgefed.ml.split_model import part_names
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.errors import ConfigError
from schemas.messages import Ack, LoraSpec, ModelRef, SplitReply, SplitRequest, TrainSpec, Update

LORA = LoraSpec(rank=4, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _request(step: int, *, task_id: str = "t", client: str = "dev") -> SplitRequest:
    gen = torch.Generator().manual_seed(step)
    return SplitRequest(
        step_id=f"s{step}",
        client_id=client,
        task_id=task_id,
        cut=2,
        tensors={
            "hidden": torch.randn(2, 8, 64, generator=gen),
            "labels": torch.randint(0, 64, (2, 8), generator=gen),
        },
    )


def _server() -> SplitServer:
    model = attach_lora(build_model("tiny-4l"), LORA)
    return SplitServer(model, task_id="t", config=SplitServerConfig(lr=5e-2))


def _adapter(server: SplitServer) -> dict[str, torch.Tensor]:
    return get_adapter(server.model)


def test_split_checkpoint_restores_lora_and_optimizer_exactly(tmp_path: Path) -> None:
    trained = _server()
    start = _adapter(trained)
    trained.serve([_request(i) for i in range(3)])
    assert any(not torch.equal(t, start[n]) for n, t in _adapter(trained).items())
    store = CheckpointStore(tmp_path)
    store.save(
        Checkpoint(
            commit=1,
            federation="f",
            task_id="t",
            version=0,
            globals={0: start},
            states={SPLIT_STATE: trained.state_dict()},
        )
    )
    loaded = store.load(federation="f", task_id="t")
    assert loaded is not None
    resumed, fresh = _server(), _server()
    resumed.load_state_dict(loaded.states[SPLIT_STATE])
    resumed.load(start)  # the service's global: the server keeps its progress since then
    fresh.load(_adapter(trained))  # same weights, but the optimizer starts over
    for name, tensor in _adapter(trained).items():
        assert torch.equal(_adapter(resumed)[name], tensor), name
    assert resumed.served == trained.served == 3
    # The next step is the same as if the server had never stopped: AdamW's moments came back.
    for server in (trained, resumed, fresh):
        [reply] = server.serve([_request(9)])
        assert reply.accepted
    after, again = _adapter(trained), _adapter(resumed)
    for name, tensor in after.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-7)
    drift = max(float((_adapter(fresh)[n] - t).abs().max()) for n, t in after.items())
    assert drift > 1e-4  # without the moments the step differs
    # The merge afterwards adds the server's progress since the checkpointed global.
    composed = resumed.compose(start)
    for name, tensor in composed.items():
        torch.testing.assert_close(tensor, again[name], rtol=0, atol=1e-7)


def test_split_checkpoint_refuses_state_of_another_model() -> None:
    server = _server()
    state = server.state_dict()
    adapter = state["adapter"]
    assert isinstance(adapter, dict)
    name = next(iter(adapter))
    with pytest.raises(ConfigError, match="does not fit"):
        server.load_state_dict(state | {"adapter": adapter | {name: torch.zeros(3)}})
    with pytest.raises(ConfigError, match="does not name"):
        server.load_state_dict(state | {"snapshot": {}})


@contextlib.asynccontextmanager
async def _aggregator(url: str, config: AggregatorConfig) -> AsyncIterator[SplitService]:
    """An aggregator with its split server, connected and ready; cancelled on leaving."""
    agg = TransportConfig(url=url, client_id=f"{config.federation}-aggregator")
    side = TransportConfig(url=url, client_id=f"{config.federation}-split")
    async with MqttTransport(agg) as agg_transport, MqttTransport(side) as side_transport:
        service = AggregatorService(config, agg_transport)
        split = SplitService.beside(service, side_transport)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(split.run())]
        try:
            await asyncio.wait_for(split.ready.wait(), 60)
            yield split
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _answer(device: MqttTransport, kind: type[SplitReply] | type[Ack]) -> SplitReply | Ack:
    async with asyncio.timeout(20):
        async for delivery in device.deliveries():
            if isinstance(delivery, Delivery) and isinstance(delivery.message, kind):
                return delivery.message
    raise AssertionError(f"no {kind.__name__}")


@pytest.mark.broker
async def test_split_checkpoint_survives_a_killed_aggregator(
    mosquitto_url: str, federation: str, tmp_path: Path
) -> None:
    config = AggregatorConfig(
        federation=federation,
        method="split",
        model=ModelRef(name="tiny-4l"),
        lora=LORA,
        train=TrainSpec(local_steps=2, batch_size=4, seq_len=16),
        strategy=StrategySettings(name="fedbuff", buffer_size=2),
        eval_data="synthetic:n=16,seed=9",
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=1,
    )
    device_config = TransportConfig(url=mosquitto_url, client_id=f"{federation}-dev")
    async with MqttTransport(device_config) as device:
        await device.subscribe(topics.split_bwd(federation, "dev"))
        await device.subscribe(topics.ack(federation, "dev"))

        async def update(split: SplitService) -> Ack:
            current = split._service.current  # type: ignore[union-attr]
            zero = {n: torch.zeros_like(t) for n, t in current.items()}
            sent = Update(
                client_id="dev",
                task_id=config.task_id,
                base_version=0,
                num_samples=4,
                method="split",
                delta=zero,
            )
            await device.publish(topics.update(federation, "dev"), sent)
            ack = await _answer(device, Ack)
            assert isinstance(ack, Ack) and ack.accepted, ack
            return ack

        async with _aggregator(mosquitto_url, config) as first:
            start = first._service.current  # type: ignore[union-attr]
            for step in range(3):
                request = _request(step, task_id=config.task_id)
                await device.publish(topics.split_fwd(federation, "dev"), request)
                reply = await _answer(device, SplitReply)
                assert isinstance(reply, SplitReply) and reply.accepted, reply
            learned = _adapter(first.server)
            server_part = {n for n in learned if not torch.equal(learned[n], start[n])}
            assert server_part
            assert not server_part & set(part_names(first.server.model, 0, 2))
            await update(first)  # buffered (1 of 2); its ack came after the checkpoint
        # Killed. The restarted aggregator resumes the buffer and the server's progress.
        async with _aggregator(mosquitto_url, config) as second:
            service = second._service
            assert service is not None and service.version == 0
            resumed = _adapter(second.server)
            for name, tensor in learned.items():
                assert torch.equal(resumed[name], tensor), name
            assert second.server.served == 3
            ack = await update(second)  # fills the buffer: a merge
            assert ack.version == 1
            merged = service.current
            # Devices sent zeros: the new global is the start plus the server's own steps.
            for name in server_part:
                torch.testing.assert_close(merged[name], learned[name], rtol=0, atol=1e-6)
                assert not torch.equal(merged[name], start[name])
