"""The msgpack wire codec: messages to bytes and back, tensors without extra copies.

This package is the only code that imports msgpack.

A message is one plain msgpack map of ``kind``, ``schema_version`` and every field; a tensor
is ``{"dtype", "shape", "data": bin}``, plus ``"scale"`` (per-row absmax) when int8, which
decodes back to float32 so receivers never need to know how a sender compressed
(``schemas.tensor_wire`` holds the tensor side: whitelist, compression, checks).

Speed comes from never letting msgpack copy tensor bytes, and from few calls per message:

- ``encode`` packs every field without tensor or raw bytes in one call (of a packer kept
  per thread), writes map/bin headers around each tensor itself and joins everything once,
  into one buffer of the final size: the tensor bytes are copied exactly once, and the
  result is exactly ``msgpack.packb``'s bytes for the same map.
- ``decode`` hands msgpack a copy of the message without its tensor payloads (each
  swapped for a marker, ``_marked``) and parses everything in one call, then calls
  ``torch.frombuffer`` on the received buffer at each payload. Anything unusual falls back
  to a field-by-field cursor that skips bin payloads (``_reader``): same result, exact
  errors. ``_layout`` holds what both share: limits, headers, which fields hold tensors.

Decoded tensors share the buffer handed to ``decode``: clone before mutating either.
"""

from __future__ import annotations

import functools
import threading
from typing import Final

import msgpack
from pydantic import BaseModel, ValidationError

from schemas.codec._layout import (
    MAP_WIDTHS,
    SPECS_BY_KIND,
    SPECS_BY_TYPE,
    bin_header,
    map_header,
)
from schemas.codec._marked import marked_values
from schemas.codec._reader import exact_values
from schemas.errors import CodecError, PayloadTooLarge
from schemas.messages import AnyMessage, Message, TensorMap
from schemas.tensor_wire import (
    Compression,
    Packed,
    allow_readonly,
    pack,
    tensor_from_wire,
    tensor_to_wire,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Compression",
    "decode",
    "encode",
    "tensor_from_wire",
    "tensor_to_wire",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""Largest payload ``decode`` accepts unless told otherwise (after chunk reassembly)."""


# --------------------------------------------------------------------------- encoding

_DATA_KEY: Final[bytes] = msgpack.packb("data")

_Piece = bytes | memoryview


@functools.lru_cache(maxsize=4096)
def _tensor_prefix(
    name: str, dtype: str, shape: tuple[int, ...], nbytes: int, scaled: bool
) -> bytes:
    """A tensor's name and its map up to the data (an adapter's layouts repeat: cached)."""
    items: bytes = msgpack.packb(["dtype", dtype, "shape", shape])[1:]  # the array's items
    key: bytes = msgpack.packb(name)
    return key + map_header(4 if scaled else 3) + items + _DATA_KEY + bin_header(nbytes)


def _append_tensor(pieces: list[_Piece], name: str, packed: Packed) -> None:
    data, scale = packed.data, packed.scale
    pieces += (
        _tensor_prefix(name, packed.dtype, packed.shape, data.nbytes, scale is not None),
        data,
    )
    if scale is not None:
        _append_tensor(pieces, "scale", scale)


def _nested_to_wire(obj: object) -> object:
    """The hook for what msgpack cannot pack itself: a nested wire model becomes its map."""
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    raise TypeError(f"a {type(obj).__name__} cannot travel")


_PACKERS: Final = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's packer: reusing one skips building a packer per message."""
    try:
        packer: msgpack.Packer = _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer(default=_nested_to_wire)
    return packer


def encode(message: Message, *, compression: Compression = "none") -> bytes:
    """One message as plain msgpack bytes; tensor bytes are copied once, into the result.

    ``compression`` applies to the floating tensors of every tensor field. Raises
    ``CodecError`` for a tensor that cannot travel (dtype outside the whitelist) or a
    value msgpack cannot hold (an int beyond 64 bits).
    """
    spec = SPECS_BY_TYPE.get(type(message))
    if spec is None:
        raise CodecError(f"{type(message).__name__} is not a wire message")
    fields = message.__dict__  # a frozen model's validated values, in declaration order
    plain = dict(fields)  # minus the tensor and bytes fields, below (cheaper than picking)
    heavy: list[str] = []
    for name in spec.tensor_fields:
        if plain.pop(name):
            heavy.append(name)
        else:
            plain[name] = {}  # empty: msgpack packs it with the rest
    for name in spec.bytes_fields:
        del plain[name]
    try:
        small = _packer().pack(plain)
        skip = 1 + MAP_WIDTHS.get(small[0], 0)  # the packer's map header, replaced by ours
        pieces: list[_Piece] = [spec.map_header, small[skip:]]
        for name in heavy:
            tensors: TensorMap = fields[name]
            pieces += (spec.keys[name], map_header(len(tensors)))
            for tensor_name, tensor in tensors.items():
                _append_tensor(pieces, tensor_name, pack(tensor, compression))
        for name in spec.bytes_fields:
            raw: bytes = fields[name]
            pieces += (spec.keys[name], bin_header(len(raw)), raw)
        return b"".join(pieces)  # sizes the result once, then copies each piece into it
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"a {type(message).__name__} cannot be packed: {exc}") from exc


# --------------------------------------------------------------------------- decoding


def decode(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_MESSAGE_BYTES
) -> AnyMessage:
    """The message in ``data``; tensors are views on ``data`` (no copy, see module docstring).

    Raises:
        PayloadTooLarge: ``data`` is over ``max_size``; checked before anything is parsed.
        SchemaVersionError: the message was written by an incompatible release.
        CodecError: anything else wrong; nothing partial is ever returned.
    """
    view = _as_view(data)
    if view.nbytes > max_size:
        raise PayloadTooLarge(view.nbytes, max_size)
    with allow_readonly(view.readonly):
        values = marked_values(view)
        if values is None:  # anything unusual, wrong or foreign: field by field, exactly
            values = exact_values(view)
    kind = values.get("kind")
    spec = SPECS_BY_KIND.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise CodecError(f"unknown message kind {kind!r}")
    try:  # what model_validate runs, without its wrapper
        message: AnyMessage = spec.cls.__pydantic_validator__.validate_python(values, strict=True)
    except ValidationError as exc:
        if not spec.field_names.issuperset(values):  # keys may be bin as well as str: repr
            unknown = sorted(map(repr, values.keys() - spec.field_names))
            raise CodecError(f"a {kind} message has unknown fields {unknown}") from None
        raise CodecError(f"invalid {kind} message: {exc}") from exc
    return message


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except TypeError as exc:
        raise CodecError(f"cannot read a {type(data).__name__} as bytes: {exc}") from exc
    return view
