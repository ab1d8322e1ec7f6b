"""Gemma decoder blocks in plain torch, shared by Pi0, Pi0.5 and Pi0-FAST.

Numerics follow openpi (MODELS.md):
- RMSNorm: ``x * rsqrt(mean(x^2) + 1e-6) * (1 + w)``, computed in fp32, result in the input dtype.
- Adaptive RMSNorm (Pi0.5 action expert): ``Dense(cond) -> scale, shift, gate`` (in that order);
  ``y = rmsnorm(x) * (1 + scale) + shift``; the residual around the block is gated, ``x + y * gate``.
- RoPE: split-half rotation, max wavelength 10000, applied in fp32.
- Attention: multi-query (``num_kv_heads`` may be < ``num_heads``), q scaled by head_dim^-0.5,
  logits and softmax in fp32, disallowed logits set to -2.3819763e38 (openpi's constant, so a row
  with nothing allowed is uniform rather than NaN).
- MLP: GeGLU, ``down(gelu_tanh(gate(x)) * up(x))``.

Parameter names match the openpi PyTorch / HF Gemma layout (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``...), so checkpoints load with ``load_state_dict(strict=True)``.

The attention itself lives outside the decoder layer (``GemmaDecoderLayer.project_qkv`` /
``finish``) because Pi0 and Pi0.5 run ONE attention over two token streams that have different
weights; ``GemmaModel.forward`` is the single-stream use of the same pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flash_rt.models.pi_config import GemmaDims

RMS_NORM_EPS = 1e-6
MASKED_LOGIT = -2.3819763e38
ROPE_MAX_WAVELENGTH = 10_000.0


def rms_normalize(x: torch.Tensor, eps: float = RMS_NORM_EPS) -> torch.Tensor:
    """``x / rms(x)`` over the last axis, in fp32 whatever the input dtype."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class RMSNorm(nn.Module):
    """Gemma RMSNorm with a (1 + w) scale. ``forward`` returns ``(y, None)`` so that it and
    ``AdaptiveRMSNorm`` are interchangeable inside a layer (the None is "no gate")."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        return (rms_normalize(x) * (1.0 + self.weight.float())).to(x.dtype), None


class AdaptiveRMSNorm(nn.Module):
    """Pi0.5's adaRMS: the condition (one vector per sequence) gives scale, shift and gate."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        if cond is None:
            raise TypeError("AdaptiveRMSNorm needs the condition vector (the Pi0.5 time embedding)")
        modulation = self.dense(cond.to(self.dense.weight.dtype)).float()
        if x.ndim == 3:  # one condition per sequence, broadcast over its tokens
            modulation = modulation[:, None, :]
        scale, shift, gate = modulation.chunk(3, dim=-1)
        y = rms_normalize(x) * (1.0 + scale) + shift
        return y.to(x.dtype), gate.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, max_wavelength: float = ROPE_MAX_WAVELENGTH):
    """cos and sin tables, (B, T, head_dim/2) fp32, for integer positions (B, T)."""
    exponents = torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device) * (2.0 / head_dim)
    inv_timescale = max_wavelength ** (-exponents)
    angles = positions.to(torch.float32)[..., None] * inv_timescale
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by the split-half convention: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Multi-query attention.

    q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), ``allowed`` bool (B, Tq, Tk): query i may read key j.
    Returns (B, Tq, Hq * D) in v's dtype. Query head h reads KV head h // (Hq / Hkv).
    """
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    # Group the query heads that share a KV head instead of repeating K and V (same result).
    q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads * q_len, head_dim)
    logits = torch.matmul(q.float() * head_dim**-0.5, k.float().transpose(-1, -2))
    logits = logits.view(batch, num_kv_heads, num_heads // num_kv_heads, q_len, -1)
    logits = logits.masked_fill(~allowed[:, None, None], MASKED_LOGIT)
    probs = torch.softmax(logits, dim=-1).to(v.dtype).view(batch, num_kv_heads, -1, k.shape[2])
    out = torch.matmul(probs, v).view(batch, num_heads, q_len, head_dim)
    return out.transpose(1, 2).reshape(batch, q_len, num_heads * head_dim)


def attention_allowed(ar_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """big_vision / openpi mask: i may attend to j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are
    valid. ``ar_mask`` and ``valid`` are (B, T); returns bool (B, T, T)."""
    cumsum = torch.cumsum(ar_mask.to(torch.int64), dim=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    return causal & valid[:, None, :] & valid[:, :, None]


class GemmaAttention(nn.Module):
    """The projections only (no bias, as in Gemma); the attention is done by the caller."""

    def __init__(self, dims: GemmaDims):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(dims.width, dims.num_heads * dims.head_dim, bias=False)
        self.k_proj = nn.Linear(dims.width, dims.num_kv_heads * dims.head_dim, bias=False)
        self.v_proj = nn.Linear(dims.width, dims.num_kv_heads * dims.head_dim, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * dims.head_dim, dims.width, bias=False)


class GemmaMLP(nn.Module):
    def __init__(self, dims: GemmaDims):
        super().__init__()
        self.gate_proj = nn.Linear(dims.width, dims.mlp_dim, bias=False)
        self.up_proj = nn.Linear(dims.width, dims.mlp_dim, bias=False)
        self.down_proj = nn.Linear(dims.mlp_dim, dims.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.up_proj.weight.dtype)
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def _make_norm(width: int, cond_dim: int | None) -> nn.Module:
    return RMSNorm(width) if cond_dim is None else AdaptiveRMSNorm(width, cond_dim)


class GemmaDecoderLayer(nn.Module):
    """Pre-norm decoder layer split in two halves around the attention."""

    def __init__(self, dims: GemmaDims, cond_dim: int | None = None):
        super().__init__()
        self.dims = dims
        self.input_layernorm = _make_norm(dims.width, cond_dim)
        self.self_attn = GemmaAttention(dims)
        self.post_attention_layernorm = _make_norm(dims.width, cond_dim)
        self.mlp = GemmaMLP(dims)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cond=None):
        """x (B, T, width) -> q (B, H, T, D), k and v (B, Hkv, T, D) with RoPE applied to q and k,
        and the attention-residual gate (None without adaRMS)."""
        h, gate = self.input_layernorm(x, cond)
        h = h.to(self.self_attn.q_proj.weight.dtype)
        batch, length, _ = x.shape
        attn = self.self_attn

        def heads(proj, n):
            return proj(h).view(batch, length, n, attn.head_dim).transpose(1, 2)

        q = apply_rope(heads(attn.q_proj, attn.num_heads), cos, sin)
        k = apply_rope(heads(attn.k_proj, attn.num_kv_heads), cos, sin)
        v = heads(attn.v_proj, attn.num_kv_heads)
        return q, k, v, gate

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, attn_gate, cond=None) -> torch.Tensor:
        """Output projection, gated residual, MLP, gated residual."""
        o = self.self_attn.o_proj(attn_out.to(self.self_attn.o_proj.weight.dtype))
        x = gated_residual(x, o.to(x.dtype), attn_gate)
        h, mlp_gate = self.post_attention_layernorm(x, cond)
        return gated_residual(x, self.mlp(h).to(x.dtype), mlp_gate)


@dataclass
class KVCache:
    """Per-layer keys and values (B, Hkv, T, D) of tokens already run, with their validity (B, T)
    and the number of valid tokens per sequence (next position = that count)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    num_valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.valid.shape[1]


class GemmaModel(nn.Module):
    """A Gemma stack: optional token embedding, ``depth`` decoder layers, final norm.

    ``cond_dim`` set = adaptive norms everywhere (Pi0.5 expert). ``vocab_size`` None = no embedding
    table (the action expert has none).
    """

    def __init__(self, dims: GemmaDims, *, vocab_size: int | None = None, cond_dim: int | None = None):
        super().__init__()
        self.dims = dims
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, dims.width)
        self.layers = nn.ModuleList(GemmaDecoderLayer(dims, cond_dim) for _ in range(dims.depth))
        self.norm = _make_norm(dims.width, cond_dim)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layers[0].self_attn.q_proj.weight.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(width) (Gemma's input scaling), in the compute dtype."""
        emb = self.embed_tokens(token_ids)
        return (emb * math.sqrt(self.dims.width)).to(self.compute_dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        cond: torch.Tensor | None = None,
        past: KVCache | None = None,
        return_kv: bool = False,
    ):
        """Run the stack over x (B, T, width) already embedded.

        positions (B, T) int; allowed bool (B, T, past_len + T): which keys (cached ones first)
        each new token may read. Returns the final-normed hidden states, and with ``return_kv``
        the per-layer (keys, values) of the new tokens.
        """
        cos, sin = rope_tables(positions, self.dims.head_dim)
        x = x.to(self.compute_dtype)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            q, k, v, gate = layer.project_qkv(x, cos, sin, cond)
            new_keys.append(k)
            new_values.append(v)
            if past is not None:
                k = torch.cat([past.keys[i], k], dim=2)
                v = torch.cat([past.values[i], v], dim=2)
            x = layer.finish(x, attend(q, k, v, allowed), gate, cond)
        out, _ = self.norm(x, cond)
        return (out, (new_keys, new_values)) if return_kv else out


__all__ = [
    "RMS_NORM_EPS",
    "MASKED_LOGIT",
    "rms_normalize",
    "gated_residual",
    "RMSNorm",
    "AdaptiveRMSNorm",
    "rope_tables",
    "apply_rope",
    "attend",
    "attention_allowed",
    "GemmaAttention",
    "GemmaMLP",
    "GemmaDecoderLayer",
    "GemmaModel",
    "KVCache",
]
