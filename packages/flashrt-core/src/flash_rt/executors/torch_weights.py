"""Torch side of declarative weight loading: sources, transforms, sinks, and a streaming
safetensors writer.

Sources:    SafetensorsSource (file, directory, sharded index; lazy mmap reads), DictSource.
Transforms: Cat, FusedQKV, FusedGateUp, ToFp16, ToFp32, ToBf16, T, tT, InterleaveQK, Quant, Mul,
            Reshape.
Sinks:      Attr, TensorList, FlatCat.
Writer:     write_safetensors (header first, then tensor bytes one tensor at a time).

torch is imported inside functions, so importing this module stays cheap. See docs/weights.md.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flash_rt.errors import CheckpointError, ConfigError
from flash_rt.executors.weight_loader import (
    SAFETENSORS_DTYPES,
    ElementwiseTransform,
    LoadContext,
    ScaleRecordingQuant,
    Sink,
    TensorMeta,
    Transform,
    WeightSource,
    append_target,
    canonical_dtype,
    read_safetensors_header,
    set_target,
)

__all__ = [
    "SafetensorsSource",
    "DictSource",
    "Cat",
    "FusedQKV",
    "FusedGateUp",
    "ToFp16",
    "ToFp32",
    "ToBf16",
    "T",
    "tT",
    "InterleaveQK",
    "Quant",
    "Mul",
    "Reshape",
    "Attr",
    "TensorList",
    "FlatCat",
    "write_safetensors",
    "quantize_fp8_e4m3",
    "FP8_E4M3_MAX",
]

FP8_E4M3_MAX = 448.0
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------------
# sources


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _as_prefixes(strip_prefix) -> tuple[str, ...]:
    if strip_prefix is None:
        return ()
    if isinstance(strip_prefix, str):
        return (strip_prefix,)
    return tuple(strip_prefix)


class SafetensorsSource(WeightSource):
    """Tensors of a safetensors checkpoint, read lazily (mmap), one tensor at a time.

    Args:
        path: a ``.safetensors`` file, or a directory holding ``model.safetensors``, a sharded
            checkpoint with ``model.safetensors.index.json``, or other ``*.safetensors`` files
            (all are read).
        strip_prefix: a prefix (or several) removed from key names, e.g. ``"model."`` for
            lerobot checkpoints; keys without it keep their names.
        device: where tensors are materialised (``"cpu"``, ``"cuda:0"``); safetensors copies
            straight from the mapped file to that device.

    Every file's header is parsed and checked at construction (cheap: no tensor data), so a
    truncated or corrupt file, or an index naming a missing shard, is a ``CheckpointError``
    naming the file before anything is loaded.
    """

    def __init__(
        self, path: str | os.PathLike, *, strip_prefix: str | Sequence[str] | None = None, device="cpu"
    ):
        self.path = os.fspath(path)
        self.device = device
        self._prefixes = _as_prefixes(strip_prefix)
        self._handles: dict[str, Any] = {}
        files = self._resolve_files(self.path)
        self.files = files
        self.metadata: dict[str, str] = {}
        # name (after prefix strip) -> (file, name in file, TensorMeta)
        self._where: dict[str, tuple[str, str, TensorMeta]] = {}
        for fpath in files:
            header, _ = read_safetensors_header(fpath)
            self.metadata.update(header.get("__metadata__") or {})
            for orig, info in header.items():
                if orig == "__metadata__":
                    continue
                name = _strip(orig, self._prefixes)
                if name in self._where:
                    other = self._where[name]
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} appears twice ({other[0]}:{other[1]!r} and "
                        f"{fpath}:{orig!r}). Remove the duplicate shard, or choose strip_prefix so "
                        "names stay unique."
                    )
                meta = TensorMeta(tuple(info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
                self._where[name] = (fpath, orig, meta)
        if self._index_map is not None:
            self._check_index(self._index_map)

    def _resolve_files(self, path: str) -> list[str]:
        self._index_map = None
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise CheckpointError(
                f"checkpoint {path!r} does not exist. Expected a .safetensors file or a directory "
                f"with {SINGLE_FILE} or {INDEX_FILE}."
            )
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); expected JSON "
                    'with a "weight_map" object {tensor name: shard file}.'
                ) from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise CheckpointError(
                    f"{index} names {len(missing)} shard file(s) that are not in {path}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The download or copy "
                    "is incomplete; fetch the missing shards."
                )
            self._index_map = weight_map
            return [os.path.join(path, s) for s in shards]
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(single):
            return [single]
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not found:
            raise CheckpointError(
                f"{path}: no .safetensors file here (expected {SINGLE_FILE} or {INDEX_FILE})."
            )
        return [os.path.join(path, f) for f in found]

    def _check_index(self, weight_map: Mapping[str, str]) -> None:
        by_file = {}
        for fpath, orig, _ in self._where.values():
            by_file[orig] = os.path.basename(fpath)
        wrong = [k for k, shard in weight_map.items() if by_file.get(k) != os.path.basename(shard)]
        if wrong:
            k = wrong[0]
            raise CheckpointError(
                f"{os.path.join(self.path, INDEX_FILE)}: the index puts {len(wrong)} tensor(s) in shards "
                f"that do not hold them, e.g. {k!r} -> {weight_map[k]!r} "
                f"(found in: {by_file.get(k, 'no shard')}). The index and shards are from different "
                "checkpoints or a shard is damaged."
            )

    def describe(self) -> str:
        return self.path

    def keys(self) -> list[str]:
        return list(self._where)

    def _meta(self, name: str) -> TensorMeta:
        return self._where[name][2]

    def _handle(self, fpath: str):
        h = self._handles.get(fpath)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(fpath, framework="pt", device=str(self.device))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{fpath}: cannot open as safetensors: {type(e).__name__}: {e}") from e
            self._handles[fpath] = h
        return h

    def _read(self, name: str, index: int | None):
        fpath, orig, _ = self._where[name]
        h = self._handle(fpath)
        try:
            if index is None:
                return h.get_tensor(orig)
            return h.get_slice(orig)[index]
        except Exception as e:
            raise CheckpointError(
                f"{fpath}: reading tensor {orig!r} failed: {type(e).__name__}: {e}. The file may be "
                "damaged; copy or download it again."
            ) from e

    def close(self) -> None:
        self._handles.clear()


class DictSource(WeightSource):
    """In-memory tensors (tests, conversions): ``DictSource({"a.weight": t, ...})``.

    Values are torch tensors (or numpy arrays, converted on read). ``strip_prefix`` as in
    ``SafetensorsSource``.
    """

    def __init__(
        self, tensors: Mapping[str, Any], *, strip_prefix: str | Sequence[str] | None = None, name="dict"
    ):
        prefixes = _as_prefixes(strip_prefix)
        self._tensors = {}
        for k, v in tensors.items():
            n = _strip(k, prefixes)
            if n in self._tensors:
                raise CheckpointError(f"DictSource: key {n!r} appears twice after stripping {prefixes}.")
            self._tensors[n] = v
        self._name = name

    def describe(self) -> str:
        return f"DictSource({self._name})"

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _meta(self, name: str) -> TensorMeta:
        t = self._tensors[name]
        return TensorMeta(tuple(t.shape), canonical_dtype(t.dtype))

    def _read(self, name: str, index: int | None):
        import torch

        t = self._tensors[name]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        return t if index is None else t[index]


# --------------------------------------------------------------------------------------------
# transforms


def _as_list(value, who: str, n: int | None = None) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{who} combines several tensors; give the Item a list of keys")
    if n is not None and len(value) != n:
        raise ConfigError(f"{who} expects {n} tensors, the Item gave {len(value)}")
    return list(value)


class Cat(Transform):
    """Concatenate the item's tensors along ``dim``."""

    def __init__(self, dim: int = 0):
        self.dim = dim

    def apply(self, value, ctx):
        import torch

        return torch.cat(_as_list(value, "Cat"), dim=self.dim)


class FusedQKV(Transform):
    """Concatenate q, k, v (keys in that order) along ``dim`` (0 = rows of a [out, in] weight)."""

    def __init__(self, dim: int = 0):
        self.dim = dim

    def apply(self, value, ctx):
        import torch

        return torch.cat(_as_list(value, "FusedQKV", 3), dim=self.dim)


class FusedGateUp(Transform):
    """Concatenate gate and up projections (keys in that order) along ``dim``."""

    def __init__(self, dim: int = 0):
        self.dim = dim

    def apply(self, value, ctx):
        import torch

        return torch.cat(_as_list(value, "FusedGateUp", 2), dim=self.dim)


class _Cast(ElementwiseTransform):
    _dtype = ""

    def one(self, x, ctx):
        import torch

        return x.to(getattr(torch, self._dtype))


class ToFp16(_Cast):
    """Cast to float16."""

    _dtype = "float16"


class ToFp32(_Cast):
    """Cast to float32."""

    _dtype = "float32"


class ToBf16(_Cast):
    """Cast to bfloat16."""

    _dtype = "bfloat16"


class T(ElementwiseTransform):
    """Swap the last two dims (a view: ``x.transpose(-2, -1)``)."""

    def one(self, x, ctx):
        return x.transpose(-2, -1)


class tT(ElementwiseTransform):  # noqa: N801 - public name from the seed contract
    """Swap the last two dims and make the result contiguous (what a GEMM wanting [in, out]
    row-major needs)."""

    def one(self, x, ctx):
        return x.transpose(-2, -1).contiguous()


class Reshape(ElementwiseTransform):
    """Reshape (entries may be parameter names, or -1)."""

    def __init__(self, shape: Sequence[int | str], *, on=None):
        super().__init__(on=on)
        self.shape = tuple(shape)

    def one(self, x, ctx):
        from flash_rt.executors.weight_loader import _resolve_dim

        return x.reshape(tuple(_resolve_dim(d, ctx.scope) for d in self.shape))


class InterleaveQK(ElementwiseTransform):
    """Reorder each head's rotary halves into interleaved pairs, along ``dim``.

    Checkpoints in the HF layout rotate ``(x[j], x[j + d/2])``; kernels applying RoPE to
    adjacent pairs need ``(x[2j], x[2j+1])``. Per head of ``head_dim`` rows: new row ``2j`` is
    old row ``j`` and new row ``2j+1`` is old row ``j + head_dim/2``. Works on weights
    ``[heads*head_dim, in]`` (``dim=0``), transposed weights (``dim=-1``) and biases.
    Use ``on=(0, 1)`` on a [q, k, v] list to leave v alone.
    """

    def __init__(self, head_dim: int | str, *, dim: int = 0, on=None):
        super().__init__(on=on)
        self.head_dim = head_dim
        self.dim = dim

    def one(self, x, ctx):
        from flash_rt.executors.weight_loader import _resolve_dim

        hd = _resolve_dim(self.head_dim, ctx.scope)
        size = x.shape[self.dim]
        if hd % 2 or size % hd:
            raise ConfigError(
                f"InterleaveQK: dim {self.dim} has {size} rows, not a multiple of head_dim={hd} (even)"
            )
        x = x.movedim(self.dim, 0)
        rest = x.shape[1:]
        heads = size // hd
        # [heads, 2 (half), hd/2, ...] -> [heads, hd/2, 2, ...]: pairs (x[j], x[j + hd/2])
        y = x.reshape(heads, 2, hd // 2, *rest).transpose(1, 2).reshape(size, *rest)
        return y.movedim(0, self.dim).contiguous()


def quantize_fp8_e4m3(x, scale=None):
    """Per-tensor FP8 E4M3 quantisation: returns ``(q, scale)`` with ``x ~= q.float() * scale``.

    ``scale = amax(|x|) / 448`` unless given (an all-zero tensor gets scale 1.0). Values are
    computed in float32 and saturated to +-448 before the cast (the cast itself does not
    saturate).
    """
    import torch

    xf = x.float()
    if scale is None:
        amax = float(xf.abs().max()) if xf.numel() else 0.0
        if not math.isfinite(amax):
            raise ValueError(f"cannot quantise a tensor with non-finite values (amax={amax})")
        scale = amax / FP8_E4M3_MAX if amax > 0 else 1.0
    q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, float(scale)


class Quant(ScaleRecordingQuant):
    """FP8 E4M3 per-tensor quantisation; the result is the ``float8_e4m3fn`` tensor.

    The scale (a Python float, ``x ~= q * scale``) is recorded on the target:
    ``scale_into="_enc_w_scales"`` appends it to that list attribute (a new list each load; the
    seed convention, later turned into one device tensor), ``scale_attr="q_scale"`` sets it
    as an attribute. Either name may use templates (``"scale_{i}"``).
    """

    one_value = "one tensor; combine the Item's tensors first (Cat, FusedQKV, ...)"

    def quantize(self, value):
        return quantize_fp8_e4m3(value)


class Mul(ElementwiseTransform):
    """Multiply by a constant, or fold a norm weight into a linear weight.

    ``Mul(0.125)``: ``x * 0.125``. ``Mul(key="{layer}.input_layernorm.weight", plus_one=True)``:
    ``x * (1 + w)`` with ``w`` read from the checkpoint and broadcast along ``dim`` (default
    -1, the input features of a torch ``[out, in]`` weight), i.e. folding Gemma's ``(1 + w)``
    RMSNorm scale into the following projection. ``factor`` and ``key`` may be combined. The
    product is computed in float32 and cast back to ``x``'s dtype.
    """

    def __init__(
        self, factor: float = 1.0, *, key: str | None = None, plus_one: bool = False, dim: int = -1, on=None
    ):
        super().__init__(on=on)
        self.factor = float(factor)
        self.key = key
        self.plus_one = bool(plus_one)
        self.dim = dim
        if plus_one and key is None:
            raise ConfigError("Mul(plus_one=True) needs key= naming the norm weight to fold")

    def source_keys(self):
        return (self.key,) if self.key is not None else ()

    def one(self, x, ctx):
        y = x.float() * self.factor
        if self.key is not None:
            w = ctx.read(self.key).float().to(y.device)
            if self.plus_one:
                w = w + 1.0
            if w.dim() != 1 or w.shape[0] != y.shape[self.dim]:
                raise ConfigError(
                    f"Mul(key={self.key!r}): a vector of {y.shape[self.dim]} (dim {self.dim} of a "
                    f"{tuple(y.shape)} tensor) was expected, found {tuple(w.shape)}"
                )
            shape = [1] * y.dim()
            shape[self.dim] = -1
            y = y * w.reshape(shape)
        return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# sinks


class Attr(Sink):
    """Store as ``target.<name>`` (``target[name]`` for a dict target); ``name`` may use
    templates (``"q_w_{i}"``)."""

    def __init__(self, name: str):
        self.name = name

    def store(self, value, ctx: LoadContext) -> None:
        set_target(ctx.target, ctx.fmt(self.name), value)


class TensorList(Sink):
    """Append to a list attribute, one entry per item / layer. The list is new for each
    load (a second ``run()`` replaces it rather than doubling it).

    A list-valued item (several keys, nothing combined) appends each tensor."""

    def __init__(self, name: str):
        self.name = name

    def store(self, value, ctx: LoadContext) -> None:
        name = ctx.fmt(self.name)
        for v in value if isinstance(value, list) else [value]:
            append_target(ctx.target, name, v, ctx)


class FlatCat(Sink):
    """Collect tensors into one flat 1-D buffer (one allocation, one pointer for a kernel).

    After the load, ``target.<name>`` is the concatenation of every stored tensor, flattened,
    in load order, and ``target.<offsets_attr>`` (default ``name + "_offsets"``) a list of
    ``(offset, shape)`` in elements, one per stored tensor. All parts must share one dtype.
    ``align`` (elements) pads each part's start, e.g. 8 for 16-byte aligned fp16 rows.
    """

    def __init__(self, name: str, *, offsets_attr: str | None = None, align: int = 1):
        self.name = name
        self.offsets_attr = offsets_attr
        self.align = int(align)

    def store(self, value, ctx: LoadContext) -> None:
        name = ctx.fmt(self.name)
        key = ("FlatCat", name)
        st = ctx.state(key)
        parts = st.setdefault("parts", [])
        for v in value if isinstance(value, list) else [value]:
            if parts and v.dtype != parts[0].dtype:
                raise ConfigError(f"FlatCat({name!r}): dtype {v.dtype} after {parts[0].dtype}; cast first")
            parts.append(v)
        target = ctx.target
        offsets_name = ctx.fmt(self.offsets_attr) if self.offsets_attr else name + "_offsets"
        align = self.align

        def finish():
            import torch

            offsets, pos = [], 0
            for p in parts:
                pos = -(-pos // align) * align
                offsets.append((pos, tuple(p.shape)))
                pos += p.numel()
            flat = torch.zeros(pos, dtype=parts[0].dtype, device=parts[0].device)
            for (off, _), p in zip(offsets, parts, strict=True):
                flat[off : off + p.numel()] = p.reshape(-1)
            parts.clear()  # the flat buffer now owns the data
            set_target(target, name, flat)
            set_target(target, offsets_name, offsets)

        ctx.on_finish(key, finish)


# --------------------------------------------------------------------------------------------
# writer

_TORCH_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _st_dtype(dtype) -> str:
    name = canonical_dtype(dtype)
    try:
        return _TORCH_TO_ST[name]
    except KeyError:
        raise ConfigError(
            f"safetensors cannot store dtype {dtype}; supported: {sorted(_TORCH_TO_ST)}"
        ) from None


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    metadata: Mapping[str, str] | None = None,
    layout: Sequence[tuple[str, Sequence[int], Any]] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time, never holding all tensors in memory.

    Args:
        path: the file to write; written to a temp file beside it and renamed into place, so a
            crash never leaves a truncated checkpoint under the final name.
        tensors: a mapping or an iterable of ``(name, tensor)``; tensors may be torch tensors
            (any device) or numpy arrays. With ``layout`` the iterable may be a generator that
            makes each tensor on demand (random weights for a 3B-parameter model).
        metadata: string -> string, stored as ``__metadata__``.
        layout: ``[(name, shape, dtype), ...]`` announced in advance, in the order ``tensors``
            yields them. The header is written first from it, then each tensor's bytes as it
            arrives (checked against the layout). Without ``layout`` a mapping's layout is read
            from its values; a plain iterable is spooled to a temp file first (one extra
            sequential copy on disk, still no tensor held in memory).
    """
    path = os.fspath(path)
    if layout is None and isinstance(tensors, Mapping):
        layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    if layout is None:
        _write_spooled(path, tensors, metadata)
        return
    entries = [(str(n), tuple(int(d) for d in shape), _st_dtype(dt)) for n, shape, dt in layout]
    header, total = _make_header(entries, metadata)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    _atomic_write(path, lambda f: _write_body(f, header, entries, items, total))


def _make_header(entries, metadata) -> tuple[bytes, int]:
    from flash_rt.executors.weight_loader import DTYPE_ITEMSIZE

    hdr: dict[str, Any] = {}
    if metadata:
        hdr["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    seen = set()
    for name, shape, st in entries:
        if name in seen or name == "__metadata__":
            raise ConfigError(f"write_safetensors: tensor name {name!r} is duplicated or reserved")
        seen.add(name)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPE_ITEMSIZE[SAFETENSORS_DTYPES[st]]
        hdr[name] = {"dtype": st, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, pos


def _tensor_bytes(t):
    """A zero-copy byte view of a tensor's data (contiguous, on CPU)."""
    import numpy as np
    import torch

    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()), t


def _write_body(f, header: bytes, entries, items, total: int) -> None:
    f.write(header)
    it = iter(items)
    for name, shape, st in entries:
        try:
            got_name, t = next(it)
        except StopIteration:
            raise ConfigError(f"write_safetensors: the tensors ended before {name!r} of the layout") from None
        if got_name != name or tuple(t.shape) != shape or _st_dtype(t.dtype) != st:
            raise ConfigError(
                f"write_safetensors: layout announced {name!r} {shape} {st}, tensors gave "
                f"{got_name!r} {tuple(t.shape)} {_st_dtype(t.dtype)}"
            )
        view, _keep = _tensor_bytes(t)
        f.write(view)
        del view, _keep, t
    extra = next(it, None)
    if extra is not None:
        raise ConfigError(f"write_safetensors: tensor {extra[0]!r} is not in the layout")


def _write_spooled(path, items, metadata) -> None:
    d = os.path.dirname(os.path.abspath(path))
    entries = []
    with tempfile.TemporaryFile(dir=d) as spool:
        for name, t in items:
            entries.append((str(name), tuple(t.shape), _st_dtype(t.dtype)))
            view, _keep = _tensor_bytes(t)
            spool.write(view)
            del view, _keep
        header, total = _make_header(entries, metadata)

        def body(f):
            f.write(header)
            spool.seek(0)
            while chunk := spool.read(64 << 20):
                f.write(chunk)

        _atomic_write(path, body)


def _atomic_write(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a checkpoint gets the usual umask-derived mode like any file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
