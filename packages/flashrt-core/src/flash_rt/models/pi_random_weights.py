"""True-size (or tiny) random Pi0 / Pi0.5 weights drawn directly on a device.

Used by ``flashrt bench`` (no multi-GB checkpoint on disk: the weights are drawn on the GPU) and by
the fast-path tests of both models. Names and shapes come from the one parameter table,
``flash_rt.models.pi_params`` (the tests check them against the reference model's own
``state_dict``). Scales are chosen so activations stay O(1) through every layer (fan-in scaled
GEMMs, small norm weights, non-zero adaRMS denses - zero ones would test nothing).
``flash_rt.models.pi_make_checkpoint`` writes checkpoints to disk (per-tensor seeded, on the host);
this module is the fast in-memory draw on the target device.
"""

from __future__ import annotations

import math

from flash_rt.models.pi_params import expected_tensors


def state_dict_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model (openpi-PyTorch names) with its shape, from ``pi_params``."""
    return {t.name: t.shape for t in expected_tensors(config)}


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
