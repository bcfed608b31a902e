"""Hostile input: at least 10,000 random and mutated payloads through decode, validate and merge.

Every payload goes the way a received MQTT frame goes: the transport's inbound path (size
check, decode, chunk reassembly), then the service's handler (validation, strategy). None
may raise, each must be answered with a rejection carrying a reason (the audit log is read
back line by line), and afterwards the global state must be bit-identical: version, global
adapter, the FedBuff buffer (seeded with one accepted update, so anything accepted would
merge), and the checkpoint on disk.
"""

from __future__ import annotations

import asyncio
import struct
import typing
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.audit import MergeEntry, UpdateEntry, entry_from_json
from aggregator.config import AggregatorConfig, StrategySettings
from aggregator.service import AggregatorService
from edgefed.transport.frames import Inbound
from edgefed.transport.memory import MemoryBroker, MemoryTransport
from schemas import chunking, codec, topics
from schemas.errors import RejectReason
from schemas.messages import Ack, Chunk, Metrics, Status, TensorMap, Update

pytestmark = pytest.mark.slow

FED = "fuzz"
KNOWN = "dev1"
PAYLOADS_PER_EXAMPLE = 25
EXAMPLES = 420
"""25 x 420 = 10,500 payloads."""
REASONS = frozenset(typing.get_args(RejectReason))


@dataclass
class Rig:
    """A started service, the inbound path in front of it, and the audit log read back."""

    loop: asyncio.AbstractEventLoop
    service: AggregatorService
    transport: MemoryTransport
    inbound: Inbound
    clock: list[float]
    audit: typing.IO[str]
    shapes: dict[str, tuple[int, ...]]
    checkpoint: Path

    def new_entries(self) -> list[UpdateEntry | MergeEntry]:
        return [entry_from_json(line) for line in self.audit.readlines()]


def make_delta(shapes: dict[str, tuple[int, ...]], value: float = 0.01) -> TensorMap:
    return {name: torch.full(shape, value) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = AggregatorConfig(
        federation=FED,
        strategy=StrategySettings(name="fedbuff", buffer_size=2),
        known_clients=frozenset({KNOWN}),
        max_update_norm=50.0,
        norm_action="reject",
        eval_data="synthetic:n=8,seed=1",
        eval_every=1000,
        checkpoint_dir=str(folder / "ckpt"),
    )
    loop = asyncio.new_event_loop()
    transport = MemoryBroker().transport("aggregator")
    loop.run_until_complete(transport.__aenter__())
    service = AggregatorService(config, transport)
    loop.run_until_complete(service.start())
    shapes = {name: tuple(t.shape) for name, t in service.current.items()}
    clock = [0.0]
    inbound = Inbound(max_message_bytes=config.max_message_bytes, clock=lambda: clock[0])
    # One honest update sits in the buffer: anything else accepted would trigger a merge.
    seed = Update(
        update_id="seed-update",
        client_id=KNOWN,
        task_id=config.task_id,
        base_version=0,
        num_samples=4,
        delta=make_delta(shapes),
    )
    item = inbound.feed(topics.update(FED, KNOWN), codec.encode(seed))
    assert item is not None
    loop.run_until_complete(service.handle(item))
    assert service.strategy.pending == 1
    audit = (folder / "ckpt" / "audit.jsonl").open(encoding="utf-8")
    audit.readlines()
    try:
        yield Rig(
            loop,
            service,
            transport,
            inbound,
            clock,
            audit,
            shapes,
            folder / "ckpt" / "manifest.json",
        )
    finally:
        audit.close()
        service.close()
        loop.run_until_complete(transport.aclose())
        loop.close()


# --------------------------------------------------------------------------- payloads


def update_fields(shapes: dict[str, tuple[int, ...]], **changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "update_id": uuid.uuid4().hex,
        "client_id": KNOWN,
        "task_id": "task-1",
        "base_version": 0,
        "num_samples": 4,
        "delta": make_delta(shapes),
    }
    return fields | changes


def encoded(shapes: dict[str, tuple[int, ...]], **changes: object) -> bytes:
    return codec.encode(Update.model_validate(update_fields(shapes, **changes)))


def raw_map(fields: dict[str, object]) -> bytes:
    """Pack a message map by hand, so fields can hold what pydantic would never build."""
    wire = dict(fields)
    delta = wire.get("delta")
    if isinstance(delta, dict):
        wire["delta"] = {
            k: codec.tensor_to_wire(v) if isinstance(v, torch.Tensor) else v
            for k, v in delta.items()
        }
    packed: bytes = msgpack.packb({"kind": "update", "schema_version": 1, **wire})
    return packed


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def payload_strategy(shapes: dict[str, tuple[int, ...]]) -> st.SearchStrategy[tuple[str, bytes]]:
    names = sorted(shapes)
    on_known = topics.update(FED, KNOWN)

    @st.composite
    def random_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
        # Not empty: an empty payload is MQTT's "delete the retained message", which the
        # transport drops before anything could be answered.
        return on_known, draw(st.binary(min_size=1, max_size=3000))

    @st.composite
    def truncated(draw: st.DrawFn) -> tuple[str, bytes]:
        data = encoded(shapes, base_version=draw(st.integers(1, 50)))
        return on_known, data[: draw(st.integers(1, len(data) - 1))]

    @st.composite
    def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
        # Three independent faults, so no handful of byte edits can make it valid.
        delta = make_delta(shapes)
        delta[names[0]][0, 0] = float("nan")
        data = bytearray(
            encoded(shapes, base_version=draw(st.integers(1, 9)), task_id="other", delta=delta)
        )
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            action = draw(st.sampled_from(["flip", "insert", "delete", "overwrite"]))
            if action == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif action == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif action == "delete":
                del data[at : at + draw(st.integers(1, 64))]
            else:
                data[at] = draw(st.sampled_from([0x00, 0xC1, 0xDB, 0xDD, 0xDF, 0xFF]))
            if not data:
                data = bytearray(b"\x80")
        return on_known, bytes(data)

    @st.composite
    def wrong_types(draw: st.DrawFn) -> tuple[str, bytes]:
        # pydantic coerces some values ("5" to 5), so a replacement may turn out valid: sent
        # by a client that is not registered, such a payload is still refused.
        fields = update_fields(shapes, client_id="mallory")
        for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
            fields[name] = draw(msgpack_values)
        return topics.update(FED, "mallory"), raw_map(fields)

    @st.composite
    def huge_sizes(draw: st.DrawFn) -> tuple[str, bytes]:
        kind = draw(st.sampled_from(["shape", "bin32", "map32", "str32", "chunk"]))
        if kind == "shape":
            dims = draw(st.lists(st.integers(2**20, 2**40), min_size=1, max_size=4))
            tensor = {"dtype": "float32", "shape": dims, "data": b"\0" * 16}
            return on_known, raw_map(update_fields(shapes, delta={names[0]: tensor}))
        if kind == "bin32":
            head = raw_map(update_fields(shapes))[:-64]
            return on_known, head + b"\xc6" + struct.pack(">I", 0xFFFFFFF0) + b"\0" * 8
        if kind == "map32":
            return on_known, b"\xdf" + struct.pack(">I", 0xFFFFFFFF) + b"\xa4kind"
        if kind == "str32":
            return on_known, b"\x81\xa4kind\xdb" + struct.pack(">I", 2**31) + b"update"
        size = draw(st.integers(2**30, 2**62))
        chunk = {
            "kind": "chunk",
            "schema_version": 1,
            "transfer_id": "t",
            "index": 0,
            "total": draw(st.integers(1, 2**31)),
            "size": size,
            "xxh3": "0" * 16,
            "data": b"x",
        }
        return on_known, typing.cast("bytes", msgpack.packb(chunk))

    @st.composite
    def bad_tensors(draw: st.DrawFn) -> tuple[str, bytes]:
        delta = make_delta(shapes)
        name = draw(st.sampled_from(names))
        fault = draw(st.sampled_from(["nan", "inf", "shape", "dtype", "missing", "extra", "norm"]))
        tensor = delta[name]
        if fault in ("nan", "inf"):
            index = draw(st.integers(0, tensor.numel() - 1))
            tensor.view(-1)[index] = float("nan") if fault == "nan" else -float("inf")
        elif fault == "shape":
            delta[name] = torch.zeros(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        elif fault == "dtype":
            dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.int8, torch.bool]))
            delta[name] = tensor.to(dtype)
        elif fault == "missing":
            del delta[name]
        elif fault == "extra":
            delta["extra.lora_A.weight"] = torch.zeros(2, 2)
        else:
            delta[name] = torch.full_like(tensor, 1e3)
        return on_known, encoded(shapes, delta=delta)

    @st.composite
    def bad_metadata(draw: st.DrawFn) -> tuple[str, bytes]:
        fault = draw(st.sampled_from(["future", "unknown", "task", "method", "impostor"]))
        if fault == "future":
            return on_known, encoded(shapes, base_version=draw(st.integers(1, 2**40)))
        if fault == "unknown":
            return topics.update(FED, "mallory"), encoded(shapes, client_id="mallory")
        if fault == "task":
            task = draw(st.text(min_size=1, max_size=10).filter(lambda t: t != "task-1"))
            return on_known, encoded(shapes, task_id=task)
        if fault == "method":
            return on_known, encoded(shapes, method=draw(st.sampled_from(["kd", "split"])))
        return on_known, encoded(shapes, client_id="dev2")  # payload and topic disagree

    @st.composite
    def other_messages(draw: st.DrawFn) -> tuple[str, bytes]:
        message = draw(
            st.sampled_from(
                [
                    Status(client_id=KNOWN, state="online"),
                    Metrics(version=3, time_s=1.0),
                    Ack(update_id="x", client_id=KNOWN, accepted=True, version=1),
                ]
            )
        )
        return on_known, codec.encode(message)

    @st.composite
    def partial_chunks(draw: st.DrawFn) -> tuple[str, bytes]:
        data = encoded(shapes, base_version=draw(st.integers(1, 9)))
        chunks = chunking.split_payload(memoryview(data), max_payload=4096)
        chunk = draw(st.sampled_from(chunks[:-1] if len(chunks) > 1 else chunks))
        if draw(st.booleans()):
            chunk = chunk.model_copy(update={"xxh3": "f" * 16})
        return on_known, codec.encode(chunk)

    return st.one_of(
        random_bytes(),
        truncated(),
        mutated(),
        wrong_types(),
        huge_sizes(),
        bad_tensors(),
        bad_metadata(),
        other_messages(),
        partial_chunks(),
    )


# --------------------------------------------------------------------------- the test


def state_of(service: AggregatorService, manifest: Path) -> tuple[object, ...]:
    def raw(tensors: TensorMap) -> dict[str, bytes]:
        return {n: t.contiguous().view(torch.uint8).numpy().tobytes() for n, t in tensors.items()}

    buffer = service.strategy.state_dict()
    deltas = typing.cast("list[TensorMap]", buffer.pop("deltas"))
    return (
        service.version,
        service.published_version,
        raw(service.current),
        buffer,
        [raw(d) for d in deltas],
        dict(service.results.merges),
        manifest.read_bytes(),
    )


def test_fuzzed_payloads_are_all_rejected_and_leave_the_state_bit_identical(rig: Rig) -> None:
    before = state_of(rig.service, rig.checkpoint)
    rejections_before = sum(rig.service.rejections.values())
    counts = {"payloads": 0, "answered": 0, "waiting_chunks": 0}
    reasons: Counter[str] = Counter()
    decisions: Counter[str] = Counter()

    def answer(item: object) -> None:
        rig.loop.run_until_complete(rig.service.handle(item))  # type: ignore[arg-type]
        [entry] = rig.new_entries()
        assert isinstance(entry, UpdateEntry), entry
        assert entry.decision in ("rejected", "duplicate"), entry
        assert entry.reason in REASONS and entry.detail, entry
        reasons[entry.reason] += 1
        decisions[entry.decision] += 1
        counts["answered"] += 1

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(payload_strategy(rig.shapes), min_size=25, max_size=25))
    def feed(batch: list[tuple[str, bytes]]) -> None:
        for topic, payload in batch:
            counts["payloads"] += 1
            item = rig.inbound.feed(topic, payload)
            if item is None:  # a chunk, held until its transfer completes or expires
                assert isinstance(codec.decode(payload), Chunk)
                counts["waiting_chunks"] += 1
                continue
            answer(item)

    feed()
    answered_on_arrival = counts["answered"]
    incomplete = rig.inbound.pending
    rig.clock[0] += 3600.0  # every incomplete transfer expires and is answered too
    for bad in rig.inbound.expire():
        answer(bad)
    assert rig.inbound.pending == 0
    assert counts["answered"] - answered_on_arrival == incomplete
    assert counts["payloads"] >= 10_000
    assert answered_on_arrival == counts["payloads"] - counts["waiting_chunks"]
    assert state_of(rig.service, rig.checkpoint) == before
    # The families reach deep into validation, not only the decoder.
    for reason in ("malformed", "unknown_client", "wrong_task", "future_version", "wrong_shape"):
        assert reasons.get(reason, 0) > 0, reasons
    for reason in ("wrong_dtype", "non_finite", "norm_bound", "wrong_method"):
        assert reasons.get(reason, 0) > 0, reasons
    rejected = sum(rig.service.rejections.values()) - rejections_before
    assert rejected == decisions["rejected"]
    print(f"fuzz: {counts} {dict(decisions)} reasons={dict(reasons)}")


def test_fuzz_rig_still_merges_an_honest_update_afterwards(rig: Rig) -> None:
    honest = Update(
        client_id=KNOWN,
        task_id="task-1",
        base_version=0,
        num_samples=4,
        delta=make_delta(rig.shapes, 0.02),
    )
    item = rig.inbound.feed(topics.update(FED, KNOWN), codec.encode(honest))
    assert item is not None
    rig.loop.run_until_complete(rig.service.handle(item))
    [accepted, merge] = rig.new_entries()
    assert isinstance(accepted, UpdateEntry) and accepted.decision == "accepted"
    assert isinstance(merge, MergeEntry)
    assert merge.update_ids == ("seed-update", honest.update_id)
    assert rig.service.version == 1
