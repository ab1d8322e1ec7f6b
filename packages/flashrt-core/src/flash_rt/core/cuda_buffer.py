"""Device memory without torch: CudaBuffer (cudaMalloc) and PinnedHostBuffer (cudaHostAlloc).

Pipelines keep their static buffers here and hand raw pointers to the kernels; torch and jax
frontends share them. cuda-python's ``cuda.bindings.runtime`` is imported on first use, so
importing this module initialises nothing. With torch, ``CudaBuffer.from_torch(t)`` wraps a
tensor's memory and ``buf.torch()`` gives a zero-copy tensor view.

dtypes: any numpy dtype, plus ``"bfloat16"`` and ``"float8_e4m3"`` (e4m3fn) by name. numpy has no
such types, so host copies of them are raw bits (uint16 / uint8) or, in ``to_numpy()``, decoded
to float32; ``from_numpy`` encodes float arrays (round to nearest even; fp8 saturates at +-448).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from dataclasses import dataclass

import numpy as np

from flash_rt.errors import ConfigError, HardwareError, InputError

# -- dtypes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DType:
    """A device element type: its name, size, the numpy type that stores its bits on the host,
    and the torch dtype attribute name."""

    name: str
    itemsize: int
    storage: str  # numpy dtype of the host-side bits
    torch_name: str
    native: bool  # numpy has the type itself (values, not just bits)

    @property
    def numpy_storage(self) -> np.dtype:
        return np.dtype(self.storage)


_NATIVE = ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
           "uint64", "uint32", "uint16", "uint8", "bool")
_DTYPES = {name: DType(name, np.dtype(name).itemsize, name, name, True) for name in _NATIVE}
_DTYPES["bfloat16"] = DType("bfloat16", 2, "uint16", "bfloat16", False)
_DTYPES["float8_e4m3"] = DType("float8_e4m3", 1, "uint8", "float8_e4m3fn", False)
_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "fp8": "float8_e4m3",
    "e4m3": "float8_e4m3",
    "fp8_e4m3": "float8_e4m3",
    "float8_e4m3fn": "float8_e4m3",
    "bool_": "bool",
}


def resolve_dtype(dtype) -> DType:
    """A DType from a name, a numpy dtype/type, a torch dtype or a DType."""
    if isinstance(dtype, DType):
        return dtype
    name = None
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
    elif type(dtype).__module__ == "torch":  # torch.dtype, without importing torch
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name  # also ml_dtypes' bfloat16 / float8_e4m3fn
        except TypeError:
            pass
    if name is not None:
        name = _ALIASES.get(name, name)
        if name in _DTYPES:
            return _DTYPES[name]
    raise ConfigError(f"unsupported CudaBuffer dtype {dtype!r}; expected one of {', '.join(_DTYPES)} (or a numpy/torch dtype)")


def _bf16_encode(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaN a (quiet) NaN; rounding could carry it into Inf
        rounded[nan] = ((bits[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x7FC0))
    return rounded


def _bf16_decode(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _fp8_e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (no Inf; 0x7F/0xFF are NaN)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    values = np.where(exponent == 0, mantissa / 8.0 * 2.0**-6, (1 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
    values = sign * values
    values[(exponent == 0xF) & (mantissa == 0x7)] = np.nan
    return values.astype(np.float32)


_FP8_VALUES = _fp8_e4m3_values()
_FP8_POSITIVE = _FP8_VALUES[:0x7F]  # codes 0..126, ascending, max 448


def _fp8_encode(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float32)
    mag = np.minimum(np.abs(x), _FP8_POSITIVE[-1])  # saturate (Inf too), like torch
    hi = np.clip(np.searchsorted(_FP8_POSITIVE, mag, side="left"), 0, len(_FP8_POSITIVE) - 1)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = mag - _FP8_POSITIVE[lo], _FP8_POSITIVE[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))  # ties to the even code
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code |= np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))
    code[np.isnan(x)] = 0x7F
    return code


def host_encode(array, dtype) -> np.ndarray:
    """Host bits (contiguous, the DType's storage type) of ``array`` as ``dtype``.

    For bfloat16 / float8_e4m3, integer arrays of the storage width are taken as raw bits and
    float arrays are converted."""
    dt = resolve_dtype(dtype)
    arr = np.asarray(array)
    if dt.native:
        return np.ascontiguousarray(arr, dtype=dt.storage)
    if arr.dtype.name in (dt.name, dt.torch_name) and arr.dtype.itemsize == dt.itemsize:
        return np.ascontiguousarray(arr).view(dt.storage)  # ml_dtypes arrays: already the bits
    if arr.dtype == dt.numpy_storage:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind not in "fiub":
        raise InputError(f"cannot encode a {arr.dtype} array as {dt.name}")
    encode = _bf16_encode if dt.name == "bfloat16" else _fp8_encode
    return encode(arr.astype(np.float32))


def host_decode(bits: np.ndarray, dtype) -> np.ndarray:
    """Values of host bits: the array itself for numpy dtypes, float32 for bfloat16 / fp8."""
    dt = resolve_dtype(dtype)
    if dt.native:
        return bits
    if dt.name == "bfloat16":
        return _bf16_decode(bits)
    return _FP8_VALUES[bits]


# -- cuda-python plumbing -------------------------------------------------------------------------


def _rt():
    """cuda-python's runtime module, imported on first use."""
    try:
        from cuda.bindings import runtime  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart as runtime  # noqa: PLC0415  (cuda-python < 12.6)
        except ImportError:
            raise HardwareError(
                "CudaBuffer / CUDAGraph without torch need cuda-python (cuda.bindings.runtime), which is "
                "not installed; pip install 'flashrt-core[cuda]' (or cuda-python matching your driver)"
            ) from None
    return runtime


def _error_text(rt, err) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1].decode()
        text = rt.cudaGetErrorString(err)[1].decode()
    except Exception:  # a code the bindings do not know
        return f"CUDA error {int(err)}"
    return f"{name}: {text}"


_NO_DEVICE_ERRORS = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorInitializationError")


def cuda_check(result, what: str):
    """Unpack a cuda-python ``(err, *values)`` result; raise HardwareError unless success."""
    rt = _rt()
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        detail = _error_text(rt, err)
        if any(detail.startswith(name) for name in _NO_DEVICE_ERRORS):
            raise HardwareError(
                f"no usable CUDA device: {what} failed with {detail}. CudaBuffer and CUDAGraph need an "
                "NVIDIA GPU and its driver; on a machine without one use hardware='cpu'"
            )
        raise HardwareError(f"{what} failed with {detail}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


_device_count: int | None = None


def cuda_device_count() -> int:
    """Number of CUDA devices; raises HardwareError when there is none (or no driver)."""
    global _device_count
    if _device_count is None:
        count = cuda_check(_rt().cudaGetDeviceCount(), "cudaGetDeviceCount")
        if not count:
            raise HardwareError("no CUDA device: cudaGetDeviceCount() returned 0; use hardware='cpu'")
        _device_count = int(count)
    return _device_count


@contextlib.contextmanager
def on_device(device: int):
    """Make ``device`` current for the block, then restore the caller's device."""
    count = cuda_device_count()
    if not 0 <= device < count:
        raise HardwareError(f"CUDA device {device} requested, but there are {count} (0..{count - 1})")
    rt = _rt()
    previous = cuda_check(rt.cudaGetDevice(), "cudaGetDevice")
    if previous != device:
        cuda_check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
    try:
        yield
    finally:
        if previous != device:
            rt.cudaSetDevice(previous)


def _stream(stream) -> int:
    """An int stream handle from an int, a cuda-python stream or a torch stream."""
    if stream is None:
        return 0
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return int(stream.cuda_stream)
    return int(stream)


def _shape(shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ConfigError(f"shape must be non-negative, got {shape}")
    return shape


def _host_view(ptr: int, nbytes: int, storage: np.dtype, shape, owner) -> np.ndarray:
    """A numpy array over host memory at ``ptr`` that keeps ``owner`` alive."""
    raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
    raw._flashrt_owner = owner
    return np.frombuffer(raw, dtype=np.uint8).view(storage).reshape(shape)


class _Freed:
    """Memory released by ``free()``: on leaving a ``with`` block, and (best effort) when collected."""

    def free(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.free()


# -- pinned host memory -----------------------------------------------------------------------------


class PinnedHostBuffer(_Freed):
    """Page-locked host memory (cudaHostAlloc): the source of truly asynchronous H2D copies."""

    def __init__(self, shape, dtype="uint8") -> None:
        self.shape = _shape(shape)
        self.dtype = resolve_dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        rt = _rt()
        cuda_device_count()
        self._ptr = cuda_check(rt.cudaHostAlloc(max(self.nbytes, 1), rt.cudaHostAllocDefault), "cudaHostAlloc")
        self._ptr = int(self._ptr)

    @property
    def ptr(self) -> int:
        if not self._ptr:
            raise ConfigError("this PinnedHostBuffer was freed")
        return self._ptr

    def numpy(self) -> np.ndarray:
        """A writable numpy view (storage dtype) of the pinned memory."""
        return _host_view(self.ptr, self.nbytes, self.dtype.numpy_storage, self.shape, self)

    def free(self) -> None:
        if getattr(self, "_ptr", 0):
            ptr, self._ptr = self._ptr, 0
            _rt().cudaFreeHost(ptr)


# -- device memory --------------------------------------------------------------------------------


class CudaBuffer(_Freed):
    """A contiguous device array: pointer, shape, dtype, device. Owns its memory when it came
    from ``empty``/``zeros``/``from_numpy``; wraps it when it came from ``from_torch``/``wrap``."""

    def __init__(self, ptr: int, shape, dtype, device: int = 0, *, owner=None, owns: bool = False) -> None:
        self._ptr = int(ptr)
        self.shape = _shape(shape)
        self.dtype = resolve_dtype(dtype)
        self.device = int(device)
        self._owner = owner  # keeps the memory's real owner (a tensor, a base buffer) alive
        self._owns = owns
        self._staging: PinnedHostBuffer | None = None
        self._staging_event = None

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def empty(cls, shape, dtype="float32", device: int = 0) -> CudaBuffer:
        shape, dt = _shape(shape), resolve_dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        with on_device(device):
            ptr = cuda_check(_rt().cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes} bytes)")
        return cls(ptr, shape, dt, device, owns=True)

    @classmethod
    def zeros(cls, shape, dtype="float32", device: int = 0) -> CudaBuffer:
        buf = cls.empty(shape, dtype, device)
        with on_device(device):
            cuda_check(_rt().cudaMemset(buf.ptr, 0, buf.nbytes), "cudaMemset")
        return buf

    @classmethod
    def from_numpy(cls, array, dtype=None, device: int = 0) -> CudaBuffer:
        """A new buffer holding ``array`` (synchronous H2D). ``dtype`` defaults to the array's."""
        array = np.asarray(array)
        dt = resolve_dtype(array.dtype if dtype is None else dtype)
        bits = host_encode(array, dt)
        buf = cls.empty(array.shape, dt, device)
        rt = _rt()
        with on_device(device):
            cuda_check(
                rt.cudaMemcpy(buf.ptr, bits.ctypes.data, buf.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice),
                "cudaMemcpy H2D",
            )
        return buf

    @classmethod
    def from_torch(cls, tensor) -> CudaBuffer:
        """Wrap a contiguous CUDA tensor's memory (no copy; the tensor is kept alive)."""
        if not getattr(tensor, "is_cuda", False):
            raise InputError(f"CudaBuffer.from_torch needs a CUDA tensor, got one on {getattr(tensor, 'device', '?')}")
        if not tensor.is_contiguous():
            raise InputError("CudaBuffer.from_torch needs a contiguous tensor; call .contiguous() first")
        return cls(tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.device.index or 0, owner=tensor)

    @classmethod
    def wrap(cls, ptr: int, shape, dtype, device: int = 0, owner=None) -> CudaBuffer:
        """View foreign device memory (not freed by this object; ``owner`` is kept alive)."""
        return cls(ptr, shape, dtype, device, owner=owner)

    # -- properties ------------------------------------------------------------------------------

    @property
    def ptr(self) -> int:
        if not self._ptr:
            raise ConfigError("this CudaBuffer was freed")
        return self._ptr

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict:
        if not self.dtype.native:
            raise AttributeError(f"{self.dtype.name} has no __cuda_array_interface__ type; use .torch()")
        return {"shape": self.shape, "typestr": np.dtype(self.dtype.storage).str, "data": (self.ptr, False),
                "version": 3, "strides": None}

    def __repr__(self) -> str:
        state = f"ptr=0x{self._ptr:x}" if self._ptr else "freed"
        return f"CudaBuffer(shape={self.shape}, dtype={self.dtype.name}, device={self.device}, {state})"

    def view(self, shape, dtype=None) -> CudaBuffer:
        """The same bytes with another shape (and optionally dtype of the same total size)."""
        dt = self.dtype if dtype is None else resolve_dtype(dtype)
        shape = _shape(shape)
        if math.prod(shape) * dt.itemsize != self.nbytes:
            raise InputError(f"view {shape} of {dt.name} is not {self.nbytes} bytes like {self.shape} of {self.dtype.name}")
        return CudaBuffer(self.ptr, shape, dt, self.device, owner=self)

    # -- copies ----------------------------------------------------------------------------------

    def to_numpy(self, stream=0, *, raw: bool = False) -> np.ndarray:
        """Copy to a new host array after the work queued on ``stream``. bfloat16 / fp8 come
        back as float32 values, or as their bits with ``raw=True``."""
        bits = np.empty(self.shape, dtype=self.dtype.numpy_storage)
        rt, handle = _rt(), _stream(stream)
        with on_device(self.device):
            cuda_check(
                rt.cudaMemcpyAsync(bits.ctypes.data, self.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, handle),
                "cudaMemcpyAsync D2H",
            )
            cuda_check(rt.cudaStreamSynchronize(handle), "cudaStreamSynchronize")
        return bits if raw else host_decode(bits, self.dtype)

    def copy_from_numpy(self, array, stream=0) -> None:
        """Asynchronous H2D of ``array`` into this buffer on ``stream``, staged through a pinned
        host buffer that this object keeps; returns once the host side may reuse ``array``."""
        bits = host_encode(array, self.dtype)
        if bits.nbytes != self.nbytes:
            raise InputError(
                f"copy_from_numpy: array of shape {np.shape(array)} ({bits.nbytes} bytes as {self.dtype.name}) "
                f"does not fit buffer {self.shape} ({self.nbytes} bytes)"
            )
        rt, handle = _rt(), _stream(stream)
        with on_device(self.device):
            if self._staging is None:
                self._staging = PinnedHostBuffer(self.shape, self.dtype)
                self._staging_event = cuda_check(
                    rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags"
                )
            else:  # the previous copy out of the staging buffer must be done before we refill it
                cuda_check(rt.cudaEventSynchronize(self._staging_event), "cudaEventSynchronize")
            np.copyto(self._staging.numpy().reshape(-1), bits.reshape(-1))
            self.copy_from_host(self._staging, handle)
            cuda_check(rt.cudaEventRecord(self._staging_event, handle), "cudaEventRecord")

    def copy_from_host(self, pinned: PinnedHostBuffer, stream=0) -> None:
        """Asynchronous H2D from a pinned buffer of the same size (the caller keeps it unchanged
        until the stream has passed this copy)."""
        if pinned.nbytes != self.nbytes:
            raise InputError(f"copy_from_host: pinned buffer has {pinned.nbytes} bytes, this buffer {self.nbytes}")
        rt = _rt()
        with on_device(self.device):
            cuda_check(
                rt.cudaMemcpyAsync(self.ptr, pinned.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, _stream(stream)),
                "cudaMemcpyAsync H2D",
            )

    def copy_from(self, other: CudaBuffer, stream=0) -> None:
        """Asynchronous device-to-device copy of a buffer of the same size."""
        if other.nbytes != self.nbytes:
            raise InputError(f"copy_from: source has {other.nbytes} bytes, this buffer {self.nbytes}")
        rt = _rt()
        with on_device(self.device):
            cuda_check(
                rt.cudaMemcpyAsync(self.ptr, other.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, _stream(stream)),
                "cudaMemcpyAsync D2D",
            )

    def fill_zero(self, stream=0) -> None:
        with on_device(self.device):
            cuda_check(_rt().cudaMemsetAsync(self.ptr, 0, self.nbytes, _stream(stream)), "cudaMemsetAsync")

    # -- torch -------------------------------------------------------------------------------------

    def torch(self):
        """A torch tensor over the same memory (no copy). It keeps this buffer alive; do not
        ``free()`` the buffer while the tensor is in use."""
        import torch  # noqa: PLC0415

        owner = self._owner
        if isinstance(owner, torch.Tensor) and tuple(owner.shape) == self.shape:
            return owner
        raw = torch.as_tensor(_RawDeviceBytes(self.ptr, self.nbytes, self), device=f"cuda:{self.device}")
        return raw.view(getattr(torch, self.dtype.torch_name)).view(self.shape)

    # -- lifetime ------------------------------------------------------------------------------------

    def free(self) -> None:
        """Release the memory now (owned buffers) or drop the reference (wrapped ones)."""
        if getattr(self, "_staging", None) is not None:
            self._staging.free()
            self._staging = None
        if getattr(self, "_staging_event", None) is not None:
            with contextlib.suppress(Exception):
                _rt().cudaEventDestroy(self._staging_event)
            self._staging_event = None
        ptr, self._ptr = getattr(self, "_ptr", 0), 0
        if ptr and self._owns:
            _rt().cudaFree(ptr)
        self._owner = None


class _RawDeviceBytes:
    """Exposes device bytes through __cuda_array_interface__ (torch.as_tensor keeps it alive)."""

    def __init__(self, ptr: int, nbytes: int, owner) -> None:
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


__all__ = ["CudaBuffer", "PinnedHostBuffer", "DType", "resolve_dtype", "host_encode", "host_decode"]
