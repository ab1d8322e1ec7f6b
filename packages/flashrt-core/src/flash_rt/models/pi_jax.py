"""openpi JAX checkpoints (``<ckpt>/params/``, an orbax PyTree ``{"params": tree}``) <-> openpi-PyTorch names.

The key map is a table: each row names a PyTorch tensor template, the JAX array it comes from, the
index into that array (layers are stacked on a leading axis by ``nn.scan``; ``i`` is the layer)
and a layout transform. Expert arrays carry a ``_1`` suffix. Transforms, JAX -> PyTorch:

  T         Dense kernel (in, out) -> Linear weight (out, in)
  conv      patch kernel (kh, kw, cin, cout) -> (cout, cin, kh, kw)
  pos       (1, N, W) -> (N, W)
  heads_in  SigLIP q/k/v kernel (W, H, D) -> (H*D, W);   heads_bias (H, D) -> (H*D,)
  heads_out SigLIP out kernel (H, D, W) and Gemma attn_vec_einsum (H, D, W) -> (W, H*D)
  einsum    Gemma q_einsum (H, W, D) and kv_einsum[i, k|v] (KV, W, D) -> (H*D, W)

The LM head is the embedding (tied); no row produces it. Reading needs the optional
``orbax-checkpoint`` package (``pip install flashrt-core[jax]``), imported here only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flash_rt.errors import CheckpointError, ConfigError
from flash_rt.models.pi_config import GemmaDims, PiConfig, VisionDims
from flash_rt.models.pi_params import EXPERT, LLM, PALIGEMMA, VISION, ExpectedTensor, expected_tensors


@dataclass(frozen=True)
class JaxRow:
    torch: str  # template with {i}
    jax: str  # "/"-joined path under "params"
    index: tuple = ()  # ("i", 0) etc. into the JAX array
    transform: str = "id"


def _dense(torch_prefix: str, jax_prefix: str, index=()) -> list[JaxRow]:
    return [JaxRow(torch_prefix + ".weight", jax_prefix + "/kernel", index, "T"),
            JaxRow(torch_prefix + ".bias", jax_prefix + "/bias", index)]


def _gemma_rows(torch_prefix: str, suffix: str, adaptive: bool) -> list[JaxRow]:
    layer, jl = torch_prefix + "layers.{i}.", "PaliGemma/llm/layers/"
    rows = [
        JaxRow(layer + "self_attn.q_proj.weight", f"{jl}attn/q_einsum{suffix}/w", ("i",), "einsum"),
        JaxRow(layer + "self_attn.k_proj.weight", f"{jl}attn/kv_einsum{suffix}/w", ("i", 0), "einsum"),
        JaxRow(layer + "self_attn.v_proj.weight", f"{jl}attn/kv_einsum{suffix}/w", ("i", 1), "einsum"),
        JaxRow(layer + "self_attn.o_proj.weight", f"{jl}attn/attn_vec_einsum{suffix}/w", ("i",), "heads_out"),
        JaxRow(layer + "mlp.gate_proj.weight", f"{jl}mlp{suffix}/gating_einsum", ("i", 0), "T"),
        JaxRow(layer + "mlp.up_proj.weight", f"{jl}mlp{suffix}/gating_einsum", ("i", 1), "T"),
        JaxRow(layer + "mlp.down_proj.weight", f"{jl}mlp{suffix}/linear", ("i",), "T"),
    ]
    norms = (("input_layernorm", f"{jl}pre_attention_norm{suffix}", ("i",)),
             ("post_attention_layernorm", f"{jl}pre_ffw_norm{suffix}", ("i",)),
             ("norm", f"PaliGemma/llm/final_norm{suffix}", ()))
    for name, jax, index in norms:
        torch_name = (layer if index else torch_prefix) + name
        if adaptive:
            rows += _dense(torch_name + ".dense", jax + "/Dense_0", index)
        else:
            rows.append(JaxRow(torch_name + ".weight", jax + "/scale", index))
    return rows


_VB = "PaliGemma/img/Transformer/encoderblock/"
_VL = VISION + "encoder.layers.{i}."
_VISION_ROWS = [
    JaxRow(VISION + "embeddings.patch_embedding.weight", "PaliGemma/img/embedding/kernel", (), "conv"),
    JaxRow(VISION + "embeddings.patch_embedding.bias", "PaliGemma/img/embedding/bias"),
    JaxRow(VISION + "embeddings.position_embedding.weight", "PaliGemma/img/pos_embedding", (), "pos"),
    JaxRow(_VL + "layer_norm1.weight", _VB + "LayerNorm_0/scale", ("i",)),
    JaxRow(_VL + "layer_norm1.bias", _VB + "LayerNorm_0/bias", ("i",)),
    JaxRow(_VL + "layer_norm2.weight", _VB + "LayerNorm_1/scale", ("i",)),
    JaxRow(_VL + "layer_norm2.bias", _VB + "LayerNorm_1/bias", ("i",)),
    *(row for proj, jax in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
      for row in (JaxRow(_VL + f"self_attn.{proj}.weight", _VB + f"MultiHeadDotProductAttention_0/{jax}/kernel",
                         ("i",), "heads_in"),
                  JaxRow(_VL + f"self_attn.{proj}.bias", _VB + f"MultiHeadDotProductAttention_0/{jax}/bias",
                         ("i",), "heads_bias"))),
    JaxRow(_VL + "self_attn.out_proj.weight", _VB + "MultiHeadDotProductAttention_0/out/kernel", ("i",),
           "heads_out"),
    JaxRow(_VL + "self_attn.out_proj.bias", _VB + "MultiHeadDotProductAttention_0/out/bias", ("i",)),
    *_dense(_VL + "mlp.fc1", _VB + "MlpBlock_0/Dense_0", ("i",)),
    *_dense(_VL + "mlp.fc2", _VB + "MlpBlock_0/Dense_1", ("i",)),
    JaxRow(VISION + "post_layernorm.weight", "PaliGemma/img/Transformer/encoder_norm/scale"),
    JaxRow(VISION + "post_layernorm.bias", "PaliGemma/img/Transformer/encoder_norm/bias"),
    *_dense(PALIGEMMA + "multi_modal_projector.linear", "PaliGemma/img/head"),
    JaxRow(LLM + "embed_tokens.weight", "PaliGemma/llm/embedder/input_embedding"),
]
_HEADS = {"pi05": ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"),
          "pi0": ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out")}


def jax_rows(model_type: str) -> list[JaxRow]:
    return [*_VISION_ROWS, *_gemma_rows(LLM, "", adaptive=False),
            *_gemma_rows(EXPERT, "_1", adaptive=model_type == "pi05"),
            *(row for head in _HEADS[model_type] for row in _dense(head, head))]


# -- layout transforms: JAX slot -> PyTorch, and back given the JAX slot shape ---------------------
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda x: x,
    "T": lambda x: x.T,
    "conv": lambda x: x.transpose(3, 2, 0, 1),
    "pos": lambda x: x.reshape(x.shape[-2], x.shape[-1]),
    "heads_in": lambda x: x.reshape(x.shape[0], -1).T,
    "heads_bias": lambda x: x.reshape(-1),
    "heads_out": lambda x: x.reshape(-1, x.shape[-1]).T,
    "einsum": lambda x: x.transpose(0, 2, 1).reshape(-1, x.shape[1]),
}
_TO_JAX: dict[str, Callable[[np.ndarray, tuple], np.ndarray]] = {
    "id": lambda x, s: x.reshape(s),
    "T": lambda x, s: x.T.reshape(s),
    "conv": lambda x, s: x.transpose(2, 3, 1, 0),
    "pos": lambda x, s: x.reshape(s),
    "heads_in": lambda x, s: x.T.reshape(s),
    "heads_bias": lambda x, s: x.reshape(s),
    "heads_out": lambda x, s: x.T.reshape(s),
    "einsum": lambda x, s: x.reshape(s[0], s[2], s[1]).transpose(0, 2, 1),
}


def _index(row: JaxRow, layer: int | None) -> tuple:
    return tuple(layer if k == "i" else k for k in row.index)


def _template_layers(config: PiConfig) -> dict[str, list[ExpectedTensor]]:
    by_template: dict[str, list[ExpectedTensor]] = {}
    for tensor in expected_tensors(config):
        by_template.setdefault(tensor.template, []).append(tensor)
    return by_template


# -- reading ------------------------------------------------------------------------------------
def _orbax():
    try:
        import orbax.checkpoint as ocp  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            "reading or writing an openpi JAX checkpoint needs the optional orbax-checkpoint package: "
            "pip install 'flashrt-core[jax]' (or convert it with openpi's convert_jax_model_to_pytorch.py)"
        ) from exc
    return ocp


def _flatten(tree, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    # Params saved from an nnx.State end every path in "value"; openpi drops it, so do we.
    if flat and all(p.endswith("/value") for p in flat):
        flat = {p[: -len("/value")]: v for p, v in flat.items()}
    return flat


def restore_flat(params_dir: Path) -> dict[str, np.ndarray]:
    """Every array of the orbax params checkpoint as numpy, keyed by "/"-joined path under "params"."""
    ocp = _orbax()
    import jax  # noqa: PLC0415

    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(params_dir)
            tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None) or metadata
            if "params" not in tree:
                raise CheckpointError(f"{params_dir}: expected an orbax tree {{'params': ...}}, found {list(tree)}")
            item = {"params": tree["params"]}
            restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item)
            restored = checkpointer.restore(params_dir, ocp.args.PyTreeRestore(item=item,
                                                                               restore_args=restore_args))
    except CheckpointError:
        raise
    except Exception as exc:  # orbax / tensorstore raise many types for a damaged checkpoint
        raise CheckpointError(f"cannot read the orbax checkpoint {params_dir}: {type(exc).__name__}: {exc}") from exc
    return {path: np.asarray(value) for path, value in _flatten(restored["params"]).items()}


class JaxSource:
    """openpi-PyTorch-named tensors converted from the JAX arrays (same interface as the safetensors source)."""

    def __init__(self, flat: dict[str, np.ndarray], model_type: str, where: str):
        import torch  # noqa: PLC0415

        self.jax_shapes = {p: tuple(a.shape) for p, a in flat.items()}
        self._tensors: dict[str, torch.Tensor] = {}
        used = set()
        for row in jax_rows(model_type):
            if row.jax not in flat:
                continue
            used.add(row.jax)
            array = flat[row.jax]
            layers = range(array.shape[0]) if "i" in row.index else [None]
            for layer in layers:
                value = _TO_TORCH[row.transform](array[_index(row, layer)])
                name = row.torch.format(i=layer) if layer is not None else row.torch
                self._tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        unknown = sorted(set(flat) - used)
        if unknown:
            raise CheckpointError(f"{where}: {len(unknown)} array(s) a {model_type} model does not have, e.g. "
                                  f"{unknown[:3]}")

    def names(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str):
        value = self._tensors[name]
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")

    def read(self, name: str):
        return self._tensors[name]


def model_type_of_tree(shapes: dict, where: str) -> str:
    if "time_mlp_in/kernel" in shapes:
        return "pi05"
    if "state_proj/kernel" in shapes:
        return "pi0"
    raise CheckpointError(f"{where}: neither time_mlp_in (Pi0.5) nor state_proj (Pi0) is in the parameter tree; "
                          f"not a Pi0/Pi0.5 checkpoint")


def open_params(params_dir: Path):
    """(source, jax shapes) of an openpi params/ directory."""
    flat = restore_flat(params_dir)
    shapes = {p: tuple(a.shape) for p, a in flat.items()}
    model_type = model_type_of_tree(shapes, str(params_dir))
    return JaxSource(flat, model_type, str(params_dir)), shapes


def _need(shapes: dict, path: str, where: str) -> tuple:
    if path not in shapes:
        raise CheckpointError(f"{where}: array {path} is missing from the parameter tree")
    return shapes[path]


def infer_config(source: JaxSource, model_type: str, shapes: dict) -> PiConfig:
    """Dims read off the array shapes (a JAX checkpoint carries no config). The action horizon and
    token budget are not in the weights: openpi's defaults (50; 200 for Pi0.5, 48 for Pi0) apply."""
    where = "openpi JAX checkpoint"

    def gemma(suffix: str) -> GemmaDims:
        q = _need(shapes, f"PaliGemma/llm/layers/attn/q_einsum{suffix}/w", where)
        kv = _need(shapes, f"PaliGemma/llm/layers/attn/kv_einsum{suffix}/w", where)
        gating = _need(shapes, f"PaliGemma/llm/layers/mlp{suffix}/gating_einsum", where)
        return GemmaDims(width=q[2], depth=q[0], mlp_dim=gating[3], num_heads=q[1], num_kv_heads=kv[2],
                         head_dim=q[3])

    patch = _need(shapes, "PaliGemma/img/embedding/kernel", where)
    query = _need(shapes, _VB + "MultiHeadDotProductAttention_0/query/kernel", where)
    mlp = _need(shapes, _VB + "MlpBlock_0/Dense_0/kernel", where)
    pos = _need(shapes, "PaliGemma/img/pos_embedding", where)
    side = math.isqrt(pos[-2])
    vision = VisionDims(width=patch[3], depth=query[0], mlp_dim=mlp[2], num_heads=query[2], patch_size=patch[0],
                        image_size=side * patch[0])
    action_dim = _need(shapes, "action_in_proj/kernel", where)[0]
    state_dim = shapes["state_proj/kernel"][0] if model_type == "pi0" else action_dim
    return PiConfig(model_type=model_type, paligemma=gemma(""), expert=gemma("_1"), vision=vision,
                    vocab_size=_need(shapes, "PaliGemma/llm/embedder/input_embedding", where)[0],
                    action_dim=action_dim, max_state_dim=state_dim,
                    max_token_len=200 if model_type == "pi05" else 48)


# -- writing ------------------------------------------------------------------------------------
def build_tree(config: PiConfig, tensor_fn: Callable[[ExpectedTensor], np.ndarray]) -> dict:
    """The nested openpi params tree for ``config`` with values from ``tensor_fn`` (PyTorch layout)."""
    by_template = _template_layers(config)
    rows = jax_rows(config.model_type)
    # JAX shapes: the leading stacked axes from the rows that share an array, the rest from the
    # inverse transform of one PyTorch tensor.
    slots: dict[str, dict[tuple, np.ndarray]] = {}
    for row in rows:
        for tensor in by_template[row.torch]:
            slots.setdefault(row.jax, {})[(row, tensor.layer)] = tensor
    flat: dict[str, np.ndarray] = {}
    for path, entries in slots.items():
        array = None
        for (row, layer), tensor in entries.items():
            value = np.asarray(tensor_fn(tensor), dtype=np.float32)
            slot_shape = _slot_shape(row, value, config)
            if array is None:
                lead = [1 + max(_index(r, lay)[axis] for (r, lay) in entries) for axis in range(len(row.index))]
                array = np.empty((*lead, *slot_shape), dtype=np.float32)
            array[_index(row, layer)] = _TO_JAX[row.transform](value, slot_shape)
        flat[path] = array
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _slot_shape(row: JaxRow, value: np.ndarray, config: PiConfig) -> tuple:
    dims = config.expert if "_1" in row.jax else config.paligemma
    vision = config.vision
    if row.transform == "T":
        return tuple(reversed(value.shape))
    if row.transform == "conv":
        return (value.shape[2], value.shape[3], value.shape[1], value.shape[0])
    if row.transform == "pos":
        return (1, *value.shape)
    if row.transform == "heads_in":
        return (vision.width, vision.num_heads, vision.head_dim)
    if row.transform == "heads_bias":
        return (vision.num_heads, vision.head_dim)
    if row.transform == "heads_out":
        if row.jax.startswith("PaliGemma/img"):
            return (vision.num_heads, vision.head_dim, vision.width)
        return (dims.num_heads, dims.head_dim, dims.width)
    if row.transform == "einsum":
        heads = dims.num_kv_heads if "kv_einsum" in row.jax else dims.num_heads
        return (heads, dims.width, dims.head_dim)
    return tuple(value.shape)


def write_params(params_dir: Path, config: PiConfig, tensor_fn: Callable[[ExpectedTensor], np.ndarray]) -> None:
    """Save an orbax ``{"params": tree}`` checkpoint the way openpi lays it out (the whole tree is
    held once in memory: orbax writes a tree, not a stream)."""
    ocp = _orbax()
    params_dir = Path(params_dir).resolve()
    if params_dir.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(params_dir)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(params_dir, {"params": build_tree(config, tensor_fn)})
