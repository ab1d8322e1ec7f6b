"""msgpack with numpy arrays, in the encoding openpi's clients speak.

An array travels as a map with BYTES keys ``__ndarray__`` (True), ``data`` (the C-order bytes),
``dtype`` (``dtype.str``, e.g. ``"<f4"``) and ``shape``; a numpy scalar as ``__npgeneric__``
(True), ``data`` (``item()``) and ``dtype``. Object, void (structured) and complex dtypes are
refused both ways: they are what would let a peer smuggle Python objects in, and no policy
needs them. Nothing is ever unpickled.

Decoding is strict where openpi's reference decoder trusts its peer: the dtype must parse, the
shape must be a list of non-negative ints, and the byte count must match — a malformed map is
a ``WireError`` with a short message, never a numpy exception from deep inside. Decoded arrays
are read-only views of the received frame.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

from flash_rt.errors import InputError

REFUSED_DTYPE_KINDS = ("V", "O", "c")
_NDARRAY = b"__ndarray__"
_NPGENERIC = b"__npgeneric__"
_DATA, _DTYPE, _SHAPE = b"data", b"dtype", b"shape"
_MAX_NDIM = 32  # numpy's own limit is 64; no observation comes close


class WireError(InputError):
    """A frame that is not the msgpack + ndarray encoding openpi's clients send."""


def _check_dtype_kind(dtype: np.dtype) -> None:
    if dtype.kind in REFUSED_DTYPE_KINDS:
        raise WireError(
            f"arrays of dtype {dtype.str!r} (kind {dtype.kind!r}) are refused; send numeric or bool arrays"
        )


def _encode_default(obj):
    if isinstance(obj, np.ndarray):
        _check_dtype_kind(obj.dtype)
        return {_NDARRAY: True, _DATA: np.ascontiguousarray(obj).tobytes(), _DTYPE: obj.dtype.str,
                _SHAPE: list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype_kind(obj.dtype)
        return {_NPGENERIC: True, _DATA: obj.item(), _DTYPE: obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def _parse_dtype(value) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or len(value) > 16:
        raise WireError(f"ndarray dtype must be a short string such as '<f4'; got {_short(value)}")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError, SyntaxError):
        raise WireError(f"ndarray dtype {value!r} is not a numpy dtype") from None
    _check_dtype_kind(dtype)
    return dtype


def _decode_ndarray(obj: dict) -> np.ndarray:
    data, shape = obj.get(_DATA), obj.get(_SHAPE)
    dtype = _parse_dtype(obj.get(_DTYPE))
    if not isinstance(data, bytes):
        raise WireError(f"ndarray data must be bytes; got {type(data).__name__}")
    if (not isinstance(shape, (list, tuple)) or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape)):
        raise WireError(f"ndarray shape must be a list of non-negative ints; got {_short(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(
            f"ndarray of shape {tuple(shape)} and dtype {dtype.str} needs {expected} bytes; got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decode_npgeneric(obj: dict):
    dtype = _parse_dtype(obj.get(_DTYPE))
    try:
        return dtype.type(obj.get(_DATA))
    except (TypeError, ValueError, OverflowError):
        raise WireError(f"numpy scalar data does not fit dtype {dtype.str}") from None


def _decode_hook(obj: dict):
    if _NDARRAY in obj:
        return _decode_ndarray(obj)
    if _NPGENERIC in obj:
        return _decode_npgeneric(obj)
    return obj


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def packb(obj) -> bytes:
    """Encode ``obj`` (dicts, lists, str, numbers, numpy arrays and scalars)."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def unpackb(data: bytes):
    """Decode one frame. Anything that is not valid msgpack in openpi's encoding raises
    ``WireError``; msgpack extension types come back as inert ``ExtType`` values."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a binary msgpack frame; got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False, strict_map_key=True)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # ExtraData, FormatError, StackError, invalid UTF-8 and map-key errors all land here.
        raise WireError(f"frame is not valid msgpack ({type(exc).__name__})") from None
