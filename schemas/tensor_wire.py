"""Tensors on the wire, without msgpack: dtype whitelist, raw bytes out, checked tensors in.

``schemas.codec`` frames these pieces as msgpack ``{dtype, shape, data}`` maps; this module
owns everything about the tensor itself, so the framing stays one job:

- ``pack`` applies compression (fp16, bf16, int8 per-row absmax) and exposes a tensor's
  bytes as a memoryview, copying only when the tensor is not already contiguous on the CPU.
- ``build`` makes a tensor over received bytes with ``torch.frombuffer`` (no copy) after
  every check the wire contract makes: whitelisted dtype, sane shape, and
  shape x itemsize equal to the byte count.
- ``tensor_to_wire`` / ``tensor_from_wire``: the same map as plain Python objects, the
  simple reference path that the codec's bytes must match.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Final, Literal, NamedTuple

import torch

from schemas.errors import CodecError

Compression = Literal["none", "fp16", "bf16", "int8"]
"""How floating tensors are packed: as they are, cast to half precision, or int8 per row."""

DTYPES: Final[dict[str, torch.dtype]] = {
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
"""The dtypes that may travel, by their wire name."""
_DTYPE_NAMES: Final[dict[torch.dtype, str]] = {dtype: name for name, dtype in DTYPES.items()}
_NUMPY_DTYPE_NAMES: Final = {d: n for d, n in _DTYPE_NAMES.items() if d is not torch.bfloat16}
"""The dtypes whose bytes ``Tensor.numpy`` exposes as they are (numpy has no bfloat16)."""

MAX_NDIM: Final = 64
"""Dimensions a tensor may have."""
_MAX_DIM: Final = 2**62


class Packed(NamedTuple):
    """A tensor ready for the wire: dtype name, shape, its raw bytes, and an int8 scale."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    scale: Packed | None = None


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


def int8_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of the per-row view: dim 0 by the rest; a 0-d or 1-d tensor is one row."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _quantise_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: ``q = round(x / s)``, ``s = max|row| / 127``.

    A row holding NaN or inf gets a non-finite scale, so it decodes non-finite again and
    the receiver's finiteness check still sees it.
    """
    rows, cols = int8_rows(tuple(t.shape))
    x = t.detach().cpu().to(torch.float32).reshape(rows, cols)
    if cols == 0:
        return x.to(torch.int8), torch.zeros(rows, dtype=torch.float32)
    scale = x.abs().amax(dim=1) / 127.0
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.nan_to_num((x / divisor[:, None]).round_(), nan=0.0).clamp_(-127, 127)
    return q.to(torch.int8), scale


def pack(t: torch.Tensor, compression: Compression) -> Packed:
    """Apply ``compression`` (floating tensors only) and expose the tensor's bytes."""
    try:
        if compression == "none" and t.is_contiguous():  # the common case, in few calls
            name = _NUMPY_DTYPE_NAMES.get(t.dtype)
            if name is not None:
                try:  # torch.Size is a tuple of ints already
                    return Packed(name, t.shape, t.numpy().data)
                except (RuntimeError, TypeError):  # needs grad, not on the CPU, negated
                    pass
        return _pack_dense(t, compression)
    except RuntimeError as exc:  # sparse, meta or otherwise unusual tensors
        raise CodecError(f"a {t.layout} tensor on {t.device} cannot travel: {exc}") from exc


def _pack_dense(t: torch.Tensor, compression: Compression) -> Packed:
    if compression != "none" and t.is_floating_point():
        if compression == "fp16":
            t = t.to(torch.float16)
        elif compression == "bf16":
            t = t.to(torch.bfloat16)
        elif compression == "int8":
            q, s = _quantise_int8(t)
            scale = Packed("float32", tuple(s.shape), _raw_view(s))
            return Packed("int8", tuple(t.shape), _raw_view(q), scale)
        else:
            raise CodecError(f"unknown compression {compression!r}")
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise CodecError(f"dtype {t.dtype} cannot travel; allowed: {', '.join(DTYPES)}")
    return Packed(name, tuple(t.shape), _raw_view(t))


@contextlib.contextmanager
def _ignore_readonly_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given buffer is not writable", category=UserWarning
        )
        yield


def _spend_readonly_warning() -> None:
    """Make torch spend, silenced, its once-per-process warning about read-only buffers.

    Tensors decoded from ``bytes`` share its memory (that is the point: no copy), and the
    codec's docstring tells callers to clone before writing, so the warning says nothing
    they need. Spent here, at import, it costs decode nothing later.
    """
    with _ignore_readonly_warning():
        torch.frombuffer(b"\0", dtype=torch.uint8)


_spend_readonly_warning()


def allow_readonly(readonly: bool) -> contextlib.AbstractContextManager[None]:
    """Silence torch's warning about tensors on a read-only buffer, and only that one.

    Needed only while ``torch.set_warn_always`` is on: torch then repeats the warning every
    time. ``warnings.catch_warnings`` is process-wide state, which is why the filter names
    this one message only.
    """
    if readonly and torch.is_warn_always_enabled():
        return _ignore_readonly_warning()
    return _NO_FILTER


_NO_FILTER: Final = contextlib.nullcontext()


def _check_layout(dtype_name: object, shape: object) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The dtype, dims and element count of a wire dtype name and shape, once checked."""
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CodecError(f"dtype {dtype_name!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise CodecError(f"a tensor shape is a list of at most {MAX_NDIM} sizes, not {shape!r}")
    dims = tuple(shape)
    for dim in dims:
        if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
            raise CodecError(f"tensor shape {list(dims)} holds something that is not a size")
    return dtype, dims, math.prod(dims)


@functools.lru_cache(maxsize=4096)
def _cached_layout(
    dtype_name: str, shape: tuple[int, ...]
) -> tuple[torch.dtype, tuple[int, ...], int]:
    """``_check_layout`` of the layouts seen lately; an adapter's never change.

    Errors are not cached. The shape must hold ints only: ``True == 1`` would find the
    layout of a shape it is not.
    """
    return _check_layout(dtype_name, shape)


def build(
    dtype_name: str, shape: tuple[int, ...], data: memoryview, *, scale: torch.Tensor | None
) -> torch.Tensor:
    """A tensor over all of ``data``, after every check the wire contract makes.

    ``shape`` holds ints only, as the codec's typed decoding delivers it.
    """
    dtype, dims, numel = _cached_layout(dtype_name, shape)
    if numel * dtype.itemsize != data.nbytes:
        raise CodecError(
            f"a {dtype_name} tensor of shape {list(dims)} needs "
            f"{numel * dtype.itemsize} bytes, its data holds {data.nbytes}"
        )
    if numel == 0:
        tensor = torch.empty(dims, dtype=dtype)
    else:
        tensor = torch.frombuffer(data, dtype=dtype)
        if len(dims) != 1:
            tensor = tensor.reshape(dims)
    if dtype is torch.bool and numel and bool((tensor.view(torch.uint8) > 1).any()):
        raise CodecError("a bool tensor holds bytes other than 0 and 1")
    if scale is None:
        return tensor
    if dtype is not torch.int8:
        raise CodecError(f"only int8 tensors carry a scale, not {dtype_name}")
    rows, cols = int8_rows(dims)
    if scale.dtype is not torch.float32 or tuple(scale.shape) != (rows,):
        raise CodecError(f"an int8 scale must be float32 of shape [{rows}]")
    return (tensor.reshape(rows, cols).to(torch.float32) * scale[:, None]).reshape(dims)


def tensor_to_wire(t: torch.Tensor, *, compression: Compression = "none") -> dict[str, object]:
    """The wire map of one tensor, as plain Python objects (``data`` is a ``bytes`` copy).

    This is the simple reference path; ``schemas.codec.encode`` writes the same bytes
    without the copy.
    """
    return _packed_to_dict(pack(t, compression))


def _packed_to_dict(packed: Packed) -> dict[str, object]:
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
    dtype_name, shape = obj["dtype"], obj["shape"]
    _check_layout(dtype_name, shape)  # what build's cache must not be handed
    return build(dtype_name, tuple(shape), memoryview(bytearray(data)), scale=scale)
