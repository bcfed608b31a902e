"""The tensor map on its own: ``tensor_to_wire`` / ``tensor_from_wire``, the reference path."""

from __future__ import annotations

import msgpack
import pytest
import torch

from schemas.codec import tensor_from_wire, tensor_to_wire
from schemas.errors import CodecError
from tests.schemas.test_codec import ALL_DTYPES, _assert_tensors_equal, _tensor


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 3)])
def test_tensor_wire_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _tensor(dtype, shape, 11)
    wire = tensor_to_wire(tensor)
    back = tensor_from_wire(msgpack.unpackb(msgpack.packb(wire)))
    _assert_tensors_equal(tensor, back)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ("not a map", "must be a map"),
        ({"dtype": "float32", "shape": [1]}, "keys"),
        ({"dtype": "float32", "shape": [1], "data": b"\0" * 4, "extra": 1}, "keys"),
        ({"dtype": "complex64", "shape": [1], "data": b"\0" * 8}, "not allowed"),
        ({"dtype": "float8", "shape": [1], "data": b"\0"}, "not allowed"),
        ({"dtype": 5, "shape": [1], "data": b"\0" * 4}, "not allowed"),
        ({"dtype": "float32", "shape": [2], "data": b"\0" * 4}, "needs 8 bytes"),
        ({"dtype": "float32", "shape": [-1], "data": b"\0" * 4}, "not a size"),
        ({"dtype": "float32", "shape": [True], "data": b"\0" * 4}, "not a size"),
        ({"dtype": "float32", "shape": [1.0], "data": b"\0" * 4}, "not a size"),
        ({"dtype": "float32", "shape": "1", "data": b"\0" * 4}, "shape"),
        ({"dtype": "float32", "shape": [1] * 65, "data": b"\0" * 4}, "shape"),
        ({"dtype": "float32", "shape": [1], "data": "abcd"}, "bin"),
        ({"dtype": "bool", "shape": [2], "data": b"\x01\x02"}, "0 and 1"),
        (
            {
                "dtype": "float32",
                "shape": [1],
                "data": b"\0" * 4,
                "scale": {"dtype": "float32", "shape": [1], "data": b"\0" * 4},
            },
            "only int8",
        ),
        (
            {
                "dtype": "int8",
                "shape": [2, 2],
                "data": b"\0" * 4,
                "scale": {"dtype": "float32", "shape": [1], "data": b"\0" * 4},
            },
            "scale must be",
        ),
    ],
)
def test_tensor_from_wire_rejects_bad_maps(wire: object, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        tensor_from_wire(wire)
