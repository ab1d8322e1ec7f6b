"""Random-weight Pi0 / Pi0.5 checkpoints in every on-disk format (``flashrt make-checkpoint``).

Real checkpoints cannot be downloaded here; these stand in for them with the true key names,
shapes and dtypes of each format, so every loader path and every kernel sees what a real
checkpoint would give it. ``size="full"`` is the true model (~3.3 B parameters), generated and
written one tensor at a time (never all in memory); ``size="tiny"`` declares small explicit dims in
config.json. Each tensor is drawn from its own generator seeded by (seed, name), so the same seed
gives the same weights in every format and in any writing order.

Also written: normalisation stats in the format's own place (lerobot processor files, openpi
``assets/<asset_id>/norm_stats.json``) and the stand-in tokenizer (``paligemma_tokenizer.model``).
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flash_rt.errors import ConfigError
from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER, TOKENIZER_FILENAMES
from flash_rt.models.pi_config import CAMERA_SLOTS, GemmaDims, PiConfig, VisionDims
from flash_rt.models.pi_norm import (
    openpi_mode,
    random_feature_stats,
    write_lerobot_processors,
    write_openpi_norm_stats,
)
from flash_rt.models.pi_params import FP32_WHEN_BF16, UNUSED_KEYS, ExpectedTensor, expected_tensors

if TYPE_CHECKING:
    import torch

SIZES = ("tiny", "full")
FORMATS = ("lerobot", "openpi-pytorch", "openpi-jax")
MODEL_TYPES = ("pi05", "pi0")
OPENPI_ASSET_ID = "flashrt_random"
ROBOT_STATE_DIM = 8  # the stand-in robot: 8 state dims, 7 action dims (below the padded 32)
ROBOT_ACTION_DIM = 7
RANDOM_CHUNK = 1 << 22  # elements drawn at a time (16 MB of fp32)

# Small enough for a 2-core CPU, large enough to keep every structural feature: expert width
# different from the LLM width, MQA (1 KV head), 8 heads (lerobot hard-codes 8), several layers.
TINY_PALIGEMMA = GemmaDims(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16)
TINY_EXPERT = GemmaDims(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16)
TINY_VISION = VisionDims(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=14, image_size=56)


def make_config(model_type: str, size: str) -> PiConfig:
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model type {model_type!r}; accepted: {MODEL_TYPES}")
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; accepted: {SIZES}")
    config = PiConfig(
        model_type=model_type,
        max_token_len=200 if model_type == "pi05" else 48,
        state_dim=ROBOT_STATE_DIM,
        robot_action_dim=ROBOT_ACTION_DIM,
    )
    if size == "tiny":
        config = replace(config, paligemma=TINY_PALIGEMMA, expert=TINY_EXPERT, vision=TINY_VISION,
                         action_horizon=10)
    return config


# -- random tensors -----------------------------------------------------------------------------
def _init_scale(tensor: ExpectedTensor) -> tuple[float, float]:
    """(mean, std) of a plausible random init for this tensor."""
    name, shape = tensor.name, tensor.shape
    if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or \
            name.endswith("post_layernorm.weight"):
        return 1.0, 0.05  # LayerNorm gains
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return 0.0, 0.1  # RMSNorm scales enter as (1 + scale)
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name.endswith("dense.weight"):
        return 0.0, 0.5 / np.sqrt(shape[-1])  # adaRMS: non-zero on purpose (lerobot zero-inits them)
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0 / np.sqrt(shape[-1])
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return 0.0, 1.0 / np.sqrt(fan_in)


def random_tensor(tensor: ExpectedTensor, seed: int, dtype=None) -> torch.Tensor:
    import torch  # noqa: PLC0415

    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(tensor.name.encode())) % 2**63)
    mean, std = _init_scale(tensor)
    # Drawn in fixed-size fp32 chunks straight into the target dtype: the values depend only on
    # (seed, name, shape), and a bf16 embedding never passes through a full fp32 copy.
    out = torch.empty(tensor.shape, dtype=torch.float32 if dtype is None else dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), RANDOM_CHUNK):
        n = min(RANDOM_CHUNK, flat.numel() - start)
        flat[start:start + n] = torch.randn(n, generator=generator, dtype=torch.float32) * std + mean
    return out


def random_state_dict(config: PiConfig, seed: int = 0, dtype=None) -> dict[str, torch.Tensor]:
    """The whole model in memory (for tiny configs and tests); openpi-PyTorch names."""
    return {t.name: random_tensor(t, seed, dtype) for t in expected_tensors(config)}


# -- formats ------------------------------------------------------------------------------------
def _storage_dtype(tensor: ExpectedTensor, fmt: str, size: str) -> str:
    """The dtype each format stores a tensor in: tiny is fp32 throughout; full follows the real files
    (lerobot bf16 policy: Gemma matrices bf16, the rest fp32; openpi PyTorch: all bf16; JAX: fp32)."""
    if size == "tiny" or fmt == "openpi-jax":
        return "float32"
    if fmt == "openpi-pytorch":
        return "bfloat16"
    return "float32" if tensor.kind in FP32_WHEN_BF16 else "bfloat16"


def _dims_entries(config: PiConfig, size: str) -> dict:
    if size == "full":
        return {}
    return {"paligemma_dims": asdict(config.paligemma), "action_expert_dims": asdict(config.expert),
            "vision_dims": asdict(config.vision)}


def _lerobot_config_json(config: PiConfig, size: str) -> dict:
    quantile = config.model_type == "pi05"
    features = {f"observation.images.{slot}": {"type": "VISUAL", "shape": [3, 224, 224]} for slot in CAMERA_SLOTS}
    features["observation.state"] = {"type": "STATE", "shape": [config.state_dim or config.max_state_dim]}
    return {
        "type": config.model_type,
        "n_obs_steps": 1,
        "input_features": features,
        "output_features": {"action": {"type": "ACTION", "shape": [config.robot_action_dim or config.action_dim]}},
        "device": "cpu",
        "use_amp": False,
        "use_peft": False,
        "push_to_hub": False,
        "repo_id": None,
        "private": None,
        "tags": None,
        "license": None,
        "pretrained_path": None,
        "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m",
        "dtype": "float32" if size == "tiny" else "bfloat16",
        "chunk_size": config.action_horizon,
        "n_action_steps": config.action_horizon,
        "max_state_dim": config.max_state_dim,
        "max_action_dim": config.action_dim,
        "num_inference_steps": config.num_steps,
        "min_period": 0.004,
        "max_period": 4.0,
        "image_resolution": [config.vision.image_size, config.vision.image_size],
        "empty_cameras": 0,
        "tokenizer_max_length": config.max_token_len,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "QUANTILES" if quantile else "MEAN_STD",
                                  "ACTION": "QUANTILES" if quantile else "MEAN_STD"},
        **_dims_entries(config, size),
    }


def _openpi_config_json(config: PiConfig, size: str) -> dict:
    return {
        "action_dim": config.action_dim,
        "action_horizon": config.action_horizon,
        "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m",
        "precision": "float32" if size == "tiny" else "bfloat16",
        **_dims_entries(config, size),
    }


def _write_torch_weights(out: Path, config: PiConfig, fmt: str, size: str, seed: int) -> None:
    import torch  # noqa: PLC0415

    tensors = list(expected_tensors(config))
    prefix = "model." if fmt == "lerobot" else ""
    entries = [(prefix + t.name, t.shape, _storage_dtype(t, fmt, size)) for t in tensors]
    by_name = {t.name: t for t in tensors}
    extra: list[tuple[str, ExpectedTensor]] = []
    if fmt == "lerobot" and size == "full":
        # lerobot also saves both LM heads: paligemma's (a copy of the tied embedding) and the
        # expert's (unused). Readers drop them; the full size has them because real files do (tiny
        # leaves them out: they would triple its size).
        embed = by_name["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
        expert_head = ExpectedTensor(UNUSED_KEYS[1], (config.vocab_size, config.expert.width), "matrix",
                                     UNUSED_KEYS[1], None)
        extra = [(UNUSED_KEYS[0], embed), (UNUSED_KEYS[1], expert_head)]
        entries += [(prefix + name, t.shape, _storage_dtype(t, fmt, size)) for name, t in extra]

    def produce():
        for t in tensors:
            yield random_tensor(t, seed, getattr(torch, _storage_dtype(t, fmt, size)))
        for _, t in extra:
            yield random_tensor(t, seed, getattr(torch, _storage_dtype(t, fmt, size)))

    from flash_rt.executors.torch_weights import write_safetensors  # noqa: PLC0415

    layout = [(name, shape, getattr(torch, dtype)) for name, shape, dtype in entries]
    write_safetensors(out / "model.safetensors", zip([n for n, _, _ in entries], produce(), strict=True),
                      layout=layout)


def _random_stats(config: PiConfig, seed: int):
    rng = np.random.default_rng(seed + 7)
    return (random_feature_stats(rng, config.state_dim or config.max_state_dim),
            random_feature_stats(rng, config.robot_action_dim or config.action_dim))


def write_random_checkpoint(out_dir: str | Path, model_type: str, size: str = "tiny", fmt: str = "lerobot",
                            seed: int = 0) -> Path:
    """Write a random-weight ``model_type`` checkpoint of ``size`` in format ``fmt`` to ``out_dir``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; accepted: {FORMATS}")
    config = make_config(model_type, size)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state_stats, action_stats = _random_stats(config, seed)
    if fmt == "lerobot":
        _write_torch_weights(out, config, fmt, size, seed)
        (out / "config.json").write_text(json.dumps(_lerobot_config_json(config, size), indent=4))
        mode = openpi_mode(model_type)
        write_lerobot_processors(out, state_stats, action_stats, mode, mode,
                                 (config.state_dim,), (config.robot_action_dim,))
    elif fmt == "openpi-pytorch":
        _write_torch_weights(out, config, fmt, size, seed)
        (out / "config.json").write_text(json.dumps(_openpi_config_json(config, size), indent=2))
        write_openpi_norm_stats(out / "assets" / OPENPI_ASSET_ID / "norm_stats.json", state_stats, action_stats)
    else:
        from flash_rt.models import pi_jax  # noqa: PLC0415

        pi_jax.write_params(out / "params", config, lambda t: random_tensor(t, seed).numpy())
        if size == "tiny":  # a real JAX checkpoint has no config; tiny dims must be declared somewhere
            (out / "config.json").write_text(json.dumps(_openpi_config_json(config, size), indent=2))
        write_openpi_norm_stats(out / "assets" / OPENPI_ASSET_ID / "norm_stats.json", state_stats, action_stats)
    shutil.copyfile(STANDIN_TOKENIZER, out / TOKENIZER_FILENAMES[0])
    return out


# -- CLI ----------------------------------------------------------------------------------------
def add_make_checkpoint_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-checkpoint",
        help="write a random-weight Pi0 / Pi0.5 checkpoint (true key names, shapes and dtypes)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--config", choices=MODEL_TYPES, default="pi05", help="model type (default pi05)")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: small declared dims; full: the true ~3.3 B-parameter model")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="lerobot", help="on-disk format")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=cmd_make_checkpoint)


def cmd_make_checkpoint(args) -> int:
    out = write_random_checkpoint(args.out, args.config, size=args.size, fmt=args.fmt, seed=args.seed)
    config = make_config(args.config, args.size)
    from flash_rt.models.pi_params import num_parameters  # noqa: PLC0415

    print(f"wrote a random {args.config} checkpoint ({args.size}, {num_parameters(config) / 1e6:.1f} M "
          f"parameters, format {args.fmt}, seed {args.seed}) to {out}")
    print("its tokenizer is a stand-in: token ids mean nothing to a real checkpoint")
    return 0
