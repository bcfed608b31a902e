"""The codec's decoder against other writers' layouts: any field order, shared buffers, and
agreement with plain msgpack-python (plus pydantic) on corrupted payloads."""

from __future__ import annotations

import ctypes
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import torch
from pydantic import ValidationError

from schemas.codec import Compression, _decoder, decode, encode, tensor_from_wire
from schemas.codec._layout import SPECS_BY_TYPE
from schemas.errors import CodecError
from schemas.messages import SCHEMA_VERSION, Message, ModelRef, ProxySpec, Task, Update
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
def test_codec_repeated_tensor_key_keeps_the_last_value_as_plain_msgpack_does(
    key: str, compression: Compression
) -> None:
    data = encode(_update({"w": torch.ones(2, 4)}), compression=compression)
    entries = [i for i in range(len(data)) if data.startswith(b"\xa5dtype", i)]
    assert len(entries) == (2 if compression == "int8" else 1)
    repeat = msgpack.packb(key) + msgpack.packb("int16" if key == "dtype" else [4, 2])
    for start in entries:  # the tensor's own map, then its scale's
        header = start - 1
        dup = data[:header] + bytes((data[header] + 1,)) + repeat + data[start:]
        # the repeat comes first, so the original (last) value wins in both readers
        assert _outcome(dup) == _reference_outcome(dup) == _outcome(data)


def _outcome(data: bytes) -> object:
    """What ``decode`` makes of ``data``: the error's type, or every field by value."""
    try:
        message = decode(data)
    except CodecError:
        return CodecError
    return _by_value(message)


def _by_value(message: Message) -> dict[str, object]:
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


def _top_level_pairs(pairs: list[tuple[object, object]]) -> dict[object, object]:
    found = dict(pairs)
    if len(found) != len(pairs) and "kind" in found:  # a repeated message field
        raise CodecError("a field appears twice")
    return found


_SPECS_BY_KIND = {spec.kind: spec for spec in SPECS_BY_TYPE.values()}


def _reference_outcome(data: bytes) -> object:
    """The same bytes read the plain way: msgpack-python, ``tensor_from_wire``, pydantic."""
    try:
        wire = msgpack.unpackb(data, use_list=False, object_pairs_hook=_top_level_pairs)
        spec = _SPECS_BY_KIND[wire["kind"]]
        if wire.get("schema_version") != SCHEMA_VERSION or type(wire["schema_version"]) is not int:
            raise CodecError("another version")
        for name in spec.tensor_fields:
            if name in wire:
                wire[name] = {k: tensor_from_wire(v) for k, v in wire[name].items()}
        message = spec.cls.model_validate(wire, strict=True)
    except (
        CodecError,
        ValidationError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        msgpack.UnpackException,
        RecursionError,
    ):
        return CodecError
    return _by_value(message)


def test_codec_agrees_with_plain_msgpack_on_corrupted_payloads() -> None:
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
    ours = [_outcome(data) for data in cases]
    assert ours == [_reference_outcome(data) for data in cases]
    assert sum(result is not CodecError for result in ours) > len(cases) // 10


def test_codec_bin_field_names_are_refused() -> None:
    wire = _wire(SAMPLES[4])
    with pytest.raises(CodecError, match="Expected `str`, got `bytes`"):
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


def test_codec_refuses_a_field_with_more_tensors_than_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_decoder, "MAX_TENSORS", 4)
    assert isinstance(decode(encode(_update({f"w{i}": torch.ones(2) for i in range(4)}))), Update)
    with pytest.raises(CodecError, match="holds 5 tensors, over 4"):
        decode(encode(_update({f"w{i}": torch.ones(2) for i in range(5)})))


def test_codec_refuses_a_large_message_with_too_much_outside_its_payloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_decoder, "MAX_SEGMENT", 1024)
    big = _update({"w": torch.ones(1024)})  # 4 KiB of tensor payload, small fields
    assert isinstance(decode(encode(big)), Update)
    wire = _wire(big)
    wire["client_id"] = "c" * 2000  # the small fields now outweigh the limit
    with pytest.raises(CodecError, match=r"bytes of msgpack outside tensor and bytes fields"):
        decode(_pack(wire))
    wire = _wire(big)
    wire["delta"] = {f"w{i}": {"dtype": "float32", "shape": [0], "data": b""} for i in range(5)}
    wire["delta"]["w0"]["shape"] = "not a shape"  # msgspec would refuse this, were it parsed
    wire["delta"]["pad"] = _wire(big)["delta"]["w"]
    monkeypatch.setattr(_decoder, "MAX_TENSORS", 4)
    with pytest.raises(CodecError, match="holds 6 tensors, over 4"):  # counted before parsing
        decode(_pack(wire))


def test_codec_refuses_a_shape_of_too_many_dims() -> None:
    wire = _wire(_update({"w": torch.ones(1)}))
    wire["delta"]["w"]["shape"] = [1] * 65
    with pytest.raises(CodecError, match="length <= 64"):
        decode(_pack(wire))
