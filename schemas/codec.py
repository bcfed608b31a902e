"""The msgpack wire codec: messages to bytes and back, tensors without extra copies.

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
  swapped for a marker, see ``_marked_values``) and parses everything in one call, then
  calls ``torch.frombuffer`` on the received buffer at each payload. Anything unusual
  falls back to a field-by-field cursor that skips bin payloads: same result, exact errors.

Decoded tensors share the buffer handed to ``decode``: clone before mutating either.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar, cast

import msgpack
import torch
from pydantic import BaseModel, ValidationError

from schemas.errors import CodecError, PayloadTooLarge, SchemaVersionError
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION, AnyMessage, Message, TensorMap
from schemas.tensor_wire import (
    Compression,
    Packed,
    allow_readonly,
    build,
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

_MAX_TENSORS: Final = 65_536
"""Tensors one field may hold; bounds the work a hostile payload can cause."""
_MAX_SEGMENT: Final = 1024 * 1024
"""Bytes of msgpack (outside bin payloads) read between two tensors; bounds memory too."""
_WINDOW: Final = 4096
"""Bytes first handed to msgpack's parser; grown when a value runs past it."""


# --------------------------------------------------------------------------- wire headers


def _map_header(n: int) -> bytes:
    if n <= 0x0F:
        return bytes((0x80 | n,))
    if n <= 0xFFFF:
        return b"\xde" + n.to_bytes(2, "big")
    if n <= 0xFFFFFFFF:
        return b"\xdf" + n.to_bytes(4, "big")
    raise CodecError(f"a map of {n} entries exceeds msgpack's limit")


def _bin_header(n: int) -> bytes:
    if n <= 0xFF:
        return b"\xc4" + n.to_bytes(1, "big")
    if n <= 0xFFFF:
        return b"\xc5" + n.to_bytes(2, "big")
    if n <= 0xFFFFFFFF:
        return b"\xc6" + n.to_bytes(4, "big")
    raise CodecError(f"a bin of {n} bytes exceeds msgpack's limit")


_MAP_WIDTHS: Final = {0xDE: 2, 0xDF: 4}
"""map16, map32: the width of their length field (a fixmap holds it in its first byte)."""
_BIN_WIDTHS: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
"""bin8, bin16, bin32: the width of their length field."""


# --------------------------------------------------------------------------- message specs


@dataclass(frozen=True, slots=True)
class _Spec:
    """How one message class travels: which fields hold tensors or raw bytes."""

    cls: type[Message]
    field_names: frozenset[str]
    tensor_fields: tuple[str, ...]
    bytes_fields: tuple[str, ...]
    map_header: bytes
    """The message's map header: every field always travels."""
    keys: dict[str, bytes]
    """Packed names of the tensor and bytes fields."""


def _spec_for(cls: type[Message]) -> _Spec:
    fields = cls.model_fields
    tensor_fields = tuple(n for n, f in fields.items() if f.annotation == TensorMap)
    bytes_fields = tuple(n for n, f in fields.items() if f.annotation is bytes)
    special = {*tensor_fields, *bytes_fields}
    return _Spec(
        cls=cls,
        field_names=frozenset(fields),
        tensor_fields=tensor_fields,
        bytes_fields=bytes_fields,
        map_header=_map_header(len(fields)),
        keys={n: msgpack.packb(n) for n in special},
    )


_SPECS_BY_TYPE: Final[dict[type[Message], _Spec]] = {c: _spec_for(c) for c in MESSAGE_TYPES}
_SPECS_BY_KIND: Final[dict[str, _Spec]] = {
    cast("str", c.model_fields["kind"].default): s for c, s in _SPECS_BY_TYPE.items()
}
_MAX_FIELDS: Final = max(len(c.model_fields) for c in MESSAGE_TYPES)
_TENSOR_FIELDS: Final[frozenset[str]] = frozenset().union(
    *(s.tensor_fields for s in _SPECS_BY_TYPE.values())
)
_BYTES_FIELDS: Final[frozenset[str]] = frozenset().union(
    *(s.bytes_fields for s in _SPECS_BY_TYPE.values())
)


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
    return key + _map_header(4 if scaled else 3) + items + _DATA_KEY + _bin_header(nbytes)


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
    spec = _SPECS_BY_TYPE.get(type(message))
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
        skip = 1 + _MAP_WIDTHS.get(small[0], 0)  # the packer's map header, replaced by ours
        pieces: list[_Piece] = [spec.map_header, small[skip:]]
        for name in heavy:
            tensors: TensorMap = fields[name]
            pieces += (spec.keys[name], _map_header(len(tensors)))
            for tensor_name, tensor in tensors.items():
                _append_tensor(pieces, tensor_name, pack(tensor, compression))
        for name in spec.bytes_fields:
            raw: bytes = fields[name]
            pieces += (spec.keys[name], _bin_header(len(raw)), raw)
        return b"".join(pieces)  # sizes the result once, then copies each piece into it
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"a {type(message).__name__} cannot be packed: {exc}") from exc


# --------------------------------------------------------------------------- decoding

_T = TypeVar("_T")
_PARSE_ERRORS: Final = (ValueError, TypeError, msgpack.UnpackException)


def _parser() -> msgpack.Unpacker:
    return msgpack.Unpacker(
        use_list=False,
        raw=False,
        strict_map_key=True,
        read_size=_WINDOW,
        max_buffer_size=_MAX_SEGMENT,
    )


class _Cursor:
    """Reads msgpack from one buffer with msgpack's own parser, skipping bin payloads.

    The parser sees a small window of the buffer, refilled when a value runs past it (at
    most ``_MAX_SEGMENT`` bytes between two tensors); ``bin_span`` reads a bin header by
    hand and moves past the payload without the parser ever copying it. ``base`` is the
    buffer offset the parser's stream position 0 stands for.
    """

    __slots__ = ("base", "fed", "size", "unpacker", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.size = view.nbytes
        self.seek(0)

    def seek(self, pos: int) -> None:
        """Continue at ``pos``; the parser is made when something is read there."""
        self.base = self.fed = pos
        self.unpacker: msgpack.Unpacker | None = None

    def _parser(self) -> msgpack.Unpacker:
        parser = self.unpacker
        if parser is None:
            parser = self.unpacker = _parser()
            self.fed = min(self.size, self.base + _WINDOW)
            parser.feed(self.view[self.base : self.fed])
        return parser

    @property
    def pos(self) -> int:
        """Offset in the buffer of the next unread object."""
        if self.unpacker is None:
            return self.base
        told: int = self.unpacker.tell()
        return self.base + told

    def _read(self, method: Callable[[msgpack.Unpacker], _T]) -> _T:
        parser = self._parser()
        while True:
            try:
                return method(parser)
            except msgpack.OutOfData:  # the parser resumes where it stopped once fed
                if self.fed >= self.size:
                    raise CodecError("truncated message") from None
                more = min(self.size, self.fed + max(_WINDOW, self.fed - self.base))
                try:
                    parser.feed(self.view[self.fed : more])
                except msgpack.BufferFull as exc:
                    raise CodecError(
                        f"more than {_MAX_SEGMENT} bytes of msgpack between two tensors"
                    ) from exc
                self.fed = more
            except _PARSE_ERRORS as exc:
                raise CodecError(f"malformed msgpack: {exc}") from exc

    def value(self) -> object:
        """The next object (never a tensor payload: those go through ``bin_span``)."""
        parser = self.unpacker
        if parser is not None:
            try:  # the common case, inlined: the object lies inside the window
                return parser.unpack()
            except msgpack.OutOfData:
                pass  # _read feeds more and resumes
            except _PARSE_ERRORS as exc:
                raise CodecError(f"malformed msgpack: {exc}") from exc
        return self._read(msgpack.Unpacker.unpack)

    def map_header(self, what: str) -> int:
        parser = self.unpacker
        if parser is not None:
            try:  # the common case, inlined as in ``value``
                found: int = parser.read_map_header()
            except (msgpack.OutOfData, *_PARSE_ERRORS):
                pass  # _read feeds more, or says what is wrong
            else:
                return found
        try:
            n: int = self._read(msgpack.Unpacker.read_map_header)
        except CodecError as exc:
            raise CodecError(f"{what} must be a map: {exc}") from exc
        return n

    def bin_span(self, what: str) -> tuple[int, int]:
        """``(start, length)`` of the bin at the cursor, which then moves past it."""
        told: int = self.unpacker.tell() if self.unpacker is not None else 0
        pos = self.base + told
        first = self.view[pos] if pos < self.size else -1
        width = _BIN_WIDTHS.get(first)
        if width is None:
            raise CodecError(f"{what} must be bin")
        start = pos + 1 + width
        length = int.from_bytes(self.view[pos + 1 : start], "big")
        end = start + length
        if end > self.size:
            raise CodecError("truncated message")
        self.seek(end)
        return start, length


def _read_tensor(cursor: _Cursor, *, allow_scale: bool) -> torch.Tensor:
    n = cursor.map_header("a tensor")
    if n != 3 and not (n == 4 and allow_scale):
        raise CodecError("a tensor map has keys dtype, shape, data (and scale)")
    value = cursor.value
    dtype: object = None
    shape: object = None
    span: tuple[int, int] | None = None
    scale: torch.Tensor | None = None
    for _ in range(n):
        key = value()
        if key == "dtype" and dtype is None:  # in the order encode writes them
            dtype = value()
        elif key == "shape" and shape is None:
            shape = value()
        elif key == "data" and span is None:
            span = cursor.bin_span("tensor data")
        elif key == "scale" and allow_scale and scale is None:
            scale = _read_tensor(cursor, allow_scale=False)
        else:
            raise CodecError(f"tensor key {key!r} is unexpected or repeated")
    if span is None or (n == 4 and scale is None):
        raise CodecError("a tensor map has keys dtype, shape, data (and scale)")
    start, length = span
    return build(dtype, shape, cursor.view, start=start, length=length, scale=scale)


def _read_tensor_map(cursor: _Cursor, field: str) -> TensorMap:
    n = cursor.map_header("a tensor field")
    if n > _MAX_TENSORS:
        raise CodecError(f"field {field!r} holds {n} tensors, more than {_MAX_TENSORS}")
    tensors: TensorMap = {}
    for _ in range(n):
        name = cursor.value()
        if type(name) is not str:
            raise CodecError(f"a tensor name in {field!r} must be a string, not {name!r}")
        if name in tensors:
            raise CodecError(f"field {field!r} repeats tensor {name!r}")
        try:
            tensors[name] = _read_tensor(cursor, allow_scale=True)
        except CodecError as exc:
            raise CodecError(f"tensor {name!r} of field {field!r}: {exc}") from exc
    return tensors


def _top_map(view: memoryview) -> tuple[int, int]:
    """``(fields, header length)`` of the message's own map header, read by hand."""
    first = view[0] if view.nbytes else -1
    width = 0 if 0x80 <= first <= 0x8F else _MAP_WIDTHS.get(first)
    if width is None:
        raise CodecError("a message must be a map")
    if view.nbytes < 1 + width:
        raise CodecError("truncated message")
    return first & 0x0F if width == 0 else int.from_bytes(view[1 : 1 + width], "big"), 1 + width


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except TypeError as exc:
        raise CodecError(f"cannot read a {type(data).__name__} as bytes: {exc}") from exc
    return view


# --------------------------------------------------------------------------- one-call path

_SECRET: Final = os.urandom(14)
"""Drawn per process and never sent: markers built from it cannot be forged by a sender."""
_MARKER_HEADER: Final = b"\xc4\x10"
"""A marker travels as a 16-byte bin: ``_SECRET``, then its index."""
_DATA_BIN: Final = re.compile(rb"\xa4data[\xc4-\xc6]")
"""A ``"data"`` key followed by a bin header: where a tensor's (or a chunk's) bytes start."""

_Spans = dict[bytes, tuple[int, int]]
"""Payload ``(start, length)`` by marker; taking a span pops it, so each is used once."""


def _strip_payloads(view: memoryview) -> tuple[bytes, _Spans]:
    """``view`` with each ``"data"`` bin payload swapped for a marker, and each payload's span.

    A candidate may be no payload at all (the pattern can sit inside a string):
    ``_marked_values`` checks that every marker comes back exactly where a payload belongs.
    """
    pieces: list[bytes | memoryview] = []
    spans: _Spans = {}
    pos = 0
    found = _DATA_BIN.search(view)
    while found is not None and len(spans) < _MAX_TENSORS:
        head = found.end() - 1
        start = head + 1 + _BIN_WIDTHS[view[head]]
        end = start + int.from_bytes(view[head + 1 : start], "big")
        if end > view.nbytes:
            break
        marker = _SECRET + len(spans).to_bytes(2, "big")
        pieces += (view[pos:head], _MARKER_HEADER, marker)
        spans[marker] = (start, end - start)
        pos = end
        found = _DATA_BIN.search(view, end)
    pieces.append(view[pos:])
    return b"".join(pieces), spans


def _take(spans: _Spans, value: object) -> tuple[int, int] | None:
    """The span ``value`` marks, once; None when it is no marker or one already taken."""
    return spans.pop(value, None) if type(value) is bytes else None


def _marked_values(view: memoryview) -> dict[str, object] | None:
    """Every field in one msgpack call, tensors on their payloads; None: read field by field.

    msgpack parses a stream left to right, so a marker parsed as the value of a tensor's
    ``data`` key (or of a bytes field) stands exactly where the real bin stood, and the
    real message parses to the same structure with the payload in its place. Markers
    anywhere else (swallowed by a string, lost to a repeated key) or a payload left in
    place make this give up, and so does anything malformed or over ``_MAX_SEGMENT``.
    """
    skeleton, spans = _strip_payloads(view)
    if len(skeleton) > _MAX_SEGMENT:
        return None
    tensor_maps = len(spans)  # one marker per tensor map (scales included) or bytes field
    try:
        values = msgpack.unpackb(skeleton, use_list=False, raw=False, strict_map_key=True)
    except _PARSE_ERRORS:
        return None
    if type(values) is not dict or len(values) != _map_size(skeleton):
        return None  # a repeated field (msgpack keeps the last), or no message at all
    version = values.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        return None  # the field-by-field path reports what it is
    for key in _TENSOR_FIELD_ORDER:
        value = values.get(key, _ABSENT)
        if value is _ABSENT or (type(value) is dict and not value):
            continue  # an empty field is already what it decodes to
        tensors = _marked_tensors(value, spans, view)
        if tensors is None:
            return None
        values[key] = tensors
    for key in _BYTES_FIELD_ORDER:
        if key in values:
            span = _take(spans, values[key])
            if span is None:
                return None
            values[key] = view[span[0] : span[0] + span[1]].tobytes()
            tensor_maps -= 1
    if spans or not _names_dtype_and_shape_once(skeleton, tensor_maps):
        return None
    found: dict[str, object] = values  # str keys or not, pydantic reports what is wrong
    return found


def _names_dtype_and_shape_once(skeleton: bytes, tensor_maps: int) -> bool:
    """Whether the keys ``dtype`` and ``shape`` occur once per tensor map, as encode writes them.

    msgpack keeps the last of a repeated key without a word; a repeated ``data`` or
    ``scale`` loses a marker, but a repeated ``dtype`` or ``shape`` would pass unseen
    (and the field-by-field reader refuses it). Any other count, a repeat or another
    writer's spelling, goes field by field.
    """
    return skeleton.count(b"\xa5dtype") == tensor_maps == skeleton.count(b"\xa5shape")


_ABSENT: Final = object()


def _map_size(skeleton: bytes) -> int:
    """Entries in the map header that ``skeleton`` (which unpacked to a dict) starts with."""
    first = skeleton[0]
    if first <= 0x8F:
        return first & 0x0F
    return int.from_bytes(skeleton[1 : 3 if first == 0xDE else 5], "big")


def _marked_tensors(value: object, spans: _Spans, view: memoryview) -> TensorMap | None:
    if type(value) is not dict or len(value) > _MAX_TENSORS:
        return None
    tensors: TensorMap = {}
    for name, entry in value.items():
        tensor = _marked_tensor(entry, spans, view, allow_scale=True)
        if type(name) is not str or tensor is None:
            return None
        tensors[name] = tensor
    return tensors


def _marked_tensor(
    entry: object, spans: _Spans, view: memoryview, *, allow_scale: bool
) -> torch.Tensor | None:
    if type(entry) is not dict:
        return None
    keys = entry.keys()
    if keys == _TENSOR_KEYS:
        scale = None
    elif allow_scale and keys == _SCALED_KEYS:
        scale = _marked_tensor(entry["scale"], spans, view, allow_scale=False)
        if scale is None:
            return None
    else:
        return None
    span = _take(spans, entry["data"])
    if span is None:
        return None
    try:
        return build(
            entry["dtype"], entry["shape"], view, start=span[0], length=span[1], scale=scale
        )
    except CodecError:
        return None


_TENSOR_KEYS: Final = frozenset({"dtype", "shape", "data"})
_SCALED_KEYS: Final = _TENSOR_KEYS | {"scale"}
_TENSOR_FIELD_ORDER: Final = tuple(sorted(_TENSOR_FIELDS))
_BYTES_FIELD_ORDER: Final = tuple(sorted(_BYTES_FIELDS))


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
        values = _marked_values(view)
        if values is None:  # anything unusual, wrong or foreign: field by field, exactly
            values = _exact_values(view)
    kind = values.get("kind")
    spec = _SPECS_BY_KIND.get(kind) if isinstance(kind, str) else None
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


def _exact_values(view: memoryview) -> dict[str, object]:
    """Every field, read one by one with the cursor; says precisely what is wrong."""
    n, start = _top_map(view)
    cursor = _Cursor(view)
    cursor.seek(start)
    if n > _MAX_FIELDS:
        raise CodecError(f"a message has at most {_MAX_FIELDS} fields, this one has {n}")
    values: dict[str, object] = {}
    _read_fields(cursor, values, n)
    if cursor.pos != view.nbytes:
        raise CodecError(f"{view.nbytes - cursor.pos} bytes of trailing data after the message")
    _check_version(values.get("schema_version"))  # a message without one is refused too
    return values


def _read_fields(cursor: _Cursor, values: dict[str, object], count: int) -> None:
    """Read ``count`` more fields into ``values``, one by one, in whatever order they come."""
    for _ in range(count):
        key = cursor.value()
        if type(key) is not str:
            raise CodecError(f"a field name must be a string, not {type(key).__name__}")
        if key in values:
            raise CodecError(f"field {key!r} appears twice")
        if key in _TENSOR_FIELDS:
            values[key] = _read_tensor_map(cursor, key)
        elif key in _BYTES_FIELDS:
            start, length = cursor.bin_span(f"field {key!r}")
            values[key] = cursor.view[start : start + length].tobytes()
        else:
            values[key] = value = cursor.value()
            if key == "schema_version":
                _check_version(value)


def _check_version(found: object) -> None:
    if type(found) is not int or found != SCHEMA_VERSION:
        raise SchemaVersionError(found, SCHEMA_VERSION)
