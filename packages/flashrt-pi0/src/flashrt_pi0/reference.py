"""Pi0 in plain torch: our numerics ground truth (any device, fp32 or bf16).

Pi0's suffix (MODELS.md): one state token ``state_proj(state)`` (ar=1), then the action tokens
``action_time_mlp_out(swish(action_time_mlp_in(cat[action_in_proj(x_t), sinusoidal(t)])))``
(first one ar=1, the rest ar=0): suffix ar = [1, 1, 0, ..., 0]. The expert uses plain RMSNorm.

Stage methods (see ``flash_rt.models.paligemma_expert`` for shapes); ``state`` is (B, max_state_dim),
normalised and zero-padded:
    model.embed_images(images)                                        -> image tokens
    model.compute_prefix_kv(images, tokens, token_mask)               -> KVCache
    model.denoise_velocity(x_t, t, prefix_kv, state=state)            -> v (B, H, A)
    model.sample_actions(images, tokens, token_mask, noise, state=state) -> actions (B, H, A)
Parameter names are openpi PyTorch's, so ``load_state_dict(checkpoint.state_dict, strict=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flash_rt.models.paligemma_expert import PiReferenceBase, sinusoidal_time_embedding
from flash_rt.models.pi_config import PiConfig


class Pi0Reference(PiReferenceBase):
    adaptive_expert = False

    def __init__(self, config: PiConfig, *, vision_num_layers: int | None = None, vision_pool_factor: int = 1):
        super().__init__(config, vision_num_layers=vision_num_layers, vision_pool_factor=vision_pool_factor)
        width = config.expert.width
        self.state_proj = nn.Linear(config.max_state_dim, width)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor):
        dtype = self.action_in_proj.weight.dtype
        state_token = self.state_proj(state.to(device=x_t.device, dtype=dtype))[:, None, :]
        actions = self.action_in_proj(x_t.to(dtype))
        time_emb = sinusoidal_time_embedding(t, self.config.expert.width).to(dtype)
        time_emb = time_emb[:, None, :].expand_as(actions)
        mixed = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, time_emb], dim=2))))
        ar = [1, 1] + [0] * (actions.shape[1] - 1)
        return torch.cat([state_token, mixed], dim=1), ar, None
