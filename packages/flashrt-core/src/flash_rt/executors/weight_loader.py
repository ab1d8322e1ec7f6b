"""Declarative weight loading: a checkpoint key map as data, and the loop that executes it.

A ``ModelWeightSpec`` lists ``Item``s (one target tensor: source key(s) -> transforms -> sink)
and ``LayerBlock``s (the same items repeated for layer ``i = 0..n-1``). ``WeightLoader`` resolves
the templates, checks every key, shape and dtype against the checkpoint's metadata *before*
reading any data, then reads tensors one at a time, transforms them and hands them to sinks.

    spec = ModelWeightSpec(
        [
            Item("{vis}.embeddings.patch_embedding.weight", [ToFp16()], Attr("patch_w")),
            LayerBlock("num_layers", [
                Item(["{layer}.q_proj.weight", "{layer}.k_proj.weight", "{layer}.v_proj.weight"],
                     [FusedQKV(), tT(), Quant(scale_into="_enc_w_scales")], TensorList("enc_qkv_w")),
            ], params={"layer": "{vis}.encoder.layers.{i}"}),
        ],
        params={"vis": "vision_tower.vision_model", "num_layers": 27},
    )
    WeightLoader(SafetensorsSource(path), spec, frontend).run()

This module is framework-neutral: the torch transforms, sinks and sources live in
``torch_weights``, the jax/numpy ones in ``jax_weights``. Nothing here imports torch or jax.
See docs/weights.md.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import os
import re
import string
import struct
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from flash_rt.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "Item",
    "LayerBlock",
    "ModelWeightSpec",
    "WeightLoader",
    "WeightSource",
    "Transform",
    "ElementwiseTransform",
    "Sink",
    "LoadContext",
    "LoadReport",
    "TensorMeta",
    "canonical_dtype",
    "read_safetensors_header",
    "closest_keys",
    "set_target",
    "append_target",
]


# --------------------------------------------------------------------------------------------
# dtypes and metadata


class TensorMeta(NamedTuple):
    """What a source knows about a tensor without reading it."""

    shape: tuple[int, ...]
    dtype: str  # canonical name, see canonical_dtype()


# safetensors header codes -> canonical names (the numpy / torch spelling without "torch.")
SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
DTYPE_ITEMSIZE = {
    "bool": 1, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "uint16": 2, "int16": 2, "float16": 2, "bfloat16": 2,
    "uint32": 4, "int32": 4, "float32": 4,
    "uint64": 8, "int64": 8, "float64": 8,
}  # fmt: skip
_DTYPE_ALIASES = {
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "double": "float64",
    "fp64": "float64",
    "long": "int64",
    "int": "int32",
    "e4m3": "float8_e4m3fn",
    "fp8": "float8_e4m3fn",
}


def canonical_dtype(dtype: Any) -> str:
    """One spelling for a dtype from torch, numpy, jax, safetensors or a string.

    ``torch.bfloat16``, ``"bf16"``, ``"BF16"`` and ``ml_dtypes.bfloat16`` all give ``"bfloat16"``.
    """
    if isinstance(dtype, str):
        s = dtype
    else:
        # numpy dtypes / scalar types have .name via np.dtype; torch dtypes print as "torch.x"
        s = str(dtype)
        if s.startswith("<class"):
            try:
                import numpy as np

                s = np.dtype(dtype).name
            except TypeError:
                pass
    if s.startswith("torch."):
        s = s[len("torch.") :]
    if s in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[s]
    s = s.lower()
    return _DTYPE_ALIASES.get(s, s)


def _fmt_shape(shape) -> str:
    return (
        "(" + ", ".join("*" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    )


def _tail(name: str, parts: int) -> str:
    return ".".join(name.replace("/", ".").rsplit(".", parts)[-parts:])


def closest_keys(key: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Names among ``candidates`` most similar to ``key`` (for 'did you mean' messages).

    Cheap on checkpoints of ~1000 long dotted names: a prefix added or dropped is found by
    suffix match; otherwise difflib ranks only names with the same last two components or
    similar last three components.
    """
    cands = list(candidates)
    affix = [c for c in cands if c.endswith(key) or (key.endswith(c) and 2 * len(c) > len(key))]
    if affix:
        return sorted(affix, key=lambda c: abs(len(c) - len(key)))[:n]
    tail = _tail(key, 2)
    same_tail = [c for c in cands if _tail(c, 2) == tail]
    short: dict[str, list[str]] = {}
    for c in cands:
        short.setdefault(_tail(c, 3), []).append(c)
    near_tail = [
        c
        for t in difflib.get_close_matches(_tail(key, 3), list(short), n=4 * n, cutoff=0.5)
        for c in short[t]
    ]
    pool = list(dict.fromkeys(same_tail + near_tail))
    return difflib.get_close_matches(key, pool, n=n, cutoff=0.3)


# --------------------------------------------------------------------------------------------
# safetensors header (no torch needed; also used by the calibration fingerprint)

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse and check the header of a .safetensors file without reading tensor data.

    Returns ``(header, data_start)``: the header dict (tensor name -> {dtype, shape,
    data_offsets}, plus an optional ``__metadata__``) and the byte offset where data begins.
    Raises ``CheckpointError`` naming the file for a truncated file, a garbage header, or offsets
    that point past the end of the file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes, too short for a safetensors file (an 8-byte header "
                    "length comes first). The file is truncated or not a safetensors file; "
                    "copy or download it again."
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
                raise CheckpointError(
                    f"{path}: header length field says {n} bytes but the file has {size} bytes. "
                    "The file is truncated or not a safetensors file; copy or download it again."
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint file: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({e}). The file is corrupt or not "
            "a safetensors file; copy or download it again."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is a {type(header).__name__}, expected an object."
        )
    data_start = 8 + n
    data_size = size - data_start
    furthest = 0
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(
            f"{path}: the safetensors __metadata__ must map strings to strings, found {meta!r:.200}"
        )
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"{path}: header entry for tensor {name!r} is malformed ({e!r}); expected "
                "{dtype, shape, data_offsets}. The file is corrupt."
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = DTYPE_ITEMSIZE.get(SAFETENSORS_DTYPES.get(dtype, ""))
        if begin < 0 or end < begin or (itemsize is not None and end - begin != numel * itemsize):
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) has data_offsets [{begin}, {end}], "
                f"which do not match its size ({numel} elements). The file is corrupt."
            )
        furthest = max(furthest, end)
    if furthest > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor data should extend to byte {data_start + furthest} but the "
            f"file has {size} bytes ({data_start + furthest - size} bytes missing). Copy or download it again."
        )
    return header, data_start


# --------------------------------------------------------------------------------------------
# sources

_INDEX_RE = re.compile(r"^(?P<base>.*)\[(?P<idx>\s*-?\d+\s*(?:,\s*-?\d+\s*)*)\]$")


def split_index(key: str) -> tuple[str, tuple[int, ...] | None]:
    """``"a/b/kernel[3]"`` -> ``("a/b/kernel", (3,))``: row 3 of a layer-stacked array;
    ``"kv_einsum/w[3,0]"`` -> ``("kv_einsum/w", (3, 0))``."""
    m = _INDEX_RE.match(key)
    if m is None:
        return key, None
    return m.group("base"), tuple(int(x) for x in m.group("idx").split(","))


class WeightSource:
    """A read-only, lazily read collection of named tensors.

    Subclasses implement ``keys()``, ``_meta(name)`` and ``_read(name, index)`` (``index`` is
    ``None`` or a tuple of ints). A key may end in ``[i]`` (or ``[i, j]``) to take row ``i`` of
    a stacked array (jax checkpoints stack layers); sources read only that row where they can.
    """

    def keys(self) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def _meta(self, name: str) -> TensorMeta:
        raise NotImplementedError

    def _read(self, name: str, index: int | None):
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return split_index(key)[0] in self._key_set()

    def _key_set(self) -> set[str]:
        ks = getattr(self, "_keys_cache", None)
        if ks is None:
            ks = set(self.keys())
            self._keys_cache = ks
        return ks

    def meta(self, key: str) -> TensorMeta:
        name, index = split_index(key)
        self._require(name)
        m = self._meta(name)
        if index is None:
            return m
        shape = m.shape
        if len(index) > len(shape) or not all(-d <= j < d for j, d in zip(index, shape, strict=False)):
            raise CheckpointError(
                f"{self.describe()}: key {key!r} takes [{', '.join(map(str, index))}] of {name!r}, whose "
                f"shape is {_fmt_shape(shape)}. Check the layer count of the spec."
            )
        return TensorMeta(shape[len(index) :], m.dtype)

    def read(self, key: str):
        name, index = split_index(key)
        self._require(name)
        if index is not None:
            self.meta(key)  # range check with a clear message
        return self._read(name, index)

    def _require(self, name: str) -> None:
        if name not in self._key_set():
            raise CheckpointError(missing_key_message([name], self))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def missing_key_message(
    keys: Sequence[str], source: WeightSource, labels: Sequence[str] | None = None
) -> str:
    present = sorted(source._key_set())
    lines = [f"{source.describe()}: {len(keys)} key(s) the weight spec needs are not in the checkpoint:"]
    for j, k in enumerate(keys[:10]):
        close = closest_keys(k, present)
        hint = f"; closest present: {', '.join(repr(c) for c in close)}" if close else ""
        where = f" (for {labels[j]})" if labels else ""
        lines.append(f"  missing {k!r}{where}{hint}")
    if len(keys) > 10:
        lines.append(f"  ... and {len(keys) - 10} more")
    lines.append(
        "Is this a checkpoint of the right model and format? If the names differ only by a prefix, "
        "pass strip_prefix= to the source; keys that may be absent need Item(..., optional=True)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# templates


class _Scope(dict):
    def __missing__(self, k):
        raise ConfigError(
            f"weight spec template uses {{{k}}} but no such parameter is set; known parameters: "
            f"{', '.join(sorted(self)) or '(none)'}. Pass it in ModelWeightSpec(params=...), "
            "LayerBlock(params=...) or WeightLoader(params=...)."
        )


def format_template(template: str, scope: Mapping[str, Any]) -> str:
    """``str.format`` with a clear error for an unknown ``{name}``; a string without braces is
    returned as is."""
    if "{" not in template:
        return template
    try:
        return string.Formatter().vformat(template, (), _Scope(scope))
    except (ValueError, IndexError) as e:
        raise ConfigError(f"weight spec template {template!r} is malformed: {e}") from None


# --------------------------------------------------------------------------------------------
# the spec: data


class Transform:
    """One step of an item's pipeline: ``apply(value, ctx) -> value``.

    ``value`` is one tensor (an item with one key) or a list of tensors (several keys) until a
    combining transform (Cat, FusedQKV, ...) turns it into one. ``source_keys()`` lists extra
    checkpoint keys (templates) the transform reads through ``ctx.read``, so the loader can
    check them up front.
    """

    def apply(self, value, ctx: LoadContext):
        raise NotImplementedError

    def source_keys(self) -> Sequence[str]:
        return ()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({args})"


class ElementwiseTransform(Transform):
    """A transform of one tensor; on a list it maps over the elements (``on=`` picks which,
    e.g. ``InterleaveQK(head_dim=256, on=(0, 1))`` touches q and k, not v)."""

    def __init__(self, *, on: Sequence[int] | None = None):
        self.on = tuple(on) if on is not None else None

    def one(self, x, ctx: LoadContext):
        raise NotImplementedError

    def apply(self, value, ctx):
        if isinstance(value, list):
            return [self.one(v, ctx) if self.on is None or j in self.on else v for j, v in enumerate(value)]
        return self.one(value, ctx)


class ScaleRecordingQuant(Transform):
    """Per-tensor quantisation whose scale is recorded on the load target: ``scale_into=`` appends
    it to that list attribute (a new list each load), ``scale_attr=`` sets it as an attribute;
    either name may use templates. A subclass gives ``quantize(value) -> (q, scale)`` and
    ``one_value``, what it takes and how several keys' values are combined first."""

    one_value = "one tensor"

    def __init__(self, scale_into: str | None = None, *, scale_attr: str | None = None):
        if scale_into is None and scale_attr is None:
            raise ConfigError(
                f"{type(self).__name__} needs scale_into= (list attribute) or scale_attr= (attribute) for its scale"
            )
        self.scale_into = scale_into
        self.scale_attr = scale_attr

    def quantize(self, value) -> tuple[Any, float]:
        raise NotImplementedError

    def apply(self, value, ctx):
        if isinstance(value, list):
            raise ConfigError(f"{type(self).__name__} takes {self.one_value}")
        q, scale = self.quantize(value)
        if self.scale_into is not None:
            append_target(ctx.target, ctx.fmt(self.scale_into), scale, ctx)
        if self.scale_attr is not None:
            set_target(ctx.target, ctx.fmt(self.scale_attr), scale)
        return q


def set_target(target: Any, name: str, value: Any) -> None:
    """Store on the load target: ``target[name] = value`` for a dict, else ``setattr``."""
    if isinstance(target, MutableMapping):
        target[name] = value
    else:
        setattr(target, name, value)


def append_target(target: Any, name: str, value: Any, ctx: LoadContext | None = None) -> None:
    """Append to the list ``name`` of the target.

    With ``ctx`` (inside a load) the list is started afresh on its first append of each run, so
    loading twice never leaves layers or scales doubled; without it, an existing list is
    extended (created if absent)."""
    fresh = ctx is not None and not ctx.state(("list", name)).get("started")
    lst = target.get(name) if isinstance(target, MutableMapping) else getattr(target, name, None)
    if lst is not None and not isinstance(lst, list):
        raise ConfigError(
            f"{name!r} of the load target is a {type(lst).__name__}, expected a list to append to"
        )
    if lst is None or fresh:
        lst = []
        set_target(target, name, lst)
        if ctx is not None:
            ctx.state(("list", name))["started"] = True
    lst.append(value)


class Sink:
    """Where an item's final value goes: ``store(value, ctx)``. A sink that needs to see every
    item first (FlatCat) keeps state in ``ctx.state(...)`` and registers ``ctx.on_finish``."""

    def store(self, value, ctx: LoadContext) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({args})"


def _as_shapes(shape, n_keys: int):
    if shape is None:
        return [None] * n_keys
    shape = list(shape)
    # a list of shapes (one per key) holds tuples; a single shape holds ints / names / None
    if any(isinstance(s, (tuple, list)) for s in shape) and all(
        isinstance(s, (tuple, list)) or s is None for s in shape
    ):
        if len(shape) != n_keys:
            raise ConfigError(
                f"Item got {len(shape)} shapes for {n_keys} keys; give one per key or one for all."
            )
        return [tuple(s) if s is not None else None for s in shape]
    return [tuple(shape)] * n_keys


class Item:
    """One target tensor: source key(s) -> transforms -> sink.

    Args:
        keys: a checkpoint key or a list of keys; templates with ``{i}`` (layer index) and any
            parameter of the spec / block / loader, e.g. ``"{prefix}.q_proj.weight"``. A key
            ending in ``[i]`` takes row i of a stacked tensor.
        transforms: applied in order (see ``torch_weights`` / ``jax_weights``).
        sink: where the result goes (``Attr("q_w")``, ``TensorList("qkv_w")``, ...).
        shape: expected shape of each source tensor (``None`` entries are wildcards), or a list
            with one shape per key; a mismatch is a ``CheckpointError`` before any data is read.
            May contain parameter names as strings (``("hidden", "hidden")``).
        dtype: expected dtype of each source tensor (any spelling: ``"bf16"``, ``torch.float32``).
        optional: if a key is absent, skip the item instead of failing.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        transforms: Sequence[Transform] = (),
        sink: Sink | None = None,
        *,
        shape=None,
        dtype: Any = None,
        optional: bool = False,
    ):
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        if not self.keys or not all(isinstance(k, str) for k in self.keys):
            raise ConfigError(f"Item keys must be a string or a non-empty list of strings, got {keys!r}")
        if isinstance(transforms, Transform):
            transforms = (transforms,)
        self.transforms = tuple(transforms)
        for t in self.transforms:
            if not hasattr(t, "apply"):
                raise ConfigError(f"Item({self.keys[0]!r}): {t!r} is not a transform (it has no apply()).")
        if sink is None or not hasattr(sink, "store"):
            raise ConfigError(f"Item({self.keys[0]!r}) needs a sink such as Attr('name'), got {sink!r}.")
        self.sink = sink
        self.shapes = _as_shapes(shape, len(self.keys))
        self.dtype = canonical_dtype(dtype) if dtype is not None else None
        self.optional = bool(optional)

    def __repr__(self) -> str:
        keys = self.keys[0] if len(self.keys) == 1 else list(self.keys)
        extra = ", optional=True" if self.optional else ""
        return f"Item({keys!r}, {list(self.transforms)!r}, {self.sink!r}{extra})"


class LayerBlock:
    """The same items repeated for layer ``i = start .. start+count-1``.

    Args:
        count: number of layers: an int or the name of a parameter (``"num_layers"``).
        items: Items (or nested LayerBlocks, with another ``var``).
        var: the template variable that carries the layer index (default ``"i"``).
        start: first index.
        params: extra template parameters for this block, themselves templates resolved per
            layer, e.g. ``{"layer": "{prefix}.layers.{i}"}``.
    """

    def __init__(
        self,
        count: int | str,
        items: Sequence[Item | LayerBlock],
        *,
        var: str = "i",
        start: int = 0,
        params: Mapping[str, Any] | None = None,
    ):
        self.count = count
        self.items = list(items)
        self.var = var
        self.start = int(start)
        self.params = dict(params or {})
        for it in self.items:
            if not isinstance(it, (Item, LayerBlock)):
                raise ConfigError(f"LayerBlock items must be Item or LayerBlock, got {it!r}")

    def resolve_count(self, scope: Mapping[str, Any]) -> int:
        n = self.count
        if isinstance(n, str):
            n = format_template(n, scope) if "{" in n else _Scope(scope)[n]
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise ConfigError(f"LayerBlock count {self.count!r} resolved to {n!r}, not an integer") from None
        if n < 0:
            raise ConfigError(f"LayerBlock count {self.count!r} resolved to {n}, expected >= 0")
        return n

    def __repr__(self) -> str:
        return f"LayerBlock({self.count!r}, <{len(self.items)} items>, var={self.var!r})"


@dataclass
class PlannedItem:
    """An Item with its templates resolved for one scope (one layer)."""

    item: Item
    keys: tuple[str, ...]
    extra_keys: tuple[str, ...]
    shapes: list
    scope: dict

    @property
    def label(self) -> str:
        return self.keys[0] if len(self.keys) == 1 else "[" + ", ".join(self.keys) + "]"


class ModelWeightSpec:
    """A model's checkpoint key map, as data.

    Args:
        entries: Items and LayerBlocks, loaded in this order.
        params: default template parameters (``{"prefix": "model.", "num_layers": 18}``);
            ``WeightLoader(params=...)`` overrides them.
        ignore_unused: glob patterns of checkpoint keys this model knowingly does not use
            (e.g. ``"*.lm_head.weight"``); they are not reported as leftovers.
        name: shown in the progress bar and messages.
    """

    def __init__(
        self,
        entries: Sequence[Item | LayerBlock],
        *,
        params: Mapping[str, Any] | None = None,
        ignore_unused: Sequence[str] = (),
        name: str = "",
    ):
        self.entries = list(entries)
        for e in self.entries:
            if not isinstance(e, (Item, LayerBlock)):
                raise ConfigError(f"ModelWeightSpec entries must be Item or LayerBlock, got {e!r}")
        self.params = dict(params or {})
        self.ignore_unused = tuple(ignore_unused)
        self.name = name

    def plan(self, params: Mapping[str, Any] | None = None) -> list[PlannedItem]:
        """Every item with its templates resolved, in load order."""
        scope = {**self.params, **(params or {})}
        out: list[PlannedItem] = []
        self._expand(self.entries, scope, out)
        return out

    def _expand(self, entries, scope, out):
        for e in entries:
            if isinstance(e, Item):
                keys = tuple(format_template(k, scope) for k in e.keys)
                extra = tuple(format_template(k, scope) for t in e.transforms for k in t.source_keys())
                shapes = [None if s is None else tuple(_resolve_dim(d, scope) for d in s) for s in e.shapes]
                out.append(PlannedItem(e, keys, extra, shapes, dict(scope)))
            else:
                n = e.resolve_count(scope)
                for i in range(e.start, e.start + n):
                    inner = dict(scope)
                    inner[e.var] = i
                    for k, v in e.params.items():
                        inner[k] = format_template(v, inner) if isinstance(v, str) else v
                    self._expand(e.items, inner, out)

    def source_keys(self, params: Mapping[str, Any] | None = None) -> list[str]:
        """All checkpoint keys the spec reads (resolved), in order, without duplicates."""
        seen: dict[str, None] = {}
        for p in self.plan(params):
            for k in p.keys + p.extra_keys:
                seen.setdefault(k)
        return list(seen)

    def __repr__(self) -> str:
        return f"ModelWeightSpec({self.name!r}, {len(self.entries)} entries, params={self.params!r})"


def _resolve_dim(d, scope):
    if d is None or isinstance(d, int):
        return d
    if isinstance(d, str):
        v = format_template(d, scope) if "{" in d else _Scope(scope)[d]
        return int(v)
    raise ConfigError(f"shape entries must be int, None or a parameter name, got {d!r}")


# --------------------------------------------------------------------------------------------
# the loader: code


class LoadContext:
    """What a transform or sink sees: the target object, the template scope of the current
    item (``ctx.scope["i"]`` is the layer), and helpers to read extra keys and keep state."""

    def __init__(self, loader: WeightLoader, planned: PlannedItem):
        self.loader = loader
        self.target = loader.target
        self.planned = planned
        self.scope = planned.scope
        self.keys = planned.keys

    def fmt(self, template: str) -> str:
        return format_template(template, self.scope)

    def read(self, key_template: str):
        """Read another checkpoint tensor (templated); it counts as used."""
        return self.loader._read(self.fmt(key_template))

    def state(self, key: Any) -> dict:
        return self.loader._sink_state.setdefault(key, {})

    def on_finish(self, key: Any, fn) -> None:
        """Call ``fn()`` once after all items are loaded (registered once per key)."""
        self.loader._finishers.setdefault(key, fn)


@dataclass
class LoadReport:
    """What ``WeightLoader.run()`` did."""

    items_loaded: int = 0
    tensors_read: int = 0
    skipped_optional: list[str] = field(default_factory=list)
    unused_keys: list[str] = field(default_factory=list)
    seconds: float = 0.0


class WeightLoader:
    """Executes a ``ModelWeightSpec`` against a source, storing results on ``target``.

    Args:
        source: a ``WeightSource`` (``SafetensorsSource``, ``DictSource``, ``OrbaxDictSource``).
        spec: the ``ModelWeightSpec``.
        target: what sinks write to: an object (usually the frontend or pipeline, ``self``;
            attributes are set) or a dict (items are set). Default: a new dict, returned by
            ``load()``.
        params: template parameters, overriding the spec's.
        unused: what to do with checkpoint keys the spec never read: ``"warn"`` (default: a
            ``UserWarning``), ``"log"`` (a ``logging`` warning), ``"ignore"`` or ``"error"``
            (``CheckpointError``). ``unused_keys()`` returns them either way.
        progress: ``"auto"`` (default) shows a tqdm bar on stderr once a load has taken over a
            second; ``True`` shows it at once, ``False`` never.
    """

    PROGRESS_DELAY_S = 1.0
    _UNUSED_POLICIES = ("warn", "log", "ignore", "error")

    def __init__(
        self,
        source: WeightSource,
        spec: ModelWeightSpec,
        target: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        unused: str = "warn",
        progress: bool | str = "auto",
    ):
        if unused not in self._UNUSED_POLICIES:
            raise ConfigError(f"unused={unused!r}; expected one of {self._UNUSED_POLICIES}")
        if progress not in (True, False, "auto"):
            raise ConfigError(f"progress={progress!r}; expected True, False or 'auto'")
        if not isinstance(spec, ModelWeightSpec):
            raise ConfigError(f"spec must be a ModelWeightSpec, got {type(spec).__name__}")
        self.source = source
        self.spec = spec
        self.target = {} if target is None else target
        self.params = dict(params or {})
        self.unused = unused
        self.progress = progress
        self._used: set[str] = set()
        self._sink_state: dict = {}
        self._finishers: dict = {}
        self.report: LoadReport | None = None

    # -- checks ------------------------------------------------------------------------------

    def check(self) -> list[PlannedItem]:
        """Resolve the plan and check every key, shape and dtype against the source's metadata,
        reading no tensor data. Returns the items that will load (optional ones whose keys are
        absent are left out). Raises ``CheckpointError`` listing every problem found."""
        return self._check()[0]

    def _check(self) -> tuple[list[PlannedItem], list[PlannedItem]]:
        plan = self.spec.plan(self.params)
        src = self.source
        missing, missing_labels, problems, runnable, skipped = [], [], [], [], []
        for p in plan:
            absent = [k for k in p.keys + p.extra_keys if k not in src]
            if absent:
                if p.item.optional:
                    skipped.append(p)
                    continue
                for k in absent:
                    if k not in missing:
                        missing.append(k)
                        missing_labels.append(f"sink {p.item.sink!r}")
                continue
            for k, shape in zip(p.keys, p.shapes, strict=True):
                try:
                    m = src.meta(k)
                except CheckpointError as e:
                    problems.append(str(e))
                    continue
                if shape is not None and not _shape_matches(m.shape, shape):
                    problems.append(
                        f"  {k!r}: expected shape {_fmt_shape(shape)}, found {_fmt_shape(m.shape)}"
                    )
                if p.item.dtype is not None and m.dtype != p.item.dtype:
                    problems.append(f"  {k!r}: expected dtype {p.item.dtype}, found {m.dtype}")
            runnable.append(p)
        msgs = []
        if missing:
            msgs.append(missing_key_message(missing, src, missing_labels))
        if problems:
            msgs.append(
                f"{src.describe()}: {len(problems)} tensor(s) do not match the weight spec:\n"
                + "\n".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
                + "\nIs this a checkpoint of the model variant the options describe (layer count, widths)?"
            )
        if msgs:
            raise CheckpointError("\n".join(msgs))
        return runnable, skipped

    # -- run ---------------------------------------------------------------------------------

    def run(self) -> LoadReport:
        """Check, then load every item. Returns a ``LoadReport`` (also at ``self.report``)."""
        t0 = time.perf_counter()
        runnable, skipped = self._check()
        report = LoadReport(skipped_optional=[p.label for p in skipped])
        self._used.clear()
        self._sink_state.clear()
        self._finishers.clear()
        bar = self._progress_bar(len(runnable))
        try:
            for p in runnable:
                self._load_one(p, report)
                bar.update(1)
            for key, fn in self._finishers.items():
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - reported with context
                    raise CheckpointError(f"while finishing sink {key!r}: {type(e).__name__}: {e}") from e
        finally:
            bar.close()
        report.unused_keys = self.unused_keys()
        report.seconds = time.perf_counter() - t0
        self.report = report
        self._report_unused(report.unused_keys)
        return report

    def load(self):
        """``run()``, then return the target (the dict of loaded tensors by default)."""
        self.run()
        return self.target

    def _progress_bar(self, total: int):
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=f"loading {self.spec.name or 'weights'}",
            unit="tensor",
            file=sys.stderr,
            delay=0.0 if self.progress is True else self.PROGRESS_DELAY_S,
            disable=self.progress is False,
            leave=False,
        )

    def _read(self, key: str):
        t = self.source.read(key)
        self._used.add(split_index(key)[0])
        return t

    def _load_one(self, p: PlannedItem, report: LoadReport) -> None:
        ctx = LoadContext(self, p)
        tensors = [self._read(k) for k in p.keys]
        report.tensors_read += len(tensors)
        value = tensors[0] if len(tensors) == 1 else tensors
        step = None
        try:
            for step in p.item.transforms:
                value = step.apply(value, ctx)
            step = p.item.sink
            p.item.sink.store(value, ctx)
        except Exception as e:
            layer = f" (layer {p.scope['i']})" if "i" in p.scope else ""
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{p.label}{layer}: {e}") from e
            raise CheckpointError(
                f"{p.label}{layer}: {step!r} failed: {type(e).__name__}: {e}. The tensor does not "
                "fit what the spec expects of it; check the model options against the checkpoint."
            ) from e
        report.items_loaded += 1

    # -- leftovers ---------------------------------------------------------------------------

    def unused_keys(self) -> list[str]:
        """Checkpoint keys no item read (minus the spec's ``ignore_unused`` patterns)."""
        pats = self.spec.ignore_unused
        return sorted(
            k
            for k in self.source.keys()
            if k not in self._used and not any(fnmatch.fnmatchcase(k, pat) for pat in pats)
        )

    def _report_unused(self, unused: list[str]) -> None:
        if not unused or self.unused == "ignore":
            return
        shown = ", ".join(unused[:20]) + (f", ... ({len(unused) - 20} more)" if len(unused) > 20 else "")
        msg = (
            f"{self.source.describe()}: {len(unused)} checkpoint key(s) were not used by the weight "
            f"spec{' ' + self.spec.name if self.spec.name else ''}: {shown}"
        )
        if self.unused == "error":
            raise CheckpointError(msg + ". Add them to ModelWeightSpec(ignore_unused=...) if expected.")
        if self.unused == "warn":
            warnings.warn(msg, UserWarning, stacklevel=3)
        else:
            log.warning(msg)


def _shape_matches(found: Sequence[int], expected: Sequence[int | None]) -> bool:
    return len(found) == len(expected) and all(
        e is None or e == f for f, e in zip(found, expected, strict=True)
    )
