"""The one-call path: a whole message parsed by one ``msgpack.unpackb``, tensors in place.

The tensor payloads are cut out first (each ``"data"`` bin swapped for a marker holding a
per-process secret), so msgpack never copies them; each marker found where a tensor's data
belongs becomes ``torch.frombuffer`` over the received buffer. Anything unusual makes
``marked_values`` give up, and the field-by-field reader (``schemas.codec._reader``) says
exactly what is wrong.
"""

from __future__ import annotations

import os
import re
from typing import Final

import msgpack
import torch

from schemas.codec._layout import (
    BIN_WIDTHS,
    BYTES_FIELDS,
    MAX_SEGMENT,
    MAX_TENSORS,
    PARSE_ERRORS,
    TENSOR_FIELDS,
)
from schemas.errors import CodecError
from schemas.messages import SCHEMA_VERSION, TensorMap
from schemas.tensor_wire import build

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
    ``marked_values`` checks that every marker comes back exactly where a payload belongs.
    """
    pieces: list[bytes | memoryview] = []
    spans: _Spans = {}
    pos = 0
    found = _DATA_BIN.search(view)
    while found is not None and len(spans) < MAX_TENSORS:
        head = found.end() - 1
        start = head + 1 + BIN_WIDTHS[view[head]]
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


def marked_values(view: memoryview) -> dict[str, object] | None:
    """Every field in one msgpack call, tensors on their payloads; None: read field by field.

    msgpack parses a stream left to right, so a marker parsed as the value of a tensor's
    ``data`` key (or of a bytes field) stands exactly where the real bin stood, and the
    real message parses to the same structure with the payload in its place. Markers
    anywhere else (swallowed by a string, lost to a repeated key) or a payload left in
    place make this give up, and so does anything malformed or over ``MAX_SEGMENT``.
    """
    skeleton, spans = _strip_payloads(view)
    if len(skeleton) > MAX_SEGMENT:
        return None
    tensor_maps = len(spans)  # one marker per tensor map (scales included) or bytes field
    try:
        values = msgpack.unpackb(skeleton, use_list=False, raw=False, strict_map_key=True)
    except PARSE_ERRORS:
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
    if type(value) is not dict or len(value) > MAX_TENSORS:
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
_TENSOR_FIELD_ORDER: Final = tuple(sorted(TENSOR_FIELDS))
_BYTES_FIELD_ORDER: Final = tuple(sorted(BYTES_FIELDS))
