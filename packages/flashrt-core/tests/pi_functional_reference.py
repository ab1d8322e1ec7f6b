"""An independent float64 implementation of Pi0 / Pi0.5 for tests, written from MODELS.md directly on
a state dict (openpi names), deliberately differently from flash_rt's modules:

- patches by reshaping instead of a conv; LayerNorm / GELU-tanh / RMSNorm written out;
- RoPE as a complex rotation; masks built with Python loops over tokens;
- per-head attention with einsum and an explicit KV-head index;
- the whole [prefix ; suffix] sequence run jointly at every denoise step (no KV cache).

Not a test module itself (no ``test_`` prefix); Pi0 / Pi0.5 tests load it by path.
"""

from __future__ import annotations

import math

import numpy as np
import torch

D = torch.float64


def sd64(state_dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", D) for k, v in state_dict.items()}


def linear(sd, name, x):
    y = x @ sd[name + ".weight"].T
    bias = sd.get(name + ".bias")
    return y if bias is None else y + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rms(x, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def siglip(sd, images, prefix, num_heads, num_layers=None, pool=1):
    """images (N, S, S, 3) float64 in [-1, 1] -> (N, T, width)."""
    p = prefix + "vision_tower.vision_model."
    weight = sd[p + "embeddings.patch_embedding.weight"]
    width, _, patch, _ = weight.shape
    n, size = images.shape[0], images.shape[1]
    g = size // patch
    patches = images.reshape(n, g, patch, g, patch, 3).permute(0, 1, 3, 5, 2, 4).reshape(n, g * g, 3 * patch * patch)
    x = patches @ weight.reshape(width, -1).T + sd[p + "embeddings.patch_embedding.bias"]
    x = x + sd[p + "embeddings.position_embedding.weight"]
    depth = len({k.split(".")[k.split(".").index("layers") + 1] for k in sd if p + "encoder.layers." in k})
    hd = width // num_heads
    for i in range(depth if num_layers is None else num_layers):
        q = p + f"encoder.layers.{i}."
        h = layer_norm(x, sd[q + "layer_norm1.weight"], sd[q + "layer_norm1.bias"])
        qs, ks, vs = (linear(sd, q + f"self_attn.{n_}_proj", h).reshape(n, -1, num_heads, hd) for n_ in "qkv")
        logits = torch.einsum("bqhd,bkhd->bhqk", qs, ks) / math.sqrt(hd)
        att = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), vs).reshape(n, -1, width)
        x = x + linear(sd, q + "self_attn.out_proj", att)
        h = layer_norm(x, sd[q + "layer_norm2.weight"], sd[q + "layer_norm2.bias"])
        x = x + linear(sd, q + "mlp.fc2", gelu_tanh(linear(sd, q + "mlp.fc1", h)))
    x = layer_norm(x, sd[p + "post_layernorm.weight"], sd[p + "post_layernorm.bias"])
    if pool > 1:
        x = x.reshape(n, g // pool, pool, g // pool, pool, width).mean(dim=(2, 4)).reshape(n, -1, width)
    return x


def rope(x, positions):
    """x (T, H, hd), positions (T,) -> rotated, pairs (i, i + hd/2) as complex numbers."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=D) * 2.0 / x.shape[-1])
    angle = positions.to(D)[:, None] * freq[None]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def mask_from(ar, valid):
    n = len(ar)
    cum = np.cumsum(ar)
    return torch.tensor([[bool(valid[i] and valid[j] and cum[j] <= cum[i]) for j in range(n)] for i in range(n)])


def norm(sd, name, x, cond):
    if name + ".dense.weight" in sd:
        mod = linear(sd, name + ".dense", cond)
        w = x.shape[-1]
        scale, shift, gate = mod[:w], mod[w : 2 * w], mod[2 * w :]
        return rms(x) * (1 + scale) + shift, gate
    return rms(x) * (1 + sd[name + ".weight"]), None


def joint(sd, streams, ar, valid, num_heads, num_kv_heads, head_dim):
    """streams: list of (prefix name, x (T_i, W_i), cond or None). One sequence, batch 1."""
    mask = mask_from(ar, valid)
    positions = torch.tensor(np.cumsum(valid) - 1)
    layer_count = len({k.split("layers.")[1].split(".")[0] for k in sd if streams[0][0] + "layers." in k})
    sizes = [x.shape[0] for _, x, _ in streams]
    xs = [x for _, x, _ in streams]
    for i in range(layer_count):
        qs, ks, vs, gates = [], [], [], []
        for (name, _, cond), x in zip(streams, xs):
            lp = f"{name}layers.{i}."
            h, gate = norm(sd, lp + "input_layernorm", x, cond)
            gates.append(gate)
            qs.append(linear(sd, lp + "self_attn.q_proj", h).reshape(-1, num_heads, head_dim))
            ks.append(linear(sd, lp + "self_attn.k_proj", h).reshape(-1, num_kv_heads, head_dim))
            vs.append(linear(sd, lp + "self_attn.v_proj", h).reshape(-1, num_kv_heads, head_dim))
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        q, k = rope(q, positions), rope(k, positions)
        out = torch.empty(q.shape[0], num_heads, head_dim, dtype=D)
        for head in range(num_heads):
            kv = head * num_kv_heads // num_heads
            logits = (q[:, head] @ k[:, kv].T) / math.sqrt(head_dim)
            logits = torch.where(mask, logits, torch.tensor(-1e300, dtype=D))
            out[:, head] = torch.softmax(logits, -1) @ v[:, kv]
        out = out.reshape(q.shape[0], -1)
        start, new_xs = 0, []
        for (name, _, cond), x, gate, size in zip(streams, xs, gates, sizes):
            lp = f"{name}layers.{i}."
            o = linear(sd, lp + "self_attn.o_proj", out[start : start + size])
            x = x + (o if gate is None else o * gate)
            h, gate2 = norm(sd, lp + "post_attention_layernorm", x, cond)
            m = linear(sd, lp + "mlp.down_proj", gelu_tanh(linear(sd, lp + "mlp.gate_proj", h)) * linear(sd, lp + "mlp.up_proj", h))
            new_xs.append(x + (m if gate2 is None else m * gate2))
            start += size
        xs = new_xs
    return [norm(sd, name + "norm", x, cond)[0] for (name, _, cond), x in zip(streams, xs)]


def time_embedding(t: float, dim: int):
    half = dim // 2
    period = 4e-3 * (4.0 / 4e-3) ** (np.arange(half) / (half - 1))
    ang = 2 * np.pi * t / period
    return torch.tensor(np.concatenate([np.sin(ang), np.cos(ang)]), dtype=D)


def silu(x):
    return x / (1 + torch.exp(-x))


LLM = "paligemma_with_expert.paligemma.model.language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."


def sample_actions(sd, config, images, tokens, token_mask, noise, *, pi05: bool, state=None, num_steps=10,
                   vision_num_layers=None, pool=1):
    """Batch-1 sampling. images (V, S, S, 3) in [-1, 1]; tokens, token_mask (L,); noise (H, A)."""
    llm, ex = config.paligemma, config.expert
    img = siglip(sd, torch.as_tensor(images, dtype=D), "paligemma_with_expert.paligemma.model.",
                 config.vision.num_heads, vision_num_layers, pool)
    img = linear(sd, "paligemma_with_expert.paligemma.model.multi_modal_projector.linear", img).reshape(-1, llm.width)
    text = sd[LLM + "embed_tokens.weight"][torch.as_tensor(tokens)] * math.sqrt(llm.width)
    prefix = torch.cat([img, text])
    prefix_valid = [True] * img.shape[0] + [bool(m) for m in token_mask]
    x = torch.as_tensor(noise, dtype=D)
    horizon = x.shape[0]
    dt = np.float32(-1.0 / num_steps)
    t = np.float32(1.0)
    while t >= -dt / 2:
        temb = time_embedding(float(t), ex.width)
        actions = linear(sd, "action_in_proj", x)
        if pi05:
            cond = silu(linear(sd, "time_mlp_out", silu(linear(sd, "time_mlp_in", temb))))
            suffix, suffix_ar = actions, [1] + [0] * (horizon - 1)
        else:
            cond = None
            mixed = torch.cat([actions, temb[None].expand(horizon, -1)], dim=1)
            mixed = linear(sd, "action_time_mlp_out", silu(linear(sd, "action_time_mlp_in", mixed)))
            state_token = linear(sd, "state_proj", torch.as_tensor(state, dtype=D))[None]
            suffix, suffix_ar = torch.cat([state_token, mixed]), [1, 1] + [0] * (horizon - 1)
        ar = [0] * prefix.shape[0] + suffix_ar
        valid = prefix_valid + [True] * suffix.shape[0]
        _, out = joint(sd, [(LLM, prefix, None), (EXPERT, suffix, cond)], ar, valid,
                       llm.num_heads, llm.num_kv_heads, llm.head_dim)
        v = linear(sd, "action_out_proj", out[-horizon:])
        x = x + float(dt) * v
        t = np.float32(t + dt)
    return x
