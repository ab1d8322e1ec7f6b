"""Jax side of declarative weight loading: arrays are numpy on the host, uploaded by sinks.

Sources:    OrbaxDictSource (a restored param tree, or an orbax checkpoint directory).
Transforms: Transpose, Astype, Contiguous, JaxQuant, NumpyReshape, NumpyConcat.
Sinks:      NumpyAttr, NumpyList, CudaBufferAttr, CudaBufferFlat.

openpi's jax checkpoints stack layers on axis 0 (``layers/attn/q_einsum/w`` is
``(18, 8, 2048, 256)``): index them in keys, ``"{llm}/attn/q_einsum/w[{i}]"``, or
``"kv_einsum/w[{i},0]"`` for the k half. Nothing here imports jax at module import: jax arrays
are turned into numpy with ``np.asarray``; orbax is imported only to restore a path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flash_rt.errors import CheckpointError, ConfigError
from flash_rt.executors.weight_loader import (
    ElementwiseTransform,
    LoadContext,
    ScaleRecordingQuant,
    Sink,
    TensorMeta,
    Transform,
    WeightSource,
    _resolve_dim,
    append_target,
    canonical_dtype,
    set_target,
)

__all__ = [
    "OrbaxDictSource",
    "Transpose",
    "Astype",
    "Contiguous",
    "JaxQuant",
    "NumpyReshape",
    "NumpyConcat",
    "NumpyAttr",
    "NumpyList",
    "CudaBufferAttr",
    "CudaBufferFlat",
    "quantize_fp8_e4m3_numpy",
    "fp8_e4m3_bits",
]

FP8_E4M3_MAX = 448.0


# --------------------------------------------------------------------------------------------
# source


def _is_leaf(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


def flatten_tree(tree: Mapping, sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": arr}}`` -> ``{"a/b": arr}``. A ``{"value": arr}`` wrapper (flax nnx state)
    collapses into its parent name."""
    out: dict[str, Any] = {}

    def walk(node, path):
        if _is_leaf(node):
            out[sep.join(path)] = node
        elif isinstance(node, Mapping):
            if set(node) == {"value"} and _is_leaf(node["value"]) and path:
                out[sep.join(path)] = node["value"]
                return
            for k, v in node.items():
                walk(v, (*path, str(k)))
        elif node is None:
            return
        else:
            raise CheckpointError(
                f"param tree entry {sep.join(path)!r} is a {type(node).__name__}, expected an array or a dict"
            )

    walk(tree, ())
    return out


def _restore_orbax(path: str) -> Mapping:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ConfigError(
            f"reading the orbax checkpoint {path!r} needs orbax-checkpoint and jax: "
            "pip install 'flashrt-core[jax]'"
        ) from e
    try:
        return ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
    except Exception as e:  # orbax raises many types for a bad directory
        raise CheckpointError(
            f"{path}: cannot restore as an orbax checkpoint ({type(e).__name__}: {e}). For openpi "
            "checkpoints pass the 'params' directory inside the checkpoint."
        ) from e


class OrbaxDictSource(WeightSource):
    """Arrays of a jax param tree, addressed by ``sep``-joined paths
    (``"PaliGemma/llm/layers/attn/q_einsum/w"``).

    Args:
        params: a nested dict of arrays (numpy or jax, e.g. what orbax restored), an already
            flat dict, or a path to an orbax checkpoint directory (restored with orbax, which
            must be installed; the whole tree is restored into host memory).
        strip_prefix: removed from names (``"params/"``).
        sep: path separator (``"/"``).
    """

    def __init__(
        self, params: Mapping | str | os.PathLike, *, strip_prefix: str | None = None, sep: str = "/"
    ):
        self._label = "param tree"
        if isinstance(params, (str, os.PathLike)):
            self._label = os.fspath(params)
            params = _restore_orbax(os.fspath(params))
        if not isinstance(params, Mapping):
            raise CheckpointError(
                f"OrbaxDictSource needs a dict of arrays or a path, got {type(params).__name__}"
            )
        flat = flatten_tree(params, sep)
        if strip_prefix:
            flat = {(k[len(strip_prefix) :] if k.startswith(strip_prefix) else k): v for k, v in flat.items()}
        self._arrays = flat

    def describe(self) -> str:
        return f"OrbaxDictSource({self._label})"

    def keys(self) -> list[str]:
        return list(self._arrays)

    def _meta(self, name: str) -> TensorMeta:
        a = self._arrays[name]
        return TensorMeta(tuple(int(d) for d in a.shape), canonical_dtype(a.dtype))

    def _read(self, name: str, index):
        a = self._arrays[name]
        if index is not None:
            a = a[index]
        return np.asarray(a)


# --------------------------------------------------------------------------------------------
# transforms


def _np_dtype(dtype):
    name = canonical_dtype(dtype)
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        try:
            import ml_dtypes
        except ImportError as e:
            raise ConfigError(f"numpy needs ml_dtypes (installed with jax) for {name}") from e
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


class Transpose(ElementwiseTransform):
    """``np.transpose(x, axes)`` (a view; default reverses all axes, i.e. ``.T`` for 2-D)."""

    def __init__(self, axes: Sequence[int] | None = None, *, on=None):
        super().__init__(on=on)
        self.axes = tuple(axes) if axes is not None else None

    def one(self, x, ctx):
        return np.transpose(x, self.axes)


class Astype(ElementwiseTransform):
    """Cast (``"float16"``, ``"bf16"``, ``np.float32``, ...; bfloat16 needs ml_dtypes)."""

    def __init__(self, dtype, *, on=None):
        super().__init__(on=on)
        self.dtype = canonical_dtype(dtype)

    def one(self, x, ctx):
        return np.asarray(x).astype(_np_dtype(self.dtype))


class Contiguous(ElementwiseTransform):
    """C-contiguous copy (if not already), as a device upload needs."""

    def one(self, x, ctx):
        return np.ascontiguousarray(x)


class NumpyReshape(ElementwiseTransform):
    """Reshape (entries may be parameter names, or -1), e.g. ``(27, 1152, 16, 72)`` row ->
    ``("hidden", -1)``."""

    def __init__(self, shape: Sequence[int | str], *, on=None):
        super().__init__(on=on)
        self.shape = tuple(shape)

    def one(self, x, ctx):
        return np.reshape(x, tuple(_resolve_dim(d, ctx.scope) for d in self.shape))


class NumpyConcat(Transform):
    """Concatenate the item's arrays along ``axis`` (fused QKV / gate-up on the jax side)."""

    def __init__(self, axis: int = 0):
        self.axis = axis

    def apply(self, value, ctx):
        if not isinstance(value, list):
            raise ConfigError("NumpyConcat combines several arrays; give the Item a list of keys")
        return np.concatenate(value, axis=self.axis)


def fp8_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """float32 values (already within +-448, finite) -> FP8 E4M3 (fn) bit patterns as uint8,
    rounding to nearest even, as ``torch.float8_e4m3fn`` / ``ml_dtypes`` do."""
    x = np.asarray(x, dtype=np.float32)
    sign = np.signbit(x).astype(np.uint8) << 7
    a = np.abs(x)
    # normals (a >= 2^-6): keep 3 of float32's 23 mantissa bits with round-half-even, then
    # rebias the exponent from 127 to 7. A mantissa carry rolls into the exponent by itself.
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    normal = rounded.astype(np.int64) - ((127 - 7) << 3)
    # subnormals (a < 2^-6): multiples of 2^-9; the code is the multiple (8 -> the first normal)
    sub = np.rint(a * np.float32(512.0)).astype(np.int64)
    code = np.where(a < np.float32(2.0**-6), sub, normal)
    code = np.minimum(code, 0x7E)  # 448, the largest finite value
    return code.astype(np.uint8) | sign


def quantize_fp8_e4m3_numpy(x: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, float]:
    """Per-tensor FP8 E4M3: ``(bits, scale)`` with ``x ~= decode(bits) * scale``; the same
    numbers as ``torch_weights.quantize_fp8_e4m3`` (scale = amax / 448, all-zero -> 1.0)."""
    xf = np.asarray(x, dtype=np.float32)
    if scale is None:
        amax = float(np.max(np.abs(xf))) if xf.size else 0.0
        if not math.isfinite(amax):
            raise ValueError(f"cannot quantise an array with non-finite values (amax={amax})")
        scale = amax / FP8_E4M3_MAX if amax > 0 else 1.0
    y = np.clip(xf / np.float32(scale), -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return fp8_e4m3_bits(y), float(scale)


class JaxQuant(ScaleRecordingQuant):
    """FP8 E4M3 per-tensor quantisation on the host; the result is a ``uint8`` array of E4M3
    bit patterns (what a kernel reads through a raw pointer). Scale recording as ``Quant``:
    ``scale_into=`` appends to a list attribute, ``scale_attr=`` sets an attribute."""

    one_value = "one array; combine the Item's arrays first (NumpyConcat)"

    def quantize(self, value):
        return quantize_fp8_e4m3_numpy(value)


# --------------------------------------------------------------------------------------------
# sinks


class NumpyAttr(Sink):
    """Store ``np.asarray(value)`` as ``target.<name>`` (``target[name]`` for a dict target);
    ``name`` may use templates."""

    def __init__(self, name: str):
        self.name = name

    def store(self, value, ctx: LoadContext) -> None:
        set_target(ctx.target, ctx.fmt(self.name), np.asarray(value))


class NumpyList(Sink):
    """Append to a list attribute, one entry per item / layer (a new list for each load)."""

    def __init__(self, name: str):
        self.name = name

    def store(self, value, ctx: LoadContext) -> None:
        name = ctx.fmt(self.name)
        for v in value if isinstance(value, list) else [value]:
            append_target(ctx.target, name, np.asarray(v), ctx)


def _upload(arr: np.ndarray, dtype, device: int):
    """Host array -> ``flash_rt.core.cuda_buffer.CudaBuffer`` (imported here, so that loading
    into numpy sinks never needs CUDA)."""
    from flash_rt.core.cuda_buffer import CudaBuffer

    return CudaBuffer.from_numpy(np.ascontiguousarray(arr), dtype=dtype, device=device)


class CudaBufferAttr(Sink):
    """Upload to the device and store the ``CudaBuffer`` as ``target.<name>``.

    ``dtype`` is the device dtype (default: the array's); ``"float8_e4m3"`` takes the uint8
    bits ``JaxQuant`` produces as they are, ``"bfloat16"`` encodes a float array."""

    def __init__(self, name: str, *, dtype=None, device: int = 0):
        self.name = name
        self.dtype = dtype
        self.device = device

    def store(self, value, ctx: LoadContext) -> None:
        if isinstance(value, list):
            raise ConfigError(
                f"CudaBufferAttr({self.name!r}) takes one array; combine the Item's arrays first"
            )
        set_target(ctx.target, ctx.fmt(self.name), _upload(value, self.dtype, self.device))


def flat_pack(parts: Sequence[np.ndarray], align: int = 1) -> tuple[np.ndarray, list[tuple[int, tuple]]]:
    """Concatenate flattened arrays (one dtype) into one 1-D array; each part starts at a
    multiple of ``align`` elements. Returns ``(flat, [(offset, shape), ...])``."""
    offsets, pos = [], 0
    for p in parts:
        pos = -(-pos // align) * align
        offsets.append((pos, tuple(p.shape)))
        pos += p.size
    flat = np.zeros(pos, dtype=parts[0].dtype if parts else np.float32)
    for (off, _), p in zip(offsets, parts, strict=True):
        flat[off : off + p.size] = np.asarray(p).reshape(-1)
    return flat, offsets


class CudaBufferFlat(Sink):
    """Collect arrays into one flat device buffer (one upload, one pointer).

    After the load, ``target.<name>`` is a CudaBuffer holding every stored array, flattened,
    in load order; ``target.<offsets_attr>`` (default ``name + "_offsets"``) lists
    ``(offset, shape)`` in elements. All parts share one dtype; ``align`` pads part starts;
    ``dtype`` / ``device`` as for ``CudaBufferAttr``."""

    def __init__(
        self, name: str, *, offsets_attr: str | None = None, align: int = 1, dtype=None, device: int = 0
    ):
        self.name = name
        self.offsets_attr = offsets_attr
        self.align = int(align)
        self.dtype = dtype
        self.device = device

    def store(self, value, ctx: LoadContext) -> None:
        name = ctx.fmt(self.name)
        key = ("CudaBufferFlat", name)
        parts = ctx.state(key).setdefault("parts", [])
        for v in value if isinstance(value, list) else [value]:
            v = np.asarray(v)
            if parts and v.dtype != parts[0].dtype:
                raise ConfigError(
                    f"CudaBufferFlat({name!r}): dtype {v.dtype} after {parts[0].dtype}; cast first"
                )
            parts.append(v)
        target = ctx.target
        offsets_name = ctx.fmt(self.offsets_attr) if self.offsets_attr else name + "_offsets"
        align, dtype, device = self.align, self.dtype, self.device

        def finish():
            flat, offsets = flat_pack(parts, align)
            parts.clear()
            set_target(target, name, _upload(flat, dtype, device))
            set_target(target, offsets_name, offsets)

        ctx.on_finish(key, finish)
