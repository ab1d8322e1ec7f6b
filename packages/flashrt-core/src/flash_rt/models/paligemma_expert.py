"""The PaliGemma + action-expert backbone of Pi0 and Pi0.5, and their shared flow-matching loop.

Per layer there is ONE attention over [prefix tokens ; suffix tokens]: prefix tokens (images,
text) go through the LLM's weights, suffix tokens (state / actions) through the expert's weights,
each stream with its own q/k/v/o, norms and MLP; their keys and values are concatenated.

Mask (MODELS.md): token i may attend to j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid.
The prefix is all ar=0 (bidirectional) and every suffix block starts with ar=1, so the prefix never
reads the suffix. Its keys and values therefore do not depend on the suffix: they are computed
once (``PiReferenceBase.compute_prefix_kv``) and each denoise step runs only the suffix against
them. That is exact, and ``PaliGemmaWithExpert.joint_forward`` (the whole sequence at once) is
kept to prove it in tests. Positions are cumsum(valid) - 1; suffix positions continue after the
valid prefix tokens.

Stage methods of ``PiReferenceBase`` (B = batch, V = views, L = max tokens, H = horizon,
A = model action dim, all tensors on the model's device):
    embed_images(images (B, V, S, S, 3) or (V, S, S, 3) in [-1, 1], image_mask=None) -> (B, V*T, W)
    embed_prefix(images, tokens (B, L) int, token_mask (B, L) bool, image_mask=None)
        -> (prefix embeddings (B, P, W), prefix validity (B, P))
    compute_prefix_kv(images, tokens, token_mask, image_mask=None) -> KVCache
    denoise_velocity(x_t (B, H, A), t (B,) or float, prefix_kv, **suffix_inputs) -> v (B, H, A) fp32
    sample_actions(images, tokens, token_mask, noise (B, H, A), num_steps=None, **suffix_inputs)
        -> actions (B, H, A) fp32
Subclasses (Pi0, Pi0.5) define ``embed_suffix``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flash_rt.errors import ConfigError
from flash_rt.models.gemma import GemmaModel, KVCache, attend, attention_allowed, rope_tables
from flash_rt.models.pi_config import PiConfig
from flash_rt.models.siglip import MultiModalProjector, SiglipVisionTower

TIME_MIN_PERIOD = 4e-3
TIME_MAX_PERIOD = 4.0

# Substrings of parameter names kept in fp32 by ``to_precision(bfloat16)``: norms (computed in
# fp32 anyway), SigLIP's patch and position embeddings, and the small action/state/time heads.
FP32_PARAMETERS = (
    "layernorm",
    "layer_norm",
    ".norm.",
    "patch_embedding",
    "position_embedding",
    "action_in_proj",
    "action_out_proj",
    "time_mlp",
    "state_proj",
)


def sinusoidal_time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """openpi's time embedding: periods min*(max/min)**linspace(0,1,dim/2), [sin, cos] of 2*pi*t/period.
    t (B,) -> (B, dim) fp32 (computed in fp64, as openpi does)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = TIME_MIN_PERIOD * (TIME_MAX_PERIOD / TIME_MIN_PERIOD) ** fraction
    angles = (2.0 * math.pi / period)[None, :] * t.to(torch.float64)[:, None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(torch.float32)


class _PaliGemmaModel(nn.Module):
    def __init__(self, config: PiConfig):
        super().__init__()
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision.width, config.paligemma.width)
        self.language_model = GemmaModel(config.paligemma, vocab_size=config.vocab_size)


class _PaliGemma(nn.Module):
    def __init__(self, config: PiConfig):
        super().__init__()
        self.model = _PaliGemmaModel(config)


class _GemmaExpert(nn.Module):
    def __init__(self, config: PiConfig, adaptive: bool):
        super().__init__()
        self.model = GemmaModel(config.expert, cond_dim=config.expert.width if adaptive else None)


def check_joint_dims(config: PiConfig) -> None:
    llm, expert = config.paligemma, config.expert
    same = ("depth", "num_heads", "num_kv_heads", "head_dim")
    bad = [f"{n}: LLM {getattr(llm, n)} vs expert {getattr(expert, n)}" for n in same if getattr(llm, n) != getattr(expert, n)]
    if bad:
        raise ConfigError(
            "the LLM and the action expert share one attention per layer, so they need the same "
            f"depth, head count, KV-head count and head_dim; this config differs in {'; '.join(bad)}"
        )


class PaliGemmaWithExpert(nn.Module):
    """``paligemma_with_expert``: SigLIP + projector + Gemma LLM, and the Gemma action expert."""

    def __init__(self, config: PiConfig, *, adaptive_expert: bool):
        super().__init__()
        check_joint_dims(config)
        self.config = config
        self.paligemma = _PaliGemma(config)
        self.gemma_expert = _GemmaExpert(config, adaptive_expert)

    @property
    def llm(self) -> GemmaModel:
        return self.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.gemma_expert.model

    def prefix_kv(self, prefix_embs: torch.Tensor, prefix_valid: torch.Tensor, prefix_ar=None) -> KVCache:
        """Run the LLM over the prefix (B, P, W) and keep every layer's keys and values."""
        if prefix_ar is None:
            prefix_ar = torch.zeros_like(prefix_valid, dtype=torch.int64)
        positions = torch.cumsum(prefix_valid.to(torch.int64), dim=1) - 1
        allowed = attention_allowed(prefix_ar, prefix_valid)
        _, (keys, values) = self.llm(prefix_embs, positions, allowed, return_kv=True)
        return KVCache(keys, values, prefix_valid, prefix_valid.to(torch.int64).sum(dim=1))

    def suffix_forward(self, suffix_embs: torch.Tensor, suffix_ar: torch.Tensor, prefix: KVCache, cond=None):
        """Run the expert over the suffix (B, S, We), attending to the cached prefix and to itself.
        ``suffix_ar`` (B, S); every suffix token is valid. Returns the final-normed (B, S, We)."""
        batch, length = suffix_embs.shape[:2]
        suffix_valid = torch.ones(batch, length, dtype=torch.bool, device=suffix_embs.device)
        positions = prefix.num_valid[:, None] + torch.cumsum(suffix_valid.to(torch.int64), dim=1) - 1
        allowed = torch.cat(
            [prefix.valid[:, None, :].expand(batch, length, prefix.length), attention_allowed(suffix_ar, suffix_valid)],
            dim=2,
        )
        return self.expert(suffix_embs, positions, allowed, cond=cond, past=prefix)

    def joint_forward(self, prefix_embs, prefix_valid, suffix_embs, suffix_ar, cond=None):
        """Both streams in one pass with one attention per layer over [prefix ; suffix] and the full
        ar/validity mask; no cache. Returns (final-normed prefix, final-normed suffix)."""
        batch, prefix_len = prefix_valid.shape
        suffix_len = suffix_embs.shape[1]
        device = prefix_embs.device
        valid = torch.cat([prefix_valid, torch.ones(batch, suffix_len, dtype=torch.bool, device=device)], dim=1)
        ar = torch.cat([torch.zeros(batch, prefix_len, dtype=torch.int64, device=device), suffix_ar.to(torch.int64)], 1)
        allowed = attention_allowed(ar, valid)
        positions = torch.cumsum(valid.to(torch.int64), dim=1) - 1
        cos, sin = rope_tables(positions, self.config.paligemma.head_dim)
        streams = [
            (self.llm, prefix_embs.to(self.llm.compute_dtype), None, slice(0, prefix_len)),
            (self.expert, suffix_embs.to(self.expert.compute_dtype), cond, slice(prefix_len, None)),
        ]
        for i in range(self.config.paligemma.depth):
            projected = [
                model.layers[i].project_qkv(x, cos[:, span], sin[:, span], c) for model, x, c, span in streams
            ]
            q, k, v = (torch.cat([p[j].to(self.llm.compute_dtype) for p in projected], dim=2) for j in range(3))
            out = attend(q, k, v, allowed)
            streams = [
                (model, model.layers[i].finish(x, out[:, span], p[3], c), c, span)
                for (model, x, c, span), p in zip(streams, projected, strict=True)
            ]
        return tuple(model.norm(x, c)[0] for model, x, c, _ in streams)


class PiReferenceBase(nn.Module):
    """What Pi0 and Pi0.5 share: vision, prefix, prefix KV cache, the Euler loop.

    Subclasses implement ``embed_suffix(x_t, t, **suffix_inputs) -> (embs (B, S, We) fp32,
    ar (S,) list of ints, cond (B, We) or None)``.
    """

    adaptive_expert = False

    def __init__(self, config: PiConfig, *, vision_num_layers: int | None = None, vision_pool_factor: int = 1):
        super().__init__()
        if vision_pool_factor not in (1, 2, 4):
            raise ConfigError(f"vision_pool_factor must be 1, 2 or 4; got {vision_pool_factor!r}")
        if vision_num_layers is not None and not 1 <= vision_num_layers <= config.vision.depth:
            raise ConfigError(
                f"vision_num_layers must be in [1, {config.vision.depth}] for this model; got {vision_num_layers!r}"
            )
        self.config = config
        self.vision_num_layers = vision_num_layers
        self.vision_pool_factor = vision_pool_factor
        self.paligemma_with_expert = PaliGemmaWithExpert(config, adaptive_expert=self.adaptive_expert)
        width = config.expert.width
        self.action_in_proj = nn.Linear(config.action_dim, width)
        self.action_out_proj = nn.Linear(width, config.action_dim)

    # ---- precision -------------------------------------------------------------------------
    def to_precision(self, dtype: torch.dtype):
        """Cast the big matmul weights to ``dtype`` (bf16) and keep FP32_PARAMETERS in fp32."""
        for name, param in self.named_parameters():
            keep = any(marker in name for marker in FP32_PARAMETERS)
            param.data = param.data.to(torch.float32 if keep else dtype)
        return self

    @classmethod
    def from_checkpoint(cls, checkpoint, *, device=None, dtype=None, **knobs):
        """Build from a ``PiCheckpoint`` (flash_rt.models.pi_checkpoint) without a random init:
        the modules are made on the meta device and take the checkpoint's tensors."""
        if isinstance(dtype, str):  # "bfloat16" / "float32"
            dtype = getattr(torch, dtype)
        with torch.device("meta"):
            model = cls(checkpoint.config, **knobs)
        model.load_state_dict(checkpoint.state_dict, strict=True, assign=True)
        model = model.to(device=device or "cpu").eval()
        if dtype is not None and dtype != torch.float32:
            model.to_precision(dtype)
        return model

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    # ---- prefix ----------------------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, V, S, S, 3) or (V, S, S, 3) channels-last in [-1, 1] -> (B, V*T, W)."""
        if images.ndim == 4:
            images = images[None]
        batch, views = images.shape[:2]
        pixels = images.reshape(batch * views, *images.shape[2:]).permute(0, 3, 1, 2)
        model = self.paligemma_with_expert.paligemma.model
        tokens = model.vision_tower(pixels, self.vision_num_layers, self.vision_pool_factor)
        tokens = model.multi_modal_projector(tokens)
        return tokens.reshape(batch, views * tokens.shape[1], tokens.shape[2])

    def embed_prefix(self, images, tokens, token_mask, image_mask=None):
        """Image tokens then text tokens (times sqrt(width)); an image whose ``image_mask`` (B, V)
        entry is False is kept in place but marked invalid (openpi's masked slot)."""
        if images.ndim == 4:
            images = images[None]
        batch, views = images.shape[:2]
        llm = self.paligemma_with_expert.llm
        image_embs = self.embed_images(images).to(llm.compute_dtype)
        per_view = image_embs.shape[1] // views
        if image_mask is None:
            image_valid = torch.ones(batch, views * per_view, dtype=torch.bool, device=image_embs.device)
        else:
            image_valid = image_mask.to(torch.bool).repeat_interleave(per_view, dim=1)
        text_embs = llm.embed(tokens)
        embs = torch.cat([image_embs, text_embs], dim=1)
        valid = torch.cat([image_valid, token_mask.to(torch.bool)], dim=1)
        return embs, valid

    def compute_prefix_kv(self, images, tokens, token_mask, image_mask=None) -> KVCache:
        embs, valid = self.embed_prefix(images, tokens, token_mask, image_mask)
        return self.paligemma_with_expert.prefix_kv(embs, valid)

    # ---- suffix ----------------------------------------------------------------------------
    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor, **suffix_inputs):
        raise NotImplementedError

    def _time(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        return t.expand(batch) if t.ndim == 0 else t

    def velocity_from_hidden(self, suffix_out: torch.Tensor) -> torch.Tensor:
        horizon = self.config.action_horizon
        return self.action_out_proj(suffix_out[:, -horizon:].to(self.action_out_proj.weight.dtype)).float()

    def denoise_velocity(self, x_t: torch.Tensor, t, prefix_kv: KVCache, **suffix_inputs) -> torch.Tensor:
        """The flow velocity v(x_t, t) given the cached prefix; (B, H, A) fp32."""
        t = self._time(t, x_t.shape[0])
        embs, ar, cond = self.embed_suffix(x_t.float(), t, **suffix_inputs)
        suffix_ar = torch.tensor(ar, dtype=torch.int64, device=embs.device)[None].expand(embs.shape[0], -1)
        out = self.paligemma_with_expert.suffix_forward(embs, suffix_ar, prefix_kv, cond)
        return self.velocity_from_hidden(out)

    def velocity_joint(self, images, tokens, token_mask, x_t, t, image_mask=None, **suffix_inputs):
        """The same velocity from one joint forward over prefix + suffix (no cache); for tests."""
        prefix_embs, prefix_valid = self.embed_prefix(images, tokens, token_mask, image_mask)
        t = self._time(t, x_t.shape[0])
        embs, ar, cond = self.embed_suffix(x_t.float(), t, **suffix_inputs)
        suffix_ar = torch.tensor(ar, dtype=torch.int64, device=embs.device)[None].expand(embs.shape[0], -1)
        _, out = self.paligemma_with_expert.joint_forward(prefix_embs, prefix_valid, embs, suffix_ar, cond)
        return self.velocity_from_hidden(out)

    @torch.no_grad()
    def sample_actions(self, images, tokens, token_mask, noise, num_steps=None, image_mask=None, **suffix_inputs):
        """Euler integration of the flow from t=1 (noise) to t=0: x += dt * v, dt = -1/num_steps,
        while t >= -dt/2 (t kept in fp32 and decremented as openpi does)."""
        num_steps = self.config.num_steps if num_steps is None else num_steps
        prefix_kv = self.compute_prefix_kv(images, tokens, token_mask, image_mask)
        x_t = noise.to(device=self.device, dtype=torch.float32)
        # t and dt stay 0-dim CPU fp32 tensors: exact openpi arithmetic, and no device sync per step.
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
        t = torch.tensor(1.0, dtype=torch.float32)
        while t >= -dt / 2:
            x_t = x_t + dt * self.denoise_velocity(x_t, t, prefix_kv, **suffix_inputs)
            t = t + dt
        return x_t


__all__ = [
    "PaliGemmaWithExpert",
    "PiReferenceBase",
    "sinusoidal_time_embedding",
    "check_joint_dims",
    "FP32_PARAMETERS",
]
