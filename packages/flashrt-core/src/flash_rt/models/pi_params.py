"""The parameters of a Pi0 / Pi0.5 model, as data: name, shape and storage class of every tensor.

Names are the openpi-PyTorch names (lerobot adds a ``model.`` prefix on disk). One table serves the
checkpoint reader (which tensors must be there, with which shapes), the random-checkpoint writer
and the JAX key map. ``{i}`` is a layer index; ``depth`` says which dims give the layer count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flash_rt.models.pi_config import PiConfig

PALIGEMMA = "paligemma_with_expert.paligemma.model."
VISION = PALIGEMMA + "vision_tower.vision_model."
LLM = PALIGEMMA + "language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."

# Tensors some writers save that the model does not use: paligemma's LM head is tied to the
# embedding, the expert's is never called. Readers drop them.
UNUSED_KEYS = (
    "paligemma_with_expert.paligemma.lm_head.weight",
    "paligemma_with_expert.gemma_expert.lm_head.weight",
)

# Storage classes: how lerobot stores each tensor when the policy dtype is bfloat16.
#   "vision" SigLIP + projector (kept fp32), "norm" RMSNorm scales / adaRMS dense (kept fp32),
#   "matrix" Gemma projections and the embedding (policy dtype), "head" action/time/state
#   projections (fp32).
FP32_WHEN_BF16 = ("vision", "norm", "head")

Shape = Callable[[PiConfig], tuple[int, ...]]


@dataclass(frozen=True)
class Param:
    name: str
    shape: Shape
    kind: str
    depth: str | None = None  # "vision" | "paligemma" | "expert": repeated per layer
    models: tuple[str, ...] = ("pi05", "pi0")


def _v(fn):
    return lambda c: fn(c.vision)


def _p(fn):
    return lambda c: fn(c.paligemma)


def _e(fn):
    return lambda c: fn(c.expert)


def _q_out(g):
    return g.num_heads * g.head_dim


def _kv_out(g):
    return g.num_kv_heads * g.head_dim


def _gemma_layer(prefix: str, dims, depth: str, adaptive_models: tuple[str, ...]) -> list[Param]:
    """One Gemma block; ``adaptive_models`` use adaRMS (dense 3*width) instead of scale norms."""
    plain = tuple(m for m in ("pi05", "pi0") if m not in adaptive_models)
    layer = prefix + "layers.{i}."
    rows = [
        Param(layer + "self_attn.q_proj.weight", dims(lambda g: (_q_out(g), g.width)), "matrix", depth),
        Param(layer + "self_attn.k_proj.weight", dims(lambda g: (_kv_out(g), g.width)), "matrix", depth),
        Param(layer + "self_attn.v_proj.weight", dims(lambda g: (_kv_out(g), g.width)), "matrix", depth),
        Param(layer + "self_attn.o_proj.weight", dims(lambda g: (g.width, _q_out(g))), "matrix", depth),
        Param(layer + "mlp.gate_proj.weight", dims(lambda g: (g.mlp_dim, g.width)), "matrix", depth),
        Param(layer + "mlp.up_proj.weight", dims(lambda g: (g.mlp_dim, g.width)), "matrix", depth),
        Param(layer + "mlp.down_proj.weight", dims(lambda g: (g.width, g.mlp_dim)), "matrix", depth),
    ]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        if plain:
            rows.append(Param(layer + norm + ".weight", dims(lambda g: (g.width,)), "norm", depth, plain))
        if adaptive_models:
            rows += [
                Param(layer + norm + ".dense.weight", dims(lambda g: (3 * g.width, g.width)), "norm", depth,
                      adaptive_models),
                Param(layer + norm + ".dense.bias", dims(lambda g: (3 * g.width,)), "norm", depth,
                      adaptive_models),
            ]
    if plain:
        rows.append(Param(prefix + "norm.weight", dims(lambda g: (g.width,)), "norm", None, plain))
    if adaptive_models:
        rows += [
            Param(prefix + "norm.dense.weight", dims(lambda g: (3 * g.width, g.width)), "norm", None,
                  adaptive_models),
            Param(prefix + "norm.dense.bias", dims(lambda g: (3 * g.width,)), "norm", None, adaptive_models),
        ]
    return rows


_VL = VISION + "encoder.layers.{i}."
PARAMS: tuple[Param, ...] = (
    # SigLIP tower + projector
    Param(VISION + "embeddings.patch_embedding.weight",
          _v(lambda v: (v.width, 3, v.patch_size, v.patch_size)), "vision"),
    Param(VISION + "embeddings.patch_embedding.bias", _v(lambda v: (v.width,)), "vision"),
    Param(VISION + "embeddings.position_embedding.weight", _v(lambda v: (v.num_patches, v.width)), "vision"),
    *(Param(_VL + f"{ln}.{wb}", _v(lambda v: (v.width,)), "vision", "vision")
      for ln in ("layer_norm1", "layer_norm2") for wb in ("weight", "bias")),
    *(Param(_VL + f"self_attn.{proj}.weight", _v(lambda v: (v.width, v.width)), "vision", "vision")
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj")),
    *(Param(_VL + f"self_attn.{proj}.bias", _v(lambda v: (v.width,)), "vision", "vision")
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj")),
    Param(_VL + "mlp.fc1.weight", _v(lambda v: (v.mlp_dim, v.width)), "vision", "vision"),
    Param(_VL + "mlp.fc1.bias", _v(lambda v: (v.mlp_dim,)), "vision", "vision"),
    Param(_VL + "mlp.fc2.weight", _v(lambda v: (v.width, v.mlp_dim)), "vision", "vision"),
    Param(_VL + "mlp.fc2.bias", _v(lambda v: (v.width,)), "vision", "vision"),
    Param(VISION + "post_layernorm.weight", _v(lambda v: (v.width,)), "vision"),
    Param(VISION + "post_layernorm.bias", _v(lambda v: (v.width,)), "vision"),
    Param(PALIGEMMA + "multi_modal_projector.linear.weight",
          lambda c: (c.paligemma.width, c.vision.width), "vision"),
    Param(PALIGEMMA + "multi_modal_projector.linear.bias", lambda c: (c.paligemma.width,), "vision"),
    # Gemma LLM (plain RMSNorm) and the action expert (adaRMS in Pi0.5)
    Param(LLM + "embed_tokens.weight", lambda c: (c.vocab_size, c.paligemma.width), "matrix"),
    *_gemma_layer(LLM, _p, "paligemma", adaptive_models=()),
    *_gemma_layer(EXPERT, _e, "expert", adaptive_models=("pi05",)),
    # Action / time / state projections
    Param("action_in_proj.weight", lambda c: (c.expert.width, c.action_dim), "head"),
    Param("action_in_proj.bias", lambda c: (c.expert.width,), "head"),
    Param("action_out_proj.weight", lambda c: (c.action_dim, c.expert.width), "head"),
    Param("action_out_proj.bias", lambda c: (c.action_dim,), "head"),
    Param("time_mlp_in.weight", lambda c: (c.expert.width, c.expert.width), "head", models=("pi05",)),
    Param("time_mlp_in.bias", lambda c: (c.expert.width,), "head", models=("pi05",)),
    Param("time_mlp_out.weight", lambda c: (c.expert.width, c.expert.width), "head", models=("pi05",)),
    Param("time_mlp_out.bias", lambda c: (c.expert.width,), "head", models=("pi05",)),
    Param("state_proj.weight", lambda c: (c.expert.width, c.max_state_dim), "head", models=("pi0",)),
    Param("state_proj.bias", lambda c: (c.expert.width,), "head", models=("pi0",)),
    Param("action_time_mlp_in.weight", lambda c: (c.expert.width, 2 * c.expert.width), "head", models=("pi0",)),
    Param("action_time_mlp_in.bias", lambda c: (c.expert.width,), "head", models=("pi0",)),
    Param("action_time_mlp_out.weight", lambda c: (c.expert.width, c.expert.width), "head", models=("pi0",)),
    Param("action_time_mlp_out.bias", lambda c: (c.expert.width,), "head", models=("pi0",)),
)

# Tensors whose presence tells the model type apart.
MODEL_MARKERS = {"pi05": "time_mlp_in.weight", "pi0": "state_proj.weight"}

LAYER_DEPTH = {
    "vision": lambda c: c.vision.depth,
    "paligemma": lambda c: c.paligemma.depth,
    "expert": lambda c: c.expert.depth,
}
LAYER_PREFIX = {"vision": VISION + "encoder.layers.", "paligemma": LLM + "layers.", "expert": EXPERT + "layers."}


@dataclass(frozen=True)
class ExpectedTensor:
    name: str
    shape: tuple[int, ...]
    kind: str
    template: str
    layer: int | None


def expected_tensors(config: PiConfig) -> Iterator[ExpectedTensor]:
    """Every tensor a model of ``config`` has, in a stable order (vision, LLM, expert, heads)."""
    for param in PARAMS:
        if config.model_type not in param.models:
            continue
        shape = tuple(int(d) for d in param.shape(config))
        if param.depth is None:
            yield ExpectedTensor(param.name, shape, param.kind, param.name, None)
            continue
        for i in range(LAYER_DEPTH[param.depth](config)):
            yield ExpectedTensor(param.name.format(i=i), shape, param.kind, param.name, i)


def count_layers(names, depth: str) -> int:
    """Number of distinct layer indices under the layer prefix of ``depth`` among ``names``."""
    prefix = LAYER_PREFIX[depth]
    indices = set()
    for name in names:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return len(indices)


def num_parameters(config: PiConfig) -> int:
    total = 0
    for tensor in expected_tensors(config):
        n = 1
        for d in tensor.shape:
            n *= d
        total += n
    return total
