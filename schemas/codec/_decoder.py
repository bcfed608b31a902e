"""Decoding: one msgspec call per message, tensor payloads left where they arrived.

Each message class gets a msgspec Struct made from its pydantic model, tagged by ``kind``:
a tensor field is a map of ``WireTensor`` (whose ``data`` is a memoryview on the received
buffer, never a copy), a bytes field is ``bytes``, and every other field is ``Any``, left
for pydantic to validate. msgspec parses the whole message in C, refuses unknown fields,
truncation and trailing bytes, and this module then checks what msgspec does not: the
schema version, a field sent twice (msgspec keeps the last one silently, as msgpack-python
does, so the map header's count is compared with the fields found), and each tensor's
layout (``schemas.tensor_wire.build``). Inside a tensor map a repeated key keeps its last
value, as msgpack-python's ``unpackb`` does.

A message over ``MAX_SEGMENT`` is first read as an outline, its tensor and bytes fields left
unparsed and every other field skipped, so the limits on what lies outside the payloads and
on tensor counts hold before msgspec builds anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import msgspec
import torch

from schemas.codec._layout import (
    MAX_SEGMENT,
    MAX_TENSORS,
    SPECS_BY_TYPE,
    Spec,
    WireTensor,
    check_version,
)
from schemas.errors import CodecError
from schemas.messages import TensorMap
from schemas.tensor_wire import build


class _Versioned(msgspec.Struct):
    """Only the schema version, any other field skipped: read when a message fails to parse."""

    schema_version: Any = msgspec.UNSET


_TensorFields = dict[str, WireTensor] | msgspec.UnsetType
_SCALARS: Final = (str, int, float, bool, type(None))


def _scalar(annotation: object) -> bool:
    """Whether a field of this annotation can only hold a scalar (never a list or a map)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return True
    if origin is Annotated:
        return _scalar(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return all(map(_scalar, get_args(annotation)))
    return annotation in _SCALARS


@dataclass(frozen=True, slots=True)
class _Kind:
    """One message kind as the decoder sees it."""

    spec: Spec
    nested: tuple[str, ...]
    """Fields that may hold arrays or maps, to turn into tuples (tensor fields aside)."""


def _struct_for(spec: Spec) -> type[msgspec.Struct]:
    """The msgspec Struct of one message class: every field optional, so absence shows."""
    fields: list[tuple[str, Any, Any]] = []
    for name in spec.cls.model_fields:
        if name == "kind":
            continue  # the tag
        kind: Any = (
            _TensorFields
            if name in spec.tensor_fields
            else bytes | msgspec.UnsetType
            if name in spec.bytes_fields
            else Any
        )
        fields.append((name, kind, msgspec.UNSET))
    return msgspec.defstruct(
        f"{spec.cls.__name__}Wire",
        fields,
        tag_field="kind",
        tag=spec.kind,
        forbid_unknown_fields=True,
        gc=False,  # decoded values form trees, never cycles: nothing for the collector
    )


def _kind(spec: Spec) -> _Kind:
    names = tuple(n for n in spec.cls.model_fields if n != "kind")
    nested = tuple(
        n
        for n in names
        if n not in (*spec.tensor_fields, *spec.bytes_fields)
        and not _scalar(spec.cls.model_fields[n].annotation)
    )
    return _Kind(spec=spec, nested=nested)


_KINDS: Final = {_struct_for(spec): _kind(spec) for spec in SPECS_BY_TYPE.values()}
_TENSOR_FIELDS: Final = frozenset(n for spec in SPECS_BY_TYPE.values() for n in spec.tensor_fields)
_PAYLOAD_FIELDS: Final = tuple(
    sorted(_TENSOR_FIELDS.union(*(spec.bytes_fields for spec in SPECS_BY_TYPE.values())))
)
_Outline: Final = msgspec.defstruct(
    "Outline", [(n, msgspec.Raw, msgspec.Raw()) for n in _PAYLOAD_FIELDS]
)
"""The tensor and bytes fields of any message, unparsed (empty when absent); every other
field is skipped."""
_OUTLINE: Final = msgspec.msgpack.Decoder(_Outline)
_TENSOR_INDEXES: Final = tuple(i for i, n in enumerate(_PAYLOAD_FIELDS) if n in _TENSOR_FIELDS)
_MIN_TENSOR_BYTES: Final = 23
"""The smallest tensor entry that parses: a 1-byte name and ``{dtype: "", shape: [], data: b""}``;
a field shorter than this many bytes per allowed tensor cannot hold too many."""
_MESSAGES: Final = msgspec.msgpack.Decoder(Union[tuple(_KINDS)])  # noqa: UP007
_VERSION: Final = msgspec.msgpack.Decoder(_Versioned)
_CONTAINERS: Final = (list, dict)
_PARSE_ERRORS: Final = (msgspec.DecodeError, ValueError, RecursionError)
"""What msgspec raises on bytes it cannot parse (invalid UTF-8 is a ``UnicodeDecodeError``)."""
_UNSET: Final = msgspec.UNSET
_astuple: Final = msgspec.structs.astuple
_asdict: Final = msgspec.structs.asdict


def message_values(view: memoryview) -> tuple[Spec, dict[str, object]]:
    """The message's spec and its fields as pydantic takes them, tensors already built.

    Raises ``SchemaVersionError`` for another schema version (checked before any tensor is
    built) and ``CodecError`` for anything else wrong.
    """
    if view.nbytes > MAX_SEGMENT:
        _check_outline(view)
    try:
        wire = _MESSAGES.decode(view)
    except msgspec.ValidationError as exc:  # well-formed msgpack, not one of our messages
        _refuse_other_versions(view)
        raise CodecError(f"invalid message: {exc}") from None
    except _PARSE_ERRORS as exc:
        raise CodecError(f"malformed msgpack: {exc}") from None
    kind = _KINDS[type(wire)]
    values = _asdict(wire)
    sent = _map_size(view) - 1  # - 1: the kind
    if sent != len(values) or _UNSET in values.values():  # some field not sent
        values = {n: v for n, v in values.items() if v is not _UNSET}
    check_version(values.get("schema_version"))
    if len(values) != sent:
        raise CodecError("a field appears twice in the message")
    for name in kind.nested:
        value = values.get(name)
        if type(value) in _CONTAINERS:
            values[name] = _as_tuples(value)
    for name in kind.spec.tensor_fields:
        wire_tensors = values.get(name)
        if wire_tensors:
            values[name] = _tensors(wire_tensors, name)
    return kind.spec, values


def _check_outline(view: memoryview) -> None:
    """Refuse a large message whose other fields or tensor counts are over the limits.

    Checked before anything is built, so a hostile payload cannot make the decoder
    allocate many times its size. Only a message over ``MAX_SEGMENT`` can break them.
    """
    try:
        raws = _astuple(_OUTLINE.decode(view))
    except _PARSE_ERRORS:
        return  # the full decode says what is wrong
    sizes = list(map(len, raws))
    outside = view.nbytes - sum(sizes)
    if outside > MAX_SEGMENT:
        raise CodecError(
            f"{outside} bytes of msgpack outside tensor and bytes fields, over {MAX_SEGMENT}"
        )
    for index in _TENSOR_INDEXES:
        if sizes[index] > _MIN_TENSOR_BYTES * MAX_TENSORS:
            header = memoryview(raws[index])
            tensors = _map_size(header) if _is_map(header[0]) else 0
            if tensors > MAX_TENSORS:
                name = _PAYLOAD_FIELDS[index]
                raise CodecError(f"field {name!r} holds {tensors} tensors, over {MAX_TENSORS}")


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def _refuse_other_versions(view: memoryview) -> None:
    """Raise ``SchemaVersionError`` when a message that failed to parse names another version.

    A later release may add fields or change a tensor's layout; its messages should say
    "another version", not "unknown field".
    """
    try:
        found = _VERSION.decode(view).schema_version
    except _PARSE_ERRORS:  # msgspec's ValidationError is a DecodeError
        return
    if found is not _UNSET:
        check_version(found)


def _map_size(view: memoryview) -> int:
    """Entries in the map header ``view`` starts with (msgspec has parsed it as a map)."""
    first = view[0]
    if first <= 0x8F:
        return first & 0x0F
    if first == 0xDE:
        return view[1] << 8 | view[2]
    return int.from_bytes(view[1:5], "big")


def _as_tuples(value: object) -> object:
    """Arrays as tuples, at any depth: the models take sequences as tuples (strict)."""
    if type(value) is list:
        return tuple([_as_tuples(item) if type(item) in _CONTAINERS else item for item in value])
    if type(value) is dict:
        return {k: _as_tuples(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    return value


def _tensors(wire_tensors: dict[str, WireTensor], field: str) -> TensorMap:
    if len(wire_tensors) > MAX_TENSORS:
        raise CodecError(f"field {field!r} holds {len(wire_tensors)} tensors, over {MAX_TENSORS}")
    tensors: TensorMap = {}
    for name, wire in wire_tensors.items():
        try:
            if wire.scale is _UNSET:  # the common case, one call
                tensors[name] = build(wire.dtype, wire.shape, wire.data, scale=None)
            else:
                tensors[name] = _scaled(wire, wire.scale)
        except CodecError as exc:
            raise CodecError(f"tensor {name!r} of field {field!r}: {exc}") from exc
    return tensors


def _scaled(wire: WireTensor, scale: WireTensor) -> torch.Tensor:
    if scale.scale is not _UNSET:
        raise CodecError("a scale has no scale of its own")
    scale_tensor = build(scale.dtype, scale.shape, scale.data, scale=None)
    return build(wire.dtype, wire.shape, wire.data, scale=scale_tensor)
