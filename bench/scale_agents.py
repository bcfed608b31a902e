"""The agent side of a scale run: many lightweight devices in processes of their own.

Every agent is a real MQTT connection (an :class:`~edgefed.transport.mqtt.MqttTransport`) that
replays real LoRA deltas recorded once from the ``tiny`` model, so a thousand of them fit
in one process (larger fleets are shared among several). They run apart from the
aggregator, as devices do, so the aggregator's lag is its own and not the cost of hosting
the fleet. ``python -m bench.scale_agents``
speaks JSON lines on stdin/stdout with :mod:`bench.scale`: it connects everyone, says
``connected``, waits for ``go``, sends, and reports every update it sent and its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from edge_agent.trainers.lora import LoraTrainer
from edgefed.data.loading import load_data
from edgefed.ml.models import attach_lora, build_model, get_adapter
from edgefed.transport.config import TransportConfig
from edgefed.transport.frames import Delivery
from edgefed.transport.mqtt import MqttTransport
from schemas import topics
from schemas.errors import TransportError
from schemas.messages import Ack, LoraSpec, ModelRef, TensorMap, TrainSpec, Update

log = logging.getLogger(__name__)

MODEL = "tiny"


@dataclass(frozen=True)
class ScaleConfig:
    """One scale run."""

    agents: int = 1000
    updates_per_agent: int = 2
    """Updates each agent sends, one after the other (the next once the last is acked)."""
    spread_s: float = 10.0
    """Each agent's first update leaves at a uniformly random moment in this window."""
    buffer_size: int = 20
    """FedBuff K: updates per merge."""
    connect_concurrency: int = 64
    """Connections being opened at once, per agents' process."""
    agents_per_process: int = 2500
    """Agents one process hosts (about 0.45 MB each); more agents start more processes."""
    recorded_updates: int = 8
    """Distinct real deltas recorded from the tiny model and replayed by the fleet."""
    ack_timeout_s: float = 60.0
    """An unanswered update is re-sent (same ``update_id``) after this long."""
    max_resends: int = 3
    seed: int = 0
    federation: str = field(default_factory=lambda: f"scale-{uuid.uuid4().hex[:8]}")

    @property
    def total_updates(self) -> int:
        """Updates the whole fleet sends."""
        return self.agents * self.updates_per_agent

    def shares(self) -> list[range]:
        """The agents' indexes each process hosts."""
        step = self.agents_per_process
        return [
            range(first, min(first + step, self.agents)) for first in range(0, self.agents, step)
        ]

    def to_json(self) -> dict[str, object]:
        """Plain JSON-able form (what the agent process is started with)."""
        return asdict(self)


@dataclass
class _Sent:
    """What one agent saw of one update."""

    update_id: str
    sent_at: float
    answered_at: float | None = None
    ack: Ack | None = None
    resends: int = 0

    def to_json(self) -> dict[str, object]:
        """The line :mod:`bench.scale` reads back."""
        ack = self.ack
        return {
            "update_id": self.update_id,
            "sent_at": self.sent_at,
            "answered_at": self.answered_at,
            "accepted": None if ack is None else ack.accepted,
            "version": None if ack is None else ack.version,
            "resends": self.resends,
        }


def record_updates(count: int, *, seed: int = 0) -> list[TensorMap]:
    """Real LoRA deltas of the tiny model, each from its own synthetic shard."""
    spec = TrainSpec(local_steps=2, batch_size=4)
    model = attach_lora(build_model(ModelRef(name=MODEL), seed=seed), LoraSpec())
    start = get_adapter(model)
    trainer = LoraTrainer(model)
    deltas = []
    for index in range(count):
        data = load_data(f"synthetic:n=32,seed={seed * 1000 + index}", seq_len=spec.seq_len)
        deltas.append(trainer.fit(start, data, spec, seed=index).delta)
    return deltas


class _LightAgent:
    """A device that only publishes recorded updates and waits for their acks."""

    def __init__(self, config: ScaleConfig, index: int, *, url: str) -> None:
        self.client_id = f"dev{index:05d}"
        self._config = config
        self.transport = MqttTransport(
            TransportConfig(
                url=url,
                client_id=f"edgefed-{config.federation}-{self.client_id}",
                connect_timeout_s=120.0,
                publish_timeout_s=60.0,
            )
        )
        self.sent: list[_Sent] = []
        self._waiting: dict[str, asyncio.Future[Ack]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Subscribe (sent with the CONNECT's session) and connect."""
        await self.transport.subscribe(topics.ack(self._config.federation, self.client_id))
        await self.transport.__aenter__()
        self._reader = asyncio.create_task(self._read(), name=f"scale-acks:{self.client_id}")

    async def close(self) -> None:
        """Disconnect cleanly and stop reading."""
        await self.transport.aclose()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        async for delivery in self.transport.deliveries():
            if isinstance(delivery, Delivery) and isinstance(delivery.message, Ack):
                waiter = self._waiting.get(delivery.message.update_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(delivery.message)

    async def run(self, deltas: list[TensorMap], rng: random.Random) -> None:
        """Send this agent's updates, each based on the version its last ack named."""
        config = self._config
        base = 0
        await asyncio.sleep(rng.uniform(0, config.spread_s))
        for _ in range(config.updates_per_agent):
            delta = deltas[rng.randrange(len(deltas))]
            update = Update(
                client_id=self.client_id,
                task_id="task-1",
                base_version=base,
                num_samples=32,
                delta=delta,
            )
            record = _Sent(update_id=update.update_id, sent_at=update.sent_at)
            self.sent.append(record)
            ack = await self._deliver(update, record)
            if ack is None:
                return
            base = ack.version

    async def _deliver(self, update: Update, record: _Sent) -> Ack | None:
        config = self._config
        topic = topics.update(config.federation, self.client_id)
        waiter: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._waiting[update.update_id] = waiter
        try:
            for attempt in range(config.max_resends + 1):
                record.resends = attempt
                try:
                    await self.transport.publish(topic, update)
                except TransportError as exc:
                    log.warning("%s: publish failed: %s", self.client_id, exc)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.ack_timeout_s):
                        record.ack = await asyncio.shield(waiter)
                        record.answered_at = time.time()
                        return record.ack
            return None
        finally:
            del self._waiting[update.update_id]


async def _connect_all(agents: list[_LightAgent], config: ScaleConfig, *, progress: bool) -> float:
    """Open every agent's connection, ``connect_concurrency`` at a time; the seconds taken."""
    gate = asyncio.Semaphore(config.connect_concurrency)
    started = time.perf_counter()
    with tqdm(total=len(agents), desc="connecting", unit="agent", disable=not progress) as bar:

        async def one(agent: _LightAgent) -> None:
            async with gate:
                await agent.connect()
            bar.update()

        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(one(agent))
    return time.perf_counter() - started


async def _send_all(
    agents: list[_LightAgent],
    deltas: list[TensorMap],
    rng: random.Random,
    config: ScaleConfig,
    *,
    progress: bool,
) -> None:
    """Let every agent send its updates; a bar counts the answered ones."""
    total = len(agents) * config.updates_per_agent
    with tqdm(total=total, desc="updates acked", unit="upd", disable=not progress) as bar:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(agent.run(deltas, random.Random(rng.random())))
                for agent in agents
            ]
            while not all(task.done() for task in tasks):
                bar.n = sum(1 for a in agents for r in a.sent if r.ack is not None)
                bar.refresh()
                await asyncio.sleep(0.5)
        bar.n = sum(1 for a in agents for r in a.sent if r.ack is not None)
        bar.refresh()


def update_bytes(delta: TensorMap) -> int:
    """Bytes of tensor data in one update."""
    return sum(t.numel() * t.element_size() for t in delta.values())


def _say(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def serve(config: ScaleConfig, share: range, *, url: str, progress: bool) -> None:
    """Run the agents of ``share``: connect, report, wait for ``go``, send, report, disconnect."""
    deltas = await asyncio.to_thread(record_updates, config.recorded_updates, seed=config.seed)
    agents = [_LightAgent(config, index, url=url) for index in share]
    try:
        connect_s = await _connect_all(agents, config, progress=progress)
        _say("connected", connect_s=connect_s, update_bytes=update_bytes(deltas[0]))
        if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
            return
        started = time.perf_counter()
        rng = random.Random(config.seed * 1_000_003 + share.start)
        await _send_all(agents, deltas, rng, config, progress=progress)
        send_s = time.perf_counter() - started
        records = [record.to_json() for agent in agents for record in agent.sent]
        _say("done", send_s=send_s, records=records)
    finally:
        # A few at a time: a thousand DISCONNECTs at once leave aiomqtt scheduling writes
        # on sockets it has already closed (logged, harmless, but noise).
        gate = asyncio.Semaphore(config.connect_concurrency)

        async def close(agent: _LightAgent) -> None:
            async with gate:
                await agent.close()

        await asyncio.gather(*(close(agent) for agent in agents))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.scale_agents --url URL --config JSON``."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale_agents")
    parser.add_argument("--url", required=True)
    parser.add_argument("--config", required=True, help="ScaleConfig fields as JSON")
    parser.add_argument("--share", type=int, default=0, help="which of ScaleConfig.shares()")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = ScaleConfig(**json.loads(args.config))
    torch.set_num_threads(1)  # many agents share two cores with the broker and aggregator
    share = config.shares()[args.share]
    asyncio.run(serve(config, share, url=args.url, progress=not args.no_progress))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
