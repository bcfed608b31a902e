"""The msgpack wire codec: messages to bytes and back, tensors without extra copies.

A message is one plain msgpack map of ``kind``, ``schema_version`` and every field; a tensor
is ``{"dtype", "shape", "data": bin}``, plus ``"scale"`` (per-row absmax) when int8, which
decodes back to float32 so receivers never need to know how a sender compressed.

Speed comes from never letting msgpack copy tensor bytes:

- ``encode`` packs small fields with ``msgpack.packb``, writes map/bin headers around each
  tensor itself and joins them with the raw buffers once: exactly ``msgpack.packb``'s bytes.
- ``decode`` lets msgpack parse all but ``bin`` payloads; at each tensor's ``data`` it reads
  the bin header itself and calls ``torch.frombuffer`` on the received buffer: no copy.

Decoded tensors share the buffer handed to ``decode``: clone before mutating either.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeVar, cast

import msgpack
import torch
from pydantic import ValidationError

from schemas.errors import CodecError, PayloadTooLarge, SchemaVersionError
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION, AnyMessage, Message, TensorMap

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""Largest payload ``decode`` accepts unless told otherwise (after chunk reassembly)."""

Compression = Literal["none", "fp16", "bf16", "int8"]
"""How floating tensors are packed: as they are, cast to half precision, or int8 per row."""

_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_DTYPE_NAMES: Final[dict[torch.dtype, str]] = {dtype: name for name, dtype in _DTYPES.items()}

_MAX_NDIM: Final = 64
_MAX_DIM: Final = 2**62
_MAX_TENSORS: Final = 65_536
"""Tensors one field may hold; bounds the work a hostile payload can cause."""
_MAX_SEGMENT: Final = 1024 * 1024
"""Bytes of msgpack (outside bin payloads) read between two tensors; bounds memory too."""
_WINDOW: Final = 4096
"""Bytes first handed to msgpack's parser; grown when a value runs past it."""


# --------------------------------------------------------------------------- message specs


@dataclass(frozen=True, slots=True)
class _Spec:
    """How one message class travels: which fields hold tensors or raw bytes."""

    cls: type[Message]
    field_names: frozenset[str]
    tensor_fields: frozenset[str]
    bytes_fields: frozenset[str]


def _spec_for(cls: type[Message]) -> _Spec:
    fields = cls.model_fields.items()
    return _Spec(
        cls=cls,
        field_names=frozenset(cls.model_fields),
        tensor_fields=frozenset(n for n, f in fields if f.annotation == TensorMap),
        bytes_fields=frozenset(n for n, f in fields if f.annotation is bytes),
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


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True, slots=True)
class _Packed:
    """A tensor ready for the wire: dtype name, shape, its raw bytes, and an int8 scale."""

    dtype: str
    shape: list[int]
    data: memoryview
    scale: _Packed | None = None


def _raw_view(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor, without copying when it is already contiguous on the CPU.

    bfloat16, which numpy lacks, travels through an int16 view of the same bits.
    """
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.is_neg():
        t = t.resolve_neg()
    if t.dtype is torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().data


def _int8_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of the per-row view: dim 0 by the rest; a 0-d or 1-d tensor is one row."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _quantise_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: ``q = round(x / s)``, ``s = max|row| / 127``.

    A row holding NaN or inf gets a non-finite scale, so it decodes non-finite again and
    the receiver's finiteness check still sees it.
    """
    rows, cols = _int8_rows(tuple(t.shape))
    x = t.detach().cpu().to(torch.float32).reshape(rows, cols)
    if cols == 0:
        return x.to(torch.int8), torch.zeros(rows, dtype=torch.float32)
    scale = x.abs().amax(dim=1) / 127.0
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.nan_to_num((x / divisor[:, None]).round_(), nan=0.0).clamp_(-127, 127)
    return q.to(torch.int8), scale


def _pack(t: torch.Tensor, compression: Compression) -> _Packed:
    """Apply ``compression`` (floating tensors only) and expose the tensor's bytes."""
    try:
        return _pack_dense(t, compression)
    except RuntimeError as exc:  # sparse, meta or otherwise unusual tensors
        raise CodecError(f"a {t.layout} tensor on {t.device} cannot travel: {exc}") from exc


def _pack_dense(t: torch.Tensor, compression: Compression) -> _Packed:
    if compression != "none" and t.is_floating_point():
        if compression == "fp16":
            t = t.to(torch.float16)
        elif compression == "bf16":
            t = t.to(torch.bfloat16)
        elif compression == "int8":
            q, s = _quantise_int8(t)
            scale = _Packed("float32", list(s.shape), _raw_view(s))
            return _Packed("int8", list(t.shape), _raw_view(q), scale)
        else:
            raise CodecError(f"unknown compression {compression!r}")
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise CodecError(f"dtype {t.dtype} cannot travel; allowed: {', '.join(_DTYPES)}")
    return _Packed(name, list(t.shape), _raw_view(t))


class _ReadonlyWarning:
    """Whether torch has spent its once-per-process warning about read-only buffers."""

    spent = False


@contextlib.contextmanager
def _ignore_readonly_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given buffer is not writable", category=UserWarning
        )
        yield


def _allow_readonly(readonly: bool) -> contextlib.AbstractContextManager[None]:
    """Silence torch's warning about tensors on a read-only buffer, and only that one.

    Tensors decoded from ``bytes`` share its memory (that is the point: no copy); torch
    warns once per process that it cannot mark them read-only, and the module docstring
    tells callers to clone before writing. Once torch has spent that warning inside this
    filter, later decodes skip the filter (a few microseconds) unless
    ``torch.set_warn_always`` is on. ``warnings.catch_warnings`` is process-wide state,
    which is why the filter names this one message only.
    """
    if not readonly or (_ReadonlyWarning.spent and not torch.is_warn_always_enabled()):
        return contextlib.nullcontext()
    return _ignore_readonly_warning()


def _build(
    dtype_name: object,
    shape: object,
    buf: memoryview,
    *,
    start: int,
    length: int,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """A tensor on ``buf[start:start + length]``, after every check the wire contract makes."""
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CodecError(f"dtype {dtype_name!r} is not allowed; allowed: {', '.join(_DTYPES)}")
    if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_NDIM:
        raise CodecError(f"a tensor shape is a list of at most {_MAX_NDIM} sizes, not {shape!r}")
    dims = tuple(shape)
    for dim in dims:
        if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
            raise CodecError(f"tensor shape {list(dims)} holds something that is not a size")
    numel = math.prod(dims)
    if numel * dtype.itemsize != length:
        raise CodecError(
            f"a {dtype_name} tensor of shape {list(dims)} needs "
            f"{numel * dtype.itemsize} bytes, its data holds {length}"
        )
    if numel == 0:
        tensor = torch.empty(dims, dtype=dtype)
    else:
        tensor = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start)
        if len(dims) != 1:
            tensor = tensor.reshape(dims)
        if buf.readonly:
            # Only decode passes read-only buffers, inside _allow_readonly: torch has now
            # spent its warning, so later decodes may skip the filter.
            _ReadonlyWarning.spent = True
    if dtype is torch.bool and numel and bool((tensor.view(torch.uint8) > 1).any()):
        raise CodecError("a bool tensor holds bytes other than 0 and 1")
    if scale is None:
        return tensor
    if dtype is not torch.int8:
        raise CodecError(f"only int8 tensors carry a scale, not {dtype_name}")
    rows, cols = _int8_rows(dims)
    if scale.dtype is not torch.float32 or tuple(scale.shape) != (rows,):
        raise CodecError(f"an int8 scale must be float32 of shape [{rows}]")
    return (tensor.reshape(rows, cols).to(torch.float32) * scale[:, None]).reshape(dims)


def tensor_to_wire(t: torch.Tensor, *, compression: Compression = "none") -> dict[str, object]:
    """The wire map of one tensor, as plain Python objects (``data`` is a ``bytes`` copy).

    This is the simple reference path; ``encode`` writes the same bytes without the copy.
    """
    return _packed_to_dict(_pack(t, compression))


def _packed_to_dict(packed: _Packed) -> dict[str, object]:
    wire: dict[str, object] = {
        "dtype": packed.dtype,
        "shape": list(packed.shape),
        "data": packed.data.tobytes(),
    }
    if packed.scale is not None:
        wire["scale"] = _packed_to_dict(packed.scale)
    return wire


def tensor_from_wire(obj: object) -> torch.Tensor:
    """A tensor from its wire map (as ``msgpack.unpackb`` returns it); raises ``CodecError``.

    The tensor owns a private copy of the data, so it is writable and outlives ``obj``.
    """
    return _tensor_from_dict(obj, allow_scale=True)


def _tensor_from_dict(obj: object, *, allow_scale: bool) -> torch.Tensor:
    if not isinstance(obj, Mapping):
        raise CodecError(f"a tensor must be a map, not {type(obj).__name__}")
    keys = set(obj)
    allowed = ({"dtype", "shape", "data"}, {"dtype", "shape", "data", "scale"})
    if keys not in allowed[: 2 if allow_scale else 1]:
        raise CodecError(f"a tensor map has keys dtype, shape, data (and scale), not {keys}")
    data = obj["data"]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"tensor data must be bin, not {type(data).__name__}")
    scale = _tensor_from_dict(obj["scale"], allow_scale=False) if "scale" in keys else None
    buf = memoryview(bytearray(data))
    return _build(obj["dtype"], obj["shape"], buf, start=0, length=buf.nbytes, scale=scale)


# --------------------------------------------------------------------------- encoding


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


def _tensor_head(dtype_name: str, *, scaled: bool) -> bytes:
    """Everything of a tensor map up to its shape value, which is all fixed per dtype."""
    keys: bytes = msgpack.packb(["dtype", dtype_name, "shape"])[1:]  # the array's items
    return _map_header(4 if scaled else 3) + keys


_TENSOR_HEADS: Final[dict[tuple[str, bool], bytes]] = {
    (name, scaled): _tensor_head(name, scaled=scaled)
    for name in _DTYPES
    for scaled in (False, True)
}
_DATA_KEY: Final[bytes] = msgpack.packb("data")
_SCALE_KEY: Final[bytes] = msgpack.packb("scale")

_Piece = bytes | memoryview


def _append_tensor(pieces: list[_Piece], packed: _Packed) -> None:
    pieces += (
        _TENSOR_HEADS[packed.dtype, packed.scale is not None],
        msgpack.packb(packed.shape),
        _DATA_KEY,
        _bin_header(packed.data.nbytes),
        packed.data,
    )
    if packed.scale is not None:
        pieces.append(_SCALE_KEY)
        _append_tensor(pieces, packed.scale)


def _header_length(first: int) -> int:
    """Length of the map header that starts with byte ``first`` (as packb writes them)."""
    return 1 if first <= 0x8F else 3 if first == 0xDE else 5


def encode(message: Message, *, compression: Compression = "none") -> bytes:
    """One message as plain msgpack bytes; tensor bytes are copied once, into the result.

    ``compression`` applies to the floating tensors of every tensor field. Raises
    ``CodecError`` for a tensor that cannot travel (dtype outside the whitelist) or a
    value msgpack cannot hold (an int beyond 64 bits).
    """
    spec = _SPECS_BY_TYPE.get(type(message))
    if spec is None:
        raise CodecError(f"{type(message).__name__} is not a wire message")
    special = spec.tensor_fields | spec.bytes_fields
    try:
        plain = msgpack.packb(message.model_dump(exclude=set(special)))
        pieces: list[_Piece] = [
            _map_header(len(spec.field_names)),
            memoryview(plain)[_header_length(plain[0]) :],
        ]
        for name in spec.tensor_fields:
            tensors: TensorMap = getattr(message, name)
            pieces += (msgpack.packb(name), _map_header(len(tensors)))
            for tensor_name, tensor in tensors.items():
                pieces.append(msgpack.packb(tensor_name))
                _append_tensor(pieces, _pack(tensor, compression))
        for name in spec.bytes_fields:
            raw: bytes = getattr(message, name)
            pieces += (msgpack.packb(name), _bin_header(len(raw)), raw)
        return b"".join(pieces)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"a {type(message).__name__} cannot be packed: {exc}") from exc


# --------------------------------------------------------------------------- decoding

_T = TypeVar("_T")
_BIN_WIDTHS: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
"""bin8, bin16, bin32: the width of their length field."""


class _Cursor:
    """Reads msgpack from one buffer with msgpack's own parser, skipping bin payloads.

    The parser sees a small window of the buffer, refilled when a value runs past it (at
    most ``_MAX_SEGMENT`` bytes between two tensors); ``bin_span`` reads a bin header by
    hand and moves past the payload without the parser ever copying it.
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
            parser = self.unpacker = msgpack.Unpacker(
                use_list=False,
                raw=False,
                strict_map_key=True,
                read_size=_WINDOW,
                max_buffer_size=_MAX_SEGMENT,
            )
            self.fed = min(self.size, self.base + _WINDOW)
            parser.feed(self.view[self.base : self.fed])
        return parser

    @property
    def pos(self) -> int:
        """Offset in the buffer of the next unread object."""
        if self.unpacker is None:
            return self.base
        return self.base + cast("int", self.unpacker.tell())

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
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise CodecError(f"malformed msgpack: {exc}") from exc

    def value(self) -> object:
        """The next object (never a tensor payload: those go through ``bin_span``)."""
        parser = self.unpacker
        if parser is not None:
            try:  # the common case, inlined: the object lies inside the window
                return parser.unpack()
            except msgpack.OutOfData:
                pass  # _read feeds more and resumes
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise CodecError(f"malformed msgpack: {exc}") from exc
        return self._read(msgpack.Unpacker.unpack)

    def string(self, what: str) -> str:
        value = self.value()
        if not isinstance(value, str):
            raise CodecError(f"{what} must be a string, not {type(value).__name__}")
        return value

    def map_header(self, what: str) -> int:
        try:
            n: int = self._read(msgpack.Unpacker.read_map_header)
        except CodecError as exc:
            raise CodecError(f"{what} must be a map: {exc}") from exc
        return n

    def bin_span(self, what: str) -> tuple[int, int]:
        """``(start, length)`` of the bin at the cursor, which then moves past it."""
        pos = self.pos
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
    if n not in (3, 4 if allow_scale else 3):
        raise CodecError("a tensor map has keys dtype, shape, data (and scale)")
    dtype: object = None
    shape: object = None
    span: tuple[int, int] | None = None
    scale: torch.Tensor | None = None
    for _ in range(n):
        key = cursor.value()
        if key == "data" and span is None:
            span = cursor.bin_span("tensor data")
        elif key == "dtype" and dtype is None:
            dtype = cursor.value()
        elif key == "shape" and shape is None:
            shape = cursor.value()
        elif key == "scale" and allow_scale and scale is None:
            scale = _read_tensor(cursor, allow_scale=False)
        else:
            raise CodecError(f"tensor key {key!r} is unexpected or repeated")
    if span is None or (n == 4 and scale is None):
        raise CodecError("a tensor map has keys dtype, shape, data (and scale)")
    start, length = span
    return _build(dtype, shape, cursor.view, start=start, length=length, scale=scale)


def _read_tensor_map(cursor: _Cursor, field: str) -> TensorMap:
    n = cursor.map_header(f"field {field!r}")
    if n > _MAX_TENSORS:
        raise CodecError(f"field {field!r} holds {n} tensors, more than {_MAX_TENSORS}")
    tensors: TensorMap = {}
    for _ in range(n):
        name = cursor.string(f"a tensor name in {field!r}")
        if name in tensors:
            raise CodecError(f"field {field!r} repeats tensor {name!r}")
        try:
            tensors[name] = _read_tensor(cursor, allow_scale=True)
        except CodecError as exc:
            raise CodecError(f"tensor {name!r} of field {field!r}: {exc}") from exc
    return tensors


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except TypeError as exc:
        raise CodecError(f"cannot read a {type(data).__name__} as bytes: {exc}") from exc
    return view


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
    cursor = _Cursor(view)
    n = cursor.map_header("a message")
    if n > _MAX_FIELDS:
        raise CodecError(f"a message has at most {_MAX_FIELDS} fields, this one has {n}")
    values: dict[str, object] = {}
    for _ in range(n):
        key = cursor.string("a field name")
        if key in values:
            raise CodecError(f"field {key!r} appears twice")
        if key in _TENSOR_FIELDS:
            with _allow_readonly(view.readonly):
                values[key] = _read_tensor_map(cursor, key)
        elif key in _BYTES_FIELDS:
            start, length = cursor.bin_span(f"field {key!r}")
            values[key] = view[start : start + length].tobytes()
        else:
            values[key] = value = cursor.value()
            if key == "schema_version":  # before anything else can fail on a new format
                _check_version(value)
    if cursor.pos != view.nbytes:
        raise CodecError(f"{view.nbytes - cursor.pos} bytes of trailing data after the message")
    _check_version(values.get("schema_version"))
    kind = values.get("kind")
    spec = _SPECS_BY_KIND.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise CodecError(f"unknown message kind {kind!r}")
    unknown = values.keys() - spec.field_names
    if unknown:
        raise CodecError(f"a {kind} message has unknown fields {sorted(unknown)}")
    try:
        message = spec.cls.model_validate(values, strict=True)
    except ValidationError as exc:
        raise CodecError(f"invalid {kind} message: {exc}") from exc
    return cast("AnyMessage", message)


def _check_version(found: object) -> None:
    if type(found) is not int or found != SCHEMA_VERSION:
        raise SchemaVersionError(found, SCHEMA_VERSION)
