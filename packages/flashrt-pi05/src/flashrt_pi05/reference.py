"""Pi0.5 in plain torch: our numerics ground truth (any device, fp32 or bf16).

Pi0.5 differs from Pi0 only in the suffix (MODELS.md):
- the state is not a token: it is discretised into the prompt by the tokenizer;
- the time embedding conditions every expert norm (adaRMS with gated residuals):
  cond = swish(time_mlp_out(swish(time_mlp_in(sinusoidal(t)))));
- the action tokens are just ``action_in_proj(x_t)``; suffix ar = [1, 0, ..., 0] (one block).

Stage methods (see ``flash_rt.models.paligemma_expert`` for shapes):
    model.embed_images(images)                                  -> image tokens
    model.compute_prefix_kv(images, tokens, token_mask)         -> KVCache
    model.denoise_velocity(x_t, t, prefix_kv)                   -> v (B, H, A)
    model.sample_actions(images, tokens, token_mask, noise)     -> actions (B, H, A)
Parameter names are openpi PyTorch's, so ``load_state_dict(checkpoint.state_dict, strict=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flash_rt.models.paligemma_expert import PiReferenceBase, sinusoidal_time_embedding
from flash_rt.models.pi_config import PiConfig


class Pi05Reference(PiReferenceBase):
    adaptive_expert = True

    def __init__(self, config: PiConfig, *, vision_num_layers: int | None = None, vision_pool_factor: int = 1):
        super().__init__(config, vision_num_layers=vision_num_layers, vision_pool_factor=vision_pool_factor)
        width = config.expert.width
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)

    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        """The adaRMS condition (B, We) for flow time t (B,)."""
        emb = sinusoidal_time_embedding(t, self.config.expert.width).to(self.time_mlp_in.weight.dtype)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor):
        actions = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        ar = [1] + [0] * (actions.shape[1] - 1)
        return actions, ar, self.time_condition(t)
