"""The field-by-field reader: exact errors for anything the one-call path gives up on.

A cursor walks the message with msgpack's own parser over a small window, reading bin
headers by hand so tensor payloads are skipped, never copied. Slower than the one-call path
(``schemas.codec._marked``), it is the reference: any writer's layout, and a precise reason
for every malformed message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

import msgpack
import torch

from schemas.codec._layout import (
    BIN_WIDTHS,
    BYTES_FIELDS,
    MAP_WIDTHS,
    MAX_FIELDS,
    MAX_SEGMENT,
    MAX_TENSORS,
    PARSE_ERRORS,
    TENSOR_FIELDS,
    check_version,
)
from schemas.errors import CodecError
from schemas.messages import TensorMap
from schemas.tensor_wire import build

_T = TypeVar("_T")
_WINDOW: Final = 4096
"""Bytes first handed to msgpack's parser; grown when a value runs past it."""


def _parser() -> msgpack.Unpacker:
    return msgpack.Unpacker(
        use_list=False,
        raw=False,
        strict_map_key=True,
        read_size=_WINDOW,
        max_buffer_size=MAX_SEGMENT,
    )


class _Cursor:
    """Reads msgpack from one buffer with msgpack's own parser, skipping bin payloads.

    The parser sees a small window of the buffer, refilled when a value runs past it (at
    most ``MAX_SEGMENT`` bytes between two tensors); ``bin_span`` reads a bin header by
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
                        f"more than {MAX_SEGMENT} bytes of msgpack between two tensors"
                    ) from exc
                self.fed = more
            except PARSE_ERRORS as exc:
                raise CodecError(f"malformed msgpack: {exc}") from exc

    def value(self) -> object:
        """The next object (never a tensor payload: those go through ``bin_span``)."""
        parser = self.unpacker
        if parser is not None:
            try:  # the common case, inlined: the object lies inside the window
                return parser.unpack()
            except msgpack.OutOfData:
                pass  # _read feeds more and resumes
            except PARSE_ERRORS as exc:
                raise CodecError(f"malformed msgpack: {exc}") from exc
        return self._read(msgpack.Unpacker.unpack)

    def map_header(self, what: str) -> int:
        parser = self.unpacker
        if parser is not None:
            try:  # the common case, inlined as in ``value``
                found: int = parser.read_map_header()
            except (msgpack.OutOfData, *PARSE_ERRORS):
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
        width = BIN_WIDTHS.get(first)
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
    if n > MAX_TENSORS:
        raise CodecError(f"field {field!r} holds {n} tensors, more than {MAX_TENSORS}")
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
    width = 0 if 0x80 <= first <= 0x8F else MAP_WIDTHS.get(first)
    if width is None:
        raise CodecError("a message must be a map")
    if view.nbytes < 1 + width:
        raise CodecError("truncated message")
    return first & 0x0F if width == 0 else int.from_bytes(view[1 : 1 + width], "big"), 1 + width


def exact_values(view: memoryview) -> dict[str, object]:
    """Every field, read one by one with the cursor; says precisely what is wrong."""
    n, start = _top_map(view)
    cursor = _Cursor(view)
    cursor.seek(start)
    if n > MAX_FIELDS:
        raise CodecError(f"a message has at most {MAX_FIELDS} fields, this one has {n}")
    values: dict[str, object] = {}
    _read_fields(cursor, values, n)
    if cursor.pos != view.nbytes:
        raise CodecError(f"{view.nbytes - cursor.pos} bytes of trailing data after the message")
    check_version(values.get("schema_version"))  # a message without one is refused too
    return values


def _read_fields(cursor: _Cursor, values: dict[str, object], count: int) -> None:
    """Read ``count`` more fields into ``values``, one by one, in whatever order they come."""
    for _ in range(count):
        key = cursor.value()
        if type(key) is not str:
            raise CodecError(f"a field name must be a string, not {type(key).__name__}")
        if key in values:
            raise CodecError(f"field {key!r} appears twice")
        if key in TENSOR_FIELDS:
            values[key] = _read_tensor_map(cursor, key)
        elif key in BYTES_FIELDS:
            start, length = cursor.bin_span(f"field {key!r}")
            values[key] = cursor.view[start : start + length].tobytes()
        else:
            values[key] = value = cursor.value()
            if key == "schema_version":
                check_version(value)
