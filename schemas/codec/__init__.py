"""The msgpack wire codec: messages to bytes and back, tensors without extra copies.

This package is the only code that parses or writes the wire format; msgspec does both in
C, one call per message.

A message is one plain msgpack map of ``kind``, ``schema_version`` and every field; a tensor
is ``{"dtype", "shape", "data": bin}``, plus ``"scale"`` (per-row absmax) when int8, which
decodes back to float32 so receivers never need to know how a sender compressed
(``schemas.tensor_wire`` holds the tensor side: whitelist, compression, checks). Any
msgpack library in any language reads and writes it.

- ``encode`` hands msgspec the model's fields with each tensor as a ``WireTensor`` whose
  ``data`` is a memoryview of the tensor's memory: the tensor bytes are copied exactly
  once, into the result.
- ``decode`` parses with a msgspec Struct per message kind (``_decoder``), where each
  tensor's data arrives as a memoryview of the received buffer; ``torch.frombuffer`` then
  makes the tensor without a copy, and pydantic validates the message.

Decoded tensors share the buffer handed to ``decode``: clone before mutating either.
"""

from __future__ import annotations

from typing import Final

import msgspec
from pydantic import BaseModel, ValidationError

from schemas.codec._decoder import message_values
from schemas.codec._layout import SPECS_BY_TYPE, WireTensor
from schemas.errors import CodecError, PayloadTooLarge
from schemas.messages import AnyMessage, Message
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


def _nested_to_wire(obj: object) -> object:
    """The hook for what msgspec cannot pack itself: a nested wire model becomes its map."""
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    raise TypeError(f"a {type(obj).__name__} cannot travel")


_ENCODER: Final = msgspec.msgpack.Encoder(enc_hook=_nested_to_wire)


def _wire_tensor(packed: Packed) -> WireTensor:
    scale = packed.scale
    if scale is None:
        return WireTensor(packed.dtype, packed.shape, packed.data)
    return WireTensor(packed.dtype, packed.shape, packed.data, _wire_tensor(scale))


def encode(message: Message, *, compression: Compression = "none") -> bytes:
    """One message as plain msgpack bytes; tensor bytes are copied once, into the result.

    ``compression`` applies to the floating tensors of every tensor field. Raises
    ``CodecError`` for a tensor that cannot travel (dtype outside the whitelist) or a
    value msgpack cannot hold (an int beyond 64 bits).
    """
    spec = SPECS_BY_TYPE.get(type(message))
    if spec is None:
        raise CodecError(f"{type(message).__name__} is not a wire message")
    fields = dict(message.__dict__)  # a frozen model's validated values, in declaration order
    for name in spec.tensor_fields:
        tensors = fields[name]
        if tensors:
            fields[name] = {n: _wire_tensor(pack(t, compression)) for n, t in tensors.items()}
    try:
        return _ENCODER.encode(fields)
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
        spec, values = message_values(view)
    try:  # what model_validate runs, without its wrapper
        message: AnyMessage = spec.cls.__pydantic_validator__.validate_python(values, strict=True)
    except ValidationError as exc:
        raise CodecError(f"invalid {spec.cls.model_fields['kind'].default} message: {exc}") from exc
    return message


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except TypeError as exc:
        raise CodecError(f"cannot read a {type(data).__name__} as bytes: {exc}") from exc
    return view
