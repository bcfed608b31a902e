"""What the encoder and decoder share: the tensor map, limits, and which fields hold what.

A message is a msgpack map of every field; the specs say which fields carry tensors or raw
bytes, the parts that travel as bin without a copy on either side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final, cast

import msgspec

from schemas.errors import SchemaVersionError
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message, TensorMap
from schemas.tensor_wire import MAX_NDIM

MAX_TENSORS: Final = 65_536
"""Tensors one field may hold; bounds the work a hostile payload can cause."""
MAX_SEGMENT: Final = 1024 * 1024
"""Bytes of msgpack a message may hold outside its tensor fields and bytes fields.

Parsed values take several times their wire size in memory (an empty array is 1 byte on
the wire and a Python object of 56), so this bounds what a hostile payload can allocate.
"""


class WireTensor(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A tensor map as it travels: ``{dtype, shape, data}``, plus ``scale`` for int8.

    ``data`` is a memoryview both ways: of the tensor's own memory when encoding, of the
    received buffer when decoding. msgspec checks the types; ``schemas.tensor_wire.build``
    checks the rest (whitelisted dtype, sizes, bytes). An unset scale is not written.
    """

    dtype: str
    shape: Annotated[tuple[int, ...], msgspec.Meta(max_length=MAX_NDIM)]
    data: memoryview
    scale: WireTensor | msgspec.UnsetType = msgspec.UNSET


@dataclass(frozen=True, slots=True)
class Spec:
    """How one message class travels: which fields hold tensors or raw bytes."""

    cls: type[Message]
    kind: str
    tensor_fields: tuple[str, ...]
    bytes_fields: tuple[str, ...]


def _spec_for(cls: type[Message]) -> Spec:
    fields = cls.model_fields
    return Spec(
        cls=cls,
        kind=cast("str", fields["kind"].default),
        tensor_fields=tuple(n for n, f in fields.items() if f.annotation == TensorMap),
        bytes_fields=tuple(n for n, f in fields.items() if f.annotation is bytes),
    )


SPECS_BY_TYPE: Final[dict[type[Message], Spec]] = {c: _spec_for(c) for c in MESSAGE_TYPES}


def check_version(found: object) -> None:
    """Refuse a message written with another schema version (or none)."""
    if type(found) is not int or found != SCHEMA_VERSION:
        raise SchemaVersionError(found, SCHEMA_VERSION)
