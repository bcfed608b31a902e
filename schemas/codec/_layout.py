"""The msgpack layout every codec module shares: limits, headers and message specs.

A message is a msgpack map of every field; the specs say which fields carry tensors or raw
bytes, the parts the encoder writes and the decoders find without msgpack copying them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, cast

import msgpack

from schemas.errors import CodecError, SchemaVersionError
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message, TensorMap

MAX_TENSORS: Final = 65_536
"""Tensors one field may hold; bounds the work a hostile payload can cause."""
MAX_SEGMENT: Final = 1024 * 1024
"""Bytes of msgpack (outside bin payloads) read between two tensors; bounds memory too."""
PARSE_ERRORS: Final = (ValueError, TypeError, msgpack.UnpackException)
"""What msgpack raises on bytes it cannot parse."""


def map_header(n: int) -> bytes:
    """The msgpack header of a map of ``n`` entries."""
    if n <= 0x0F:
        return bytes((0x80 | n,))
    if n <= 0xFFFF:
        return b"\xde" + n.to_bytes(2, "big")
    if n <= 0xFFFFFFFF:
        return b"\xdf" + n.to_bytes(4, "big")
    raise CodecError(f"a map of {n} entries exceeds msgpack's limit")


def bin_header(n: int) -> bytes:
    """The msgpack header of a bin of ``n`` bytes."""
    if n <= 0xFF:
        return b"\xc4" + n.to_bytes(1, "big")
    if n <= 0xFFFF:
        return b"\xc5" + n.to_bytes(2, "big")
    if n <= 0xFFFFFFFF:
        return b"\xc6" + n.to_bytes(4, "big")
    raise CodecError(f"a bin of {n} bytes exceeds msgpack's limit")


MAP_WIDTHS: Final = {0xDE: 2, 0xDF: 4}
"""map16, map32: the width of their length field (a fixmap holds it in its first byte)."""
BIN_WIDTHS: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
"""bin8, bin16, bin32: the width of their length field."""


@dataclass(frozen=True, slots=True)
class Spec:
    """How one message class travels: which fields hold tensors or raw bytes."""

    cls: type[Message]
    field_names: frozenset[str]
    tensor_fields: tuple[str, ...]
    bytes_fields: tuple[str, ...]
    map_header: bytes
    """The message's map header: every field always travels."""
    keys: dict[str, bytes]
    """Packed names of the tensor and bytes fields."""


def _spec_for(cls: type[Message]) -> Spec:
    fields = cls.model_fields
    tensor_fields = tuple(n for n, f in fields.items() if f.annotation == TensorMap)
    bytes_fields = tuple(n for n, f in fields.items() if f.annotation is bytes)
    special = {*tensor_fields, *bytes_fields}
    return Spec(
        cls=cls,
        field_names=frozenset(fields),
        tensor_fields=tensor_fields,
        bytes_fields=bytes_fields,
        map_header=map_header(len(fields)),
        keys={n: msgpack.packb(n) for n in special},
    )


SPECS_BY_TYPE: Final[dict[type[Message], Spec]] = {c: _spec_for(c) for c in MESSAGE_TYPES}
SPECS_BY_KIND: Final[dict[str, Spec]] = {
    cast("str", c.model_fields["kind"].default): s for c, s in SPECS_BY_TYPE.items()
}
MAX_FIELDS: Final = max(len(c.model_fields) for c in MESSAGE_TYPES)
TENSOR_FIELDS: Final[frozenset[str]] = frozenset().union(
    *(s.tensor_fields for s in SPECS_BY_TYPE.values())
)
BYTES_FIELDS: Final[frozenset[str]] = frozenset().union(
    *(s.bytes_fields for s in SPECS_BY_TYPE.values())
)


def check_version(found: object) -> None:
    """Refuse a message written with another schema version (or none)."""
    if type(found) is not int or found != SCHEMA_VERSION:
        raise SchemaVersionError(found, SCHEMA_VERSION)
