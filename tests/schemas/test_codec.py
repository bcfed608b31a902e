"""The msgpack codec: round trips, the plain-msgpack contract, and refusal of bad input."""

from __future__ import annotations

import ctypes
import random
import subprocess
import sys
import warnings

import msgpack
import pytest
import torch

from schemas.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Compression,
    decode,
    encode,
    tensor_from_wire,
    tensor_to_wire,
)
from schemas.errors import CodecError, PayloadTooLarge, SchemaVersionError
from schemas.messages import (
    MESSAGE_TYPES,
    Ack,
    Ask,
    Chunk,
    DeviceProfile,
    GlobalModel,
    LoraSpec,
    Message,
    Metrics,
    ModelRef,
    Status,
    Task,
    TensorMap,
    Update,
)
from tests.schemas.split_samples import SPLIT_SAMPLES

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


def _every_dtype() -> TensorMap:
    tensors = {
        f"t.{str(d).removeprefix('torch.')}": _tensor(d, (3, 5), i)
        for i, d in enumerate(ALL_DTYPES)
    }
    tensors["scalar"] = torch.tensor(2.5)
    tensors["scalar_bf16"] = torch.tensor(-1.25, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["empty_1d"] = torch.zeros(0, dtype=torch.int64)
    tensors["rank4"] = _tensor(torch.float32, (2, 1, 3, 2), 7)
    return tensors


SAMPLES: list[Message] = [
    Task(
        task_id="task-1",
        federation="fed",
        version=3,
        model=ModelRef(name="tiny", revision="abc"),
        lora=LoraSpec(rank=4, target_modules=("q_proj", "k_proj", "v_proj"), mode="ffa", seed=9),
    ),
    GlobalModel(task_id="task-1", version=4, tensors=_every_dtype()),
    GlobalModel(task_id="task-1", version=0, tensors={}),
    Update(
        client_id="dev-1",
        task_id="task-1",
        base_version=2,
        num_samples=64,
        delta=_every_dtype(),
        train_loss=0.75,
        compute_s=1.5,
    ),
    Ack(update_id="u1", client_id="dev-1", accepted=True, version=5, staleness=1),
    Ack(
        update_id="u2",
        client_id="dev-1",
        accepted=False,
        reason="stale",
        detail="é ü — unicode survives",
        version=5,
    ),
    Status(
        client_id="dev-1",
        state="training",
        profile=DeviceProfile(name="pi5", memory_budget_mb=3500.0, relative_speed=0.2),
        plan={"method": "lora", "batch": 4, "lr": 1e-3, "fits": True},
        base_version=2,
        updates_sent=7,
    ),
    Metrics(version=5, time_s=12.5, eval_loss=0.5, eval_accuracy=0.875, merged_updates=3),
    Chunk(transfer_id="x1", index=1, total=3, size=10, xxh3="ab" * 8, data=b"\x00\xffabc"),
    *SPLIT_SAMPLES,
    Ask(client_id="dev-1", missing="global", version=4),
]


def _assert_tensors_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert (
        torch.equal(a.view(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        if a.numel()
        else True
    )


def _assert_messages_equal(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for name in type(a).model_fields:
        left, right = getattr(a, name), getattr(b, name)
        if (
            isinstance(left, dict)
            and left
            and all(isinstance(v, torch.Tensor) for v in left.values())
        ):
            assert left.keys() == right.keys()
            for key in left:
                _assert_tensors_equal(left[key], right[key])
        else:
            assert left == right, name


def _wire(message: Message, compression: Compression = "none") -> dict[str, object]:
    unpacked = msgpack.unpackb(encode(message, compression=compression))
    assert isinstance(unpacked, dict)
    return unpacked


def _pack(wire: dict[str, object]) -> bytes:
    data: bytes = msgpack.packb(wire)
    return data


def test_codec_samples_cover_every_message_kind() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_codec_round_trip_every_kind(message: Message) -> None:
    decoded = decode(encode(message))
    _assert_messages_equal(message, decoded)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_codec_bytes_are_plain_msgpack(message: Message) -> None:
    data = encode(message)
    wire = msgpack.unpackb(data)
    assert wire["kind"] == type(message).model_fields["kind"].default
    assert wire["schema_version"] == 1
    assert set(wire) == set(type(message).model_fields)
    # Byte for byte what msgpack itself writes for the same map.
    assert msgpack.packb(wire) == data


def test_codec_tensor_fields_are_documented_maps() -> None:
    message = SAMPLES[3]
    assert isinstance(message, Update)
    wire = _wire(message)
    delta = wire["delta"]
    assert isinstance(delta, dict)
    for name, tensor in message.delta.items():
        entry = delta[name]
        assert entry == {
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "data": entry["data"],
        }
        assert entry == tensor_to_wire(tensor)
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert entry["data"] == raw


def test_codec_int8_wire_matches_tensor_to_wire() -> None:
    tensor = _tensor(torch.float32, (4, 6), 3)
    message = Update(client_id="c", task_id="t", base_version=0, num_samples=1, delta={"w": tensor})
    wire = _wire(message, "int8")
    entry = wire["delta"]["w"]  # type: ignore[index]
    assert entry == tensor_to_wire(tensor, compression="int8")
    assert entry["dtype"] == "int8"
    assert entry["scale"]["dtype"] == "float32"
    assert entry["scale"]["shape"] == [4]
    assert msgpack.packb(wire) == encode(message, compression="int8")


def test_codec_decode_is_zero_copy() -> None:
    tensor = torch.arange(1024, dtype=torch.float32)
    message = Update(client_id="c", task_id="t", base_version=0, num_samples=1, delta={"w": tensor})
    buf = bytearray(encode(message))
    decoded = decode(buf)
    assert isinstance(decoded, Update)
    start = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    ptr = decoded.delta["w"].data_ptr()
    assert start <= ptr < start + len(buf)
    assert torch.equal(decoded.delta["w"], tensor)


def test_codec_decode_in_a_fresh_process_shows_no_warning() -> None:
    """torch's once-per-process read-only buffer warning is spent, silenced, at import."""
    code = (
        "import torch\n"
        "from schemas.codec import decode, encode\n"
        "from schemas.messages import Update\n"
        "update = Update(client_id='c', task_id='t', base_version=0, num_samples=1,"
        " delta={'w': torch.ones(3)})\n"
        "assert decode(encode(update)).delta['w'].tolist() == [1.0, 1.0, 1.0]\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "not writable" not in result.stderr


def test_codec_decode_bytes_raises_no_warning() -> None:
    message = SAMPLES[3]
    data = encode(message)
    torch.set_warn_always(True)  # makes torch repeat its read-only buffer warning every time
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                decoded = decode(data)
                decode(memoryview(data))
    finally:
        torch.set_warn_always(False)
    _assert_messages_equal(message, decoded)


def test_codec_decode_from_bytearray_gives_writable_tensors() -> None:
    message = Update(
        client_id="c", task_id="t", base_version=0, num_samples=1, delta={"w": torch.ones(8)}
    )
    decoded = decode(bytearray(encode(message)))
    assert isinstance(decoded, Update)
    decoded.delta["w"].add_(1)
    assert torch.equal(decoded.delta["w"], torch.full((8,), 2.0))


def test_codec_decode_accepts_memoryview_slices() -> None:
    data = encode(SAMPLES[0])
    framed = b"xx" + data + b"yy"
    decoded = decode(memoryview(framed)[2:-2])
    _assert_messages_equal(SAMPLES[0], decoded)


def test_codec_encode_handles_noncontiguous_and_grad_tensors() -> None:
    base = torch.randn(4, 6, requires_grad=True)
    transposed = base.t()
    message = Update(
        client_id="c", task_id="t", base_version=0, num_samples=1, delta={"w": transposed}
    )
    decoded = decode(encode(message))
    assert isinstance(decoded, Update)
    assert torch.equal(decoded.delta["w"], transposed.detach())


def test_codec_nan_and_inf_survive() -> None:
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    message = Update(client_id="c", task_id="t", base_version=0, num_samples=1, delta={"w": tensor})
    decoded = decode(encode(message))
    assert isinstance(decoded, Update)
    torch.testing.assert_close(decoded.delta["w"], tensor, equal_nan=True, rtol=0, atol=0)


# ----------------------------------------------------------------------------- compression


def _update(tensors: TensorMap) -> Update:
    return Update(client_id="c", task_id="t", base_version=0, num_samples=1, delta=tensors)


@pytest.mark.parametrize(
    ("compression", "dtype", "rtol"),
    [("fp16", torch.float16, 1e-3), ("bf16", torch.bfloat16, 8e-3)],
)
def test_codec_half_precision_compression_round_trips(
    compression: Compression, dtype: torch.dtype, rtol: float
) -> None:
    tensor = _tensor(torch.float32, (16, 32), 1)
    decoded = decode(encode(_update({"w": tensor}), compression=compression))
    assert isinstance(decoded, Update)
    out = decoded.delta["w"]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), tensor, rtol=rtol, atol=1e-6)


def test_codec_int8_compression_round_trips_to_float32() -> None:
    tensor = _tensor(torch.float32, (8, 64), 2) * torch.arange(1, 9).float()[:, None]
    decoded = decode(encode(_update({"w": tensor}), compression="int8"))
    assert isinstance(decoded, Update)
    out = decoded.delta["w"]
    assert out.dtype == torch.float32
    assert out.shape == tensor.shape
    step = tensor.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((out - tensor).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("shape", [(), (0,), (7,), (0, 3), (3, 0), (2, 3, 4)])
def test_codec_int8_compression_handles_every_shape(shape: tuple[int, ...]) -> None:
    tensor = _tensor(torch.float64, shape, 4)
    out = tensor_from_wire(
        msgpack.unpackb(msgpack.packb(tensor_to_wire(tensor, compression="int8")))
    )
    assert out.dtype == torch.float32
    assert out.shape == tensor.shape
    if tensor.numel():
        torch.testing.assert_close(
            out, tensor.float(), atol=float(tensor.abs().max()) / 127, rtol=0
        )


def test_codec_int8_zero_row_and_nan_row() -> None:
    tensor = torch.stack([torch.zeros(4), torch.tensor([1.0, float("nan"), 2.0, 3.0])])
    decoded = decode(encode(_update({"w": tensor}), compression="int8"))
    assert isinstance(decoded, Update)
    out = decoded.delta["w"]
    assert torch.equal(out[0], torch.zeros(4))
    assert not bool(torch.isfinite(out[1]).any())  # still caught by a finiteness check


def test_codec_compression_leaves_integer_tensors_alone() -> None:
    ints = _tensor(torch.int32, (5,), 5)
    flags = _tensor(torch.bool, (5,), 6)
    compressions: tuple[Compression, ...] = ("fp16", "bf16", "int8")
    for compression in compressions:
        decoded = decode(encode(_update({"i": ints, "b": flags}), compression=compression))
        assert isinstance(decoded, Update)
        assert torch.equal(decoded.delta["i"], ints)
        assert torch.equal(decoded.delta["b"], flags)


# ----------------------------------------------------------------------------- bad payloads


def test_codec_payload_too_large_is_refused_before_parsing() -> None:
    garbage = b"\xc1" * 101  # would be a CodecError if it were parsed
    with pytest.raises(PayloadTooLarge) as info:
        decode(garbage, max_size=100)
    assert (info.value.size, info.value.limit) == (101, 100)
    data = encode(SAMPLES[0])
    assert decode(data, max_size=len(data)).kind == "task"
    with pytest.raises(PayloadTooLarge):
        decode(data, max_size=len(data) - 1)
    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024


@pytest.mark.parametrize(
    "message", [SAMPLES[0], SAMPLES[3], SAMPLES[8]], ids=lambda m: type(m).__name__
)
def test_codec_truncated_payload_raises_codec_error(message: Message) -> None:
    data = encode(message)
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut])


def test_codec_corrupted_payload_never_escapes_as_another_error() -> None:
    data = bytearray(encode(SAMPLES[3]))
    rng = random.Random(1234)
    failures = 0
    for _ in range(1500):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            decode(bytes(mutated))
        except CodecError:
            failures += 1
    assert failures > 0


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"\xc1", b"\x91\x01", b"\xff" * 64, b"not msgpack at all", bytes(range(256))],
)
def test_codec_garbage_raises_codec_error(garbage: bytes) -> None:
    with pytest.raises(CodecError):
        decode(garbage)


def test_codec_random_bytes_raise_codec_error() -> None:
    rng = random.Random(99)
    for _ in range(300):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        with pytest.raises(CodecError):
            decode(blob)


def test_codec_trailing_data_raises_codec_error() -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(SAMPLES[0]) + b"\x00")


def test_codec_unknown_kind_raises_codec_error() -> None:
    wire = _wire(SAMPLES[4])
    wire["kind"] = "launch_missiles"
    with pytest.raises(CodecError, match="kind"):
        decode(_pack(wire))
    del wire["kind"]
    with pytest.raises(CodecError, match="kind"):
        decode(_pack(wire))


def test_codec_extra_field_raises_codec_error() -> None:
    wire = _wire(SAMPLES[4])
    wire["surprise"] = 1
    with pytest.raises(CodecError, match="unknown field `surprise`"):
        decode(_pack(wire))


def test_codec_missing_required_field_raises_codec_error() -> None:
    wire = _wire(SAMPLES[4])
    del wire["client_id"]
    with pytest.raises(CodecError, match="client_id"):
        decode(_pack(wire))


def test_codec_optional_fields_left_out_take_their_defaults() -> None:
    """A sender in another language may write only the fields it sets."""
    wire = _wire(SAMPLES[4])
    for name in ("detail", "duplicate", "staleness"):
        del wire[name]
    decoded = decode(_pack(wire))
    assert isinstance(decoded, Ack)
    assert (decoded.detail, decoded.duplicate, decoded.staleness) == ("", False, None)
    assert decoded.client_id == wire["client_id"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "5"),  # no lax coercion of strings into ints
        ("version", 5.0),
        ("version", -1),
        ("accepted", 1),
        ("client_id", b"dev-1"),
        ("client_id", ""),
        ("reason", "no_such_reason"),
        ("staleness", [1]),
    ],
)
def test_codec_wrong_field_types_raise_codec_error(field: str, value: object) -> None:
    wire = _wire(SAMPLES[4])
    wire[field] = value
    with pytest.raises(CodecError):
        decode(_pack(wire))


@pytest.mark.parametrize("version", [0, 2, 99, "1", 1.0, True, None])
def test_codec_bad_schema_version_raises_schema_version_error(version: object) -> None:
    wire = _wire(SAMPLES[3])
    wire["schema_version"] = version
    with pytest.raises(SchemaVersionError) as info:
        decode(_pack(wire))
    assert info.value.found == version
    assert info.value.supported == 1


def test_codec_missing_schema_version_raises_schema_version_error() -> None:
    wire = _wire(SAMPLES[4])
    del wire["schema_version"]
    with pytest.raises(SchemaVersionError):
        decode(_pack(wire))


def test_codec_schema_version_is_checked_before_the_tensors() -> None:
    wire = _wire(SAMPLES[3])
    wire["schema_version"] = 2
    wire["delta"] = {"w": {"layout": "something new"}}
    with pytest.raises(SchemaVersionError):
        decode(_pack(wire))


def _with_tensor(entry: object) -> bytes:
    wire = _wire(_update({"w": torch.zeros(2)}))
    wire["delta"] = {"w": entry}
    return _pack(wire)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "complex64", "shape": [1], "data": b"\0" * 8}, "not allowed"),
        ({"dtype": "float32", "shape": [3], "data": b"\0" * 8}, "needs 12 bytes"),
        ({"dtype": "float32", "shape": [-2], "data": b"\0" * 8}, "not a size"),
        (
            {"dtype": "float32", "shape": [2], "data": "text"},
            r"Expected `bytes`, got `str` - at `\$\.delta\[\.\.\.\]\.data`",
        ),
        ({"dtype": "float32", "shape": [2], "data": b"\0" * 8, "x": 1}, "unknown field `x`"),
        ({"dtype": "float32", "data": b"\0" * 8}, "missing required field `shape`"),
        ([1, 2], r"Expected `object`, got `array` - at `\$\.delta\[\.\.\.\]`"),
        ({"dtype": "bool", "shape": [1], "data": b"\x07"}, "0 and 1"),
    ],
)
def test_codec_bad_tensor_raises_codec_error(entry: object, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(_with_tensor(entry))


def test_codec_tensor_field_that_is_not_a_map_raises_codec_error() -> None:
    wire = _wire(_update({"w": torch.zeros(2)}))
    wire["delta"] = [1, 2, 3]
    with pytest.raises(CodecError):
        decode(_pack(wire))


def test_codec_duplicate_field_raises_codec_error() -> None:
    data = encode(SAMPLES[4])
    n = data[0] & 0x0F
    dup = bytes((0x80 | (n + 1),)) + data[1:] + msgpack.packb("detail") + msgpack.packb("x")
    with pytest.raises(CodecError, match="twice"):
        decode(dup)


def test_codec_ext_type_raises_codec_error() -> None:
    wire = _wire(SAMPLES[4])
    wire["detail"] = msgpack.ExtType(5, b"abc")
    with pytest.raises(CodecError):
        decode(_pack(wire))


def test_codec_deep_nesting_raises_codec_error() -> None:
    nested = b"\x91" * 5000 + b"\x00"
    wire = _pack(_wire(SAMPLES[4]))
    n = wire[0] & 0x0F
    payload = bytes((0x80 | (n + 1),)) + wire[1:] + msgpack.packb("deep") + nested
    with pytest.raises(CodecError):
        decode(payload)


def test_codec_encode_rejects_dtypes_outside_the_whitelist() -> None:
    with pytest.raises(CodecError, match="cannot travel"):
        encode(_update({"w": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(CodecError, match="cannot travel"):
        tensor_to_wire(torch.zeros(2, dtype=torch.uint16))


def test_codec_encode_rejects_values_msgpack_cannot_hold() -> None:
    status = Status(client_id="c", state="online", plan={"huge": 2**70})
    with pytest.raises(CodecError):
        encode(status)


def test_codec_encode_rejects_sparse_tensors() -> None:
    with pytest.raises(CodecError, match="cannot travel"):
        encode(_update({"w": torch.eye(3).to_sparse()}))
