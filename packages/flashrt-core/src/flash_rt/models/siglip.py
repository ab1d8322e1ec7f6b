"""SigLIP vision tower (So400m/14 in Pi0 / Pi0.5 / Pi0-FAST) and the PaliGemma projector.

Patch conv (kernel = stride = patch size, no padding) -> + learned position embedding -> pre-LN
encoder blocks (LayerNorm eps 1e-6, biased q/k/v/out projections, GELU-tanh MLP) -> final
LayerNorm. No pooling head. The projector is one Linear (width -> LLM width); image tokens are
NOT scaled by sqrt(width) (only text tokens are).

Two speed knobs for the fast path, both off by default:
- ``num_layers``: run only the first N encoder layers (the final LayerNorm is still applied);
- ``pool_factor`` f in {1, 2, 4}: average f x f neighbouring patches of the token grid, giving
  (grid / f)^2 tokens per image. Pooling is done before the (linear) projector, which is the same
  as pooling after it and cheaper.

Parameter names follow HF's ``SiglipVisionModel`` under ``vision_tower.vision_model`` and
``multi_modal_projector.linear``, as in openpi's converted checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flash_rt.models.pi_config import VisionDims

LAYER_NORM_EPS = 1e-6


def layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in fp32, returned in x's dtype."""
    y = F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return y.to(x.dtype)


class SiglipEmbeddings(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, dims.width, kernel_size=dims.patch_size, stride=dims.patch_size)
        self.position_embedding = nn.Embedding(dims.num_patches, dims.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) in [-1, 1] -> (N, num_patches, width) in fp32 (or the conv's dtype)."""
        # The stride = kernel conv as one matmul over flattened patches: the same sum, and on CUDA it
        # stays full fp32 (cuDNN convolutions default to TF32).
        conv = self.patch_embedding
        patch = conv.kernel_size[0]
        n, channels, height, width = pixels.shape
        gh, gw = height // patch, width // patch
        x = pixels.to(conv.weight.dtype).reshape(n, channels, gh, patch, gw, patch)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, channels * patch * patch)
        tokens = F.linear(x, conv.weight.reshape(conv.out_channels, -1), conv.bias)
        return tokens + self.position_embedding.weight.to(tokens.dtype)[None]


class SiglipAttention(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.num_heads, self.head_dim = dims.num_heads, dims.head_dim
        self.q_proj = nn.Linear(dims.width, dims.width)
        self.k_proj = nn.Linear(dims.width, dims.width)
        self.v_proj = nn.Linear(dims.width, dims.width)
        self.out_proj = nn.Linear(dims.width, dims.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(proj):
            return proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        logits = torch.matmul(q.float() * self.head_dim**-0.5, k.float().transpose(-1, -2))
        probs = torch.softmax(logits, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.fc1 = nn.Linear(dims.width, dims.mlp_dim)
        self.fc2 = nn.Linear(dims.mlp_dim, dims.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dims.width, eps=LAYER_NORM_EPS)
        self.self_attn = SiglipAttention(dims)
        self.layer_norm2 = nn.LayerNorm(dims.width, eps=LAYER_NORM_EPS)
        self.mlp = SiglipMLP(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(layer_norm_fp32(self.layer_norm1, x))
        return x + self.mlp(layer_norm_fp32(self.layer_norm2, x))


class SiglipEncoder(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(dims) for _ in range(dims.depth))


class SiglipVisionModel(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.embeddings = SiglipEmbeddings(dims)
        self.encoder = SiglipEncoder(dims)
        self.post_layernorm = nn.LayerNorm(dims.width, eps=LAYER_NORM_EPS)


class SiglipVisionTower(nn.Module):
    """``vision_tower``: pixels (N, 3, H, W) in [-1, 1] -> tokens (N, T, width)."""

    def __init__(self, dims: VisionDims):
        super().__init__()
        self.dims = dims
        self.vision_model = SiglipVisionModel(dims)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.vision_model.encoder.layers[0].self_attn.q_proj.weight.dtype

    def forward(self, pixels: torch.Tensor, num_layers: int | None = None, pool_factor: int = 1) -> torch.Tensor:
        model = self.vision_model
        layers = model.encoder.layers
        if num_layers is not None:
            if not 1 <= num_layers <= len(layers):
                raise ValueError(f"num_layers must be in [1, {len(layers)}]; got {num_layers}")
            layers = layers[:num_layers]
        x = model.embeddings(pixels).to(self.compute_dtype)
        for layer in layers:
            x = layer(x)
        x = layer_norm_fp32(model.post_layernorm, x)
        return pool_tokens(x, pool_factor)


def pool_tokens(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """Average f x f neighbours of a square token grid (N, g*g, C) -> (N, (g/f)^2, C), row-major."""
    if factor == 1:
        return tokens
    n, count, channels = tokens.shape
    grid = int(round(count**0.5))
    if grid * grid != count or grid % factor:
        raise ValueError(f"pool factor {factor} needs a square token grid divisible by it; got {count} tokens")
    x = tokens.transpose(1, 2).reshape(n, channels, grid, grid).float()
    x = F.avg_pool2d(x, factor)
    return x.flatten(2).transpose(1, 2).to(tokens.dtype)


class MultiModalProjector(nn.Module):
    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, text_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype))


__all__ = [
    "SiglipVisionTower",
    "SiglipVisionModel",
    "SiglipEncoderLayer",
    "MultiModalProjector",
    "pool_tokens",
    "layer_norm_fp32",
]
