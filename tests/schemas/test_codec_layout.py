"""The codec's decoder against other writers' layouts: any field order, shared buffers, and
its one-call path agreeing with the field-by-field reader on corrupted payloads."""

from __future__ import annotations

import ctypes
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import torch

from schemas import codec
from schemas.codec import Compression, decode, encode
from schemas.errors import CodecError
from schemas.messages import Message, ModelRef, ProxySpec, Task, Update
from tests.schemas.test_codec import SAMPLES, _assert_messages_equal, _pack, _update, _wire


def _reordered(message: Message, first: list[str]) -> bytes:
    """The same map with ``first`` fields ahead of the rest: valid msgpack from another writer."""
    wire = _wire(message)
    return _pack({name: wire[name] for name in first} | wire)


@pytest.mark.parametrize(
    ("index", "first"),
    [
        (3, ["delta"]),  # tensors ahead of every small field
        (3, ["logits", "delta", "kind"]),
        (1, ["tensors", "schema_version"]),
        (8, ["data"]),  # a bytes field first
        (4, ["kind", "detail", "schema_version"]),
    ],
)
def test_codec_decodes_any_field_order(index: int, first: list[str]) -> None:
    message = SAMPLES[index]
    data = _reordered(message, first)
    assert data != encode(message)
    _assert_messages_equal(message, decode(data))
    buf = bytearray(data)
    decoded = decode(buf)  # tensors still share the received buffer
    start = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for name in ("delta", "tensors"):
        for tensor in getattr(decoded, name, {}).values():
            if tensor.numel():
                assert start <= tensor.data_ptr() < start + len(buf)


def test_codec_decodes_small_fields_longer_than_the_parse_window() -> None:
    proxy = ProxySpec(dataset="sst2", indices=tuple(range(5000)), slice_id=3)
    task = Task(task_id="t", federation="f", version=3, model=ModelRef(name="tiny"), proxy=proxy)
    data = encode(task)
    assert len(data) > 10_000
    _assert_messages_equal(task, decode(data))


def test_codec_every_tensor_of_a_field_shares_the_buffer() -> None:
    tensors = {f"layer{i}.lora_B": torch.full((64, 8), float(i)) for i in range(6)}
    buf = bytearray(encode(_update(tensors)))
    decoded = decode(buf)
    assert isinstance(decoded, Update)
    start = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for name, tensor in decoded.delta.items():
        assert start <= tensor.data_ptr() < start + len(buf)
        assert torch.equal(tensor, tensors[name])


def test_codec_bin_field_names_raise_codec_error() -> None:
    wire = _wire(SAMPLES[4])
    for placed in ({b"kind": "ack"} | wire, wire | {b"kind": "ack"}):
        with pytest.raises(CodecError):
            decode(msgpack.packb(placed))


def test_codec_repeated_field_is_refused_whatever_its_position() -> None:
    data = encode(SAMPLES[4])
    n = data[0] & 0x0F
    for name, value in (("client_id", "other"), ("kind", "ack"), ("detail", "")):
        extra = msgpack.packb(name) + msgpack.packb(value)
        for dup in (
            bytes((0x80 | (n + 1),)) + extra + data[1:],
            bytes((0x80 | (n + 1),)) + data[1:] + extra,
        ):
            with pytest.raises(CodecError, match="twice"):
                decode(dup)


@pytest.mark.parametrize("compression", ["none", "int8"])
@pytest.mark.parametrize("key", ["dtype", "shape"])
def test_codec_repeated_tensor_key_is_refused(key: str, compression: Compression) -> None:
    data = encode(_update({"w": torch.ones(2, 4)}), compression=compression)
    entries = [i for i in range(len(data)) if data.startswith(b"\xa5dtype", i)]
    assert len(entries) == (2 if compression == "int8" else 1)
    repeat = msgpack.packb(key) + msgpack.packb("int8" if key == "dtype" else [8])
    for start in entries:  # the tensor's own map, then its scale's
        header = start - 1
        dup = data[:header] + bytes((data[header] + 1,)) + repeat + data[start:]
        assert msgpack.unpackb(dup)  # plain msgpack reads it, keeping the last value
        with pytest.raises(CodecError, match=r"repeated|has keys"):  # too many keys for int8
            decode(dup)


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_codec_reads_its_own_messages_in_one_call(
    compression: Compression, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = [encode(message, compression=compression) for message in SAMPLES]

    def field_by_field(view: memoryview) -> dict[str, object]:
        raise AssertionError("decode fell back to the field-by-field reader")

    monkeypatch.setattr(codec, "exact_values", field_by_field)
    for message, data in zip(SAMPLES, encoded, strict=True):
        decoded = decode(data)
        assert type(decoded) is type(message)


def _outcome(data: bytes) -> object:
    try:
        message = decode(data)
    except CodecError as exc:
        return type(exc)
    return {
        name: (
            {
                k: (v.dtype, tuple(v.shape), v.reshape(-1).view(torch.uint8).tolist())
                for k, v in value.items()
            }
            if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())
            else value
        )
        for name, value in message
    }


def test_codec_one_call_path_agrees_with_field_by_field(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    cases: list[bytes] = []
    for message in (SAMPLES[3], SAMPLES[8], SAMPLES[9], _update({"w": torch.ones(3)})):
        data = encode(message, compression="int8" if message is SAMPLES[9] else "none")
        cases.append(data)
        for _ in range(150):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cases.append(bytes(mutated))
    fast = [_outcome(data) for data in cases]
    monkeypatch.setattr(codec, "marked_values", lambda view: None)
    exact = [_outcome(data) for data in cases]
    assert fast == exact
    assert sum(not isinstance(result, type) for result in fast) > len(cases) // 10


def test_codec_names_unknown_bin_field_names() -> None:
    wire = _wire(SAMPLES[4])
    with pytest.raises(CodecError, match=r"unknown fields \[\"b'surprise'\"\]"):
        decode(msgpack.packb(wire | {b"surprise": 1}))


def test_codec_encodes_correctly_after_a_value_it_could_not_pack() -> None:
    message = _update({"w": torch.ones(3)})
    expected = encode(message)
    with pytest.raises(CodecError, match="cannot be packed"):
        encode(message.model_copy(update={"base_version": 2**70}))
    assert encode(message) == expected  # nothing of the failed message is left behind


def test_codec_encodes_from_many_threads_at_once() -> None:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads inside packing as often as possible
    try:
        expected = [encode(message) for message in SAMPLES]
        with ThreadPoolExecutor(max_workers=6) as pool:
            for _ in range(30):
                assert list(pool.map(encode, SAMPLES * 3)) == expected * 3
    finally:
        sys.setswitchinterval(interval)
