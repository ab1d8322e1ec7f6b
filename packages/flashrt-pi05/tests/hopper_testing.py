"""Shared helpers of the Hopper pipeline tests (Pi0.5 and Pi0): tiny configs, inputs, metrics."""

from __future__ import annotations

import numpy as np
import torch

from flash_rt.models.pi_config import GEMMA_VARIANTS, PiConfig, VisionDims
from flashrt_pi05.bench import true_size_config  # noqa: F401  (the tests and scripts take it from here)

# SigLIP-like but tiny: 56x56 images, 14-pixel patches -> a 4x4 grid (pool factors 2 and 4 divide it).
TINY_VISION = VisionDims(width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=14, image_size=56)


def tiny_config(model_type: str, **overrides) -> PiConfig:
    fields = dict(
        model_type=model_type, paligemma=GEMMA_VARIANTS["dummy"], expert=GEMMA_VARIANTS["dummy"],
        vision=TINY_VISION, vocab_size=300, action_horizon=10, max_token_len=24 if model_type == "pi05" else 16,
    )
    fields.update(overrides)
    return PiConfig(**fields)


def reference_class(model_type: str):
    if model_type == "pi05":
        from flashrt_pi05.reference import Pi05Reference

        return Pi05Reference
    from flashrt_pi0.reference import Pi0Reference

    return Pi0Reference


def pipeline_class(model_type: str):
    if model_type == "pi05":
        from flashrt_pi05.pipeline_hopper import Pi05HopperPipeline

        return Pi05HopperPipeline
    from flashrt_pi0.pipeline_hopper import Pi0HopperPipeline

    return Pi0HopperPipeline


def random_reference(config, device="cuda", seed=0):
    """The fp32 reference with random weights drawn directly on ``device`` (what ``flashrt bench``
    measures; no state_dict round trip at 3B parameters)."""
    from flash_rt.models.pi_random_weights import fill_random_

    with torch.device(device):
        ref = reference_class(config.model_type)(config)
    fill_random_(ref, seed=seed)
    return ref.eval()


def make_reference(config, state_dict, device="cpu", **kwargs):
    ref = reference_class(config.model_type)(config, **kwargs)
    ref.load_state_dict(state_dict, strict=True)
    return ref.to(device).eval()


def random_inputs(config, num_views: int, prompt_len: int, seed: int, device="cpu"):
    """uint8 images (and the reference's [-1, 1] view of them), padded token ids + mask (prompt_len
    valid), noise, state: random, never zeros."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images_u8 = torch.randint(0, 256, (num_views, size, size, 3), generator=g, dtype=torch.uint8)
    images = images_u8.float() / 255.0 * 2.0 - 1.0
    tokens = torch.zeros((config.max_token_len,), dtype=torch.int64)
    tokens[:prompt_len] = torch.randint(3, config.vocab_size, (prompt_len,), generator=g)
    mask = torch.zeros((config.max_token_len,), dtype=torch.bool)
    mask[:prompt_len] = True
    noise = torch.randn((config.action_horizon, config.action_dim), generator=g)
    state = torch.rand((config.max_state_dim,), generator=g) * 2 - 1
    return {k: v.to(device) for k, v in dict(images=images, images_u8=images_u8, tokens=tokens, mask=mask, noise=noise, state=state).items()}


def cosine(a, b) -> float:
    a = torch.as_tensor(a).double().flatten().cpu()
    b = torch.as_tensor(b).double().flatten().cpu()
    return float(a @ b / (a.norm() * b.norm()))


def max_abs_err(a, b) -> float:
    return float((torch.as_tensor(a).double().cpu() - torch.as_tensor(b).double().cpu()).abs().max())


def rel_err(a, b) -> float:
    """max |a - b| / max(1, max |b|): DESIGN.md's scale-aware error."""
    b = torch.as_tensor(b).double().cpu()
    return max_abs_err(a, b) / max(1.0, float(b.abs().max()))


def suffix_kwargs(config, inputs) -> dict:
    return {} if config.is_pi05 else {"state": inputs["state"][None]}


def run_reference(ref, config, inputs, num_steps=None):
    """fp32 reference: actions (H, A) and its stage outputs (image tokens, prefix KV, v at step 1)."""
    images, tokens, mask = inputs["images"][None], inputs["tokens"][None], inputs["mask"][None]
    with torch.no_grad():
        image_tokens = ref.embed_images(images)[0]
        kv = ref.compute_prefix_kv(images, tokens, mask)
        v1 = ref.denoise_velocity(inputs["noise"][None], 1.0, kv, **suffix_kwargs(config, inputs))[0]
        actions = ref.sample_actions(images, tokens, mask, inputs["noise"][None], num_steps=num_steps,
                                     **suffix_kwargs(config, inputs))[0]
    return {"image_tokens": image_tokens, "kv": kv, "v1": v1, "actions": actions}


def load_pipeline_inputs(pipe, config, inputs):
    ids = inputs["tokens"][inputs["mask"]].cpu().numpy()
    bucket = pipe.set_prompt_tokens(ids)
    pipe.load_inputs(inputs["images_u8"], inputs["noise"], None if config.is_pi05 else inputs["state"])
    return bucket


def prefix_kv_of_reference(kv, layer: int, num_image_tokens: int, prompt_len: int):
    """The reference's valid prefix K/V of one layer as (P, Hkv, D) (its padding dropped)."""
    keys, values = kv.keys[layer][0], kv.values[layer][0]  # (Hkv, T, D)
    n = num_image_tokens + prompt_len
    return keys[:, :n].transpose(0, 1), values[:, :n].transpose(0, 1)


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return cosine(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b)))
