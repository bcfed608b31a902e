"""Messages, receive helpers and configs shared by the transport tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
import torch

from edgefed.transport.base import Transport
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import BadDelivery, Delivery, encode_frames
from schemas.messages import AgentState, Status, Update

MiB = 1024 * 1024


def make_update(client_id: str = "dev-1", *, nbytes: int = 1024, seed: int = 0) -> Update:
    generator = torch.Generator().manual_seed(seed)
    delta = {"layer.lora_B": torch.randn(nbytes // 4, generator=generator)}
    return Update(client_id=client_id, task_id="t", base_version=0, num_samples=8, delta=delta)


def make_status(client_id: str, state: AgentState = "online") -> Status:
    return Status(client_id=client_id, state=state)


async def receive(
    transport: Transport, count: int = 1, *, timeout_s: float = 10.0
) -> list[Delivery | BadDelivery]:
    items: list[Delivery | BadDelivery] = []
    async with asyncio.timeout(timeout_s):
        async for item in transport.deliveries():
            items.append(item)
            if len(items) == count:
                break
    return items


async def receive_message(transport: Transport, *, timeout_s: float = 10.0) -> Delivery:
    [item] = await receive(transport, timeout_s=timeout_s)
    assert isinstance(item, Delivery), item
    return item


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Return once ``condition()`` holds, checking every 50 ms; fail after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {timeout_s} s")


async def assert_silent(transport: Transport, *, timeout_s: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await receive(transport, timeout_s=timeout_s)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def config(url: str, name: str, **overrides: object) -> TransportConfig:
    client_id = f"{name}-{uuid.uuid4().hex[:8]}"
    return TransportConfig(url=url, client_id=client_id, **overrides)  # type: ignore[arg-type]


def chunk_frames(update: Update, max_payload: int = 16 * 1024) -> list[tuple[str, bytes]]:
    return list(
        encode_frames(
            "u/0",
            update,
            retain=True,
            chunk_topic=lambda index: f"u/{index}",
            compression="none",
            max_payload=max_payload,
            max_message_bytes=MiB,
        )
    )
