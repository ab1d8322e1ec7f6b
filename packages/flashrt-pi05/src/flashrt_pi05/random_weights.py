"""True-size (or tiny) random Pi0 / Pi0.5 weights made directly on a device.

Used by ``flashrt bench`` (no multi-GB checkpoint on disk: the weights are drawn on the GPU) and by
the Hopper tests. Names and shapes are the openpi-PyTorch ones (the contract's); the tests check
them against the reference model's own ``state_dict``. Scales are chosen so activations stay O(1)
through every layer (fan-in scaled GEMMs, small norm weights, non-zero adaRMS denses - zero ones
would test nothing).
"""

from __future__ import annotations

import math

VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
LLM = "paligemma_with_expert.paligemma.model.language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."


def state_dict_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter of the reference model (openpi-PyTorch names), in load order."""
    v, g, e = config.vision, config.paligemma, config.expert
    shapes: dict[str, tuple[int, ...]] = {
        VISION + "embeddings.patch_embedding.weight": (v.width, 3, v.patch_size, v.patch_size),
        VISION + "embeddings.patch_embedding.bias": (v.width,),
        VISION + "embeddings.position_embedding.weight": (v.num_patches, v.width),
    }
    for i in range(v.depth):
        p = VISION + f"encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            shapes[p + n + ".weight"] = (v.width,)
            shapes[p + n + ".bias"] = (v.width,)
        for n in ("q", "k", "v", "out"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (v.width, v.width)
            shapes[p + f"self_attn.{n}_proj.bias"] = (v.width,)
        shapes[p + "mlp.fc1.weight"] = (v.mlp_dim, v.width)
        shapes[p + "mlp.fc1.bias"] = (v.mlp_dim,)
        shapes[p + "mlp.fc2.weight"] = (v.width, v.mlp_dim)
        shapes[p + "mlp.fc2.bias"] = (v.width,)
    shapes[VISION + "post_layernorm.weight"] = (v.width,)
    shapes[VISION + "post_layernorm.bias"] = (v.width,)
    proj = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear."
    shapes[proj + "weight"] = (g.width, v.width)
    shapes[proj + "bias"] = (g.width,)
    shapes[LLM + "embed_tokens.weight"] = (config.vocab_size, g.width)
    for prefix, dims in ((LLM, g), (EXPERT, e)):
        for i in range(dims.depth):
            p = prefix + f"layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (dims.num_heads * dims.head_dim, dims.width)
            shapes[p + "self_attn.k_proj.weight"] = (dims.num_kv_heads * dims.head_dim, dims.width)
            shapes[p + "self_attn.v_proj.weight"] = (dims.num_kv_heads * dims.head_dim, dims.width)
            shapes[p + "self_attn.o_proj.weight"] = (dims.width, dims.num_heads * dims.head_dim)
            shapes[p + "mlp.gate_proj.weight"] = (dims.mlp_dim, dims.width)
            shapes[p + "mlp.up_proj.weight"] = (dims.mlp_dim, dims.width)
            shapes[p + "mlp.down_proj.weight"] = (dims.width, dims.mlp_dim)
            for n in ("input_layernorm", "post_attention_layernorm"):
                _norm(shapes, p + n, dims.width, adaptive=prefix == EXPERT and config.is_pi05)
        _norm(shapes, prefix + "norm", dims.width, adaptive=prefix == EXPERT and config.is_pi05)
    a = config.action_dim
    shapes["action_in_proj.weight"] = (e.width, a)
    shapes["action_in_proj.bias"] = (e.width,)
    shapes["action_out_proj.weight"] = (a, e.width)
    shapes["action_out_proj.bias"] = (a,)
    if config.is_pi05:
        for n in ("time_mlp_in", "time_mlp_out"):
            shapes[n + ".weight"] = (e.width, e.width)
            shapes[n + ".bias"] = (e.width,)
    else:
        shapes["state_proj.weight"] = (e.width, config.max_state_dim)
        shapes["state_proj.bias"] = (e.width,)
        shapes["action_time_mlp_in.weight"] = (e.width, 2 * e.width)
        shapes["action_time_mlp_in.bias"] = (e.width,)
        shapes["action_time_mlp_out.weight"] = (e.width, e.width)
        shapes["action_time_mlp_out.bias"] = (e.width,)
    return shapes


def _norm(shapes, key, width, *, adaptive):
    if adaptive:
        shapes[key + ".dense.weight"] = (3 * width, width)
        shapes[key + ".dense.bias"] = (3 * width,)
    else:
        shapes[key + ".weight"] = (width,)


def _std(key: str, shape: tuple[int, ...]) -> float:
    if key.endswith("embed_tokens.weight"):
        return 1.0 / math.sqrt(shape[1])  # times sqrt(width) at lookup: O(1) tokens
    if key.endswith("position_embedding.weight"):
        return 0.5
    if len(shape) == 1:
        if "layer_norm" in key or "layernorm" in key or key.endswith("norm.weight"):
            return 0.1  # gamma / (1 + w) near 1, SigLIP beta near 0
        return 0.02  # biases
    fan_in = math.prod(shape[1:])
    if ".dense.weight" in key:
        return 0.5 / math.sqrt(fan_in)  # adaRMS modulation: non-zero, moderate
    return 1.0 / math.sqrt(fan_in)


def _draw(key, shape, generator, device):
    import torch  # noqa: PLC0415

    t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * _std(key, shape)
    if key.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
        t += 1.0  # SigLIP LayerNorm gamma is a plain multiplier: centre it on 1
    return t


def random_state_dict(config, *, device="cpu", dtype=None, seed: int = 0, shapes=None) -> dict:
    """Random weights for ``config`` drawn on ``device`` (true size on a GPU takes seconds)."""
    import torch  # noqa: PLC0415

    dtype = dtype or torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)
    return {
        key: _draw(key, shape, generator, device).to(dtype)
        for key, shape in (shapes or state_dict_shapes(config)).items()
    }


def fill_random_(module, *, seed: int = 0) -> None:
    """Overwrite a model's parameters in place with random values of the same distributions as
    ``random_state_dict`` (seeded), without a second copy of the weights."""
    import torch  # noqa: PLC0415

    params = dict(module.named_parameters())
    device = next(iter(params.values())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(_draw(key, tuple(param.shape), generator, device))
