"""Read a Pi0 / Pi0.5 checkpoint in any of its three on-disk formats, detected automatically.

- ``lerobot``: HF-style directory, ``config.json`` (draccus ``PreTrainedConfig``: ``type`` pi05/pi0,
  ``paligemma_variant``, ``action_expert_variant``, ``chunk_size``, ``max_state_dim``, ...,
  ``input_features`` / ``output_features``) + ``model.safetensors`` with keys prefixed ``model.``;
  normalisation stats in the saved processor files.
- ``openpi-pytorch``: openpi's converted directory, ``model.safetensors`` without prefix +
  ``config.json`` ``{action_dim, action_horizon, paligemma_variant, action_expert_variant,
  precision}`` + ``assets/<asset_id>/norm_stats.json``. The model type is read off the weights.
- ``openpi-jax``: ``<ckpt>/params/`` orbax PyTree checkpoint (+ ``<ckpt>/assets``), read through the
  optional ``orbax-checkpoint`` package (see :mod:`flash_rt.models.pi_jax`).

A config may declare explicit ``paligemma_dims`` / ``action_expert_dims`` / ``vision_dims`` instead
of variant names (small test checkpoints do). Whatever the format, the weights are checked against
the declared dims - every tensor present, with its shape, layer counts equal - and any mismatch is a
:class:`CheckpointError` naming the problem. Nothing is ever left randomly initialised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flash_rt.errors import CheckpointError
from flash_rt.models.pi_config import (
    CAMERA_SLOTS,
    GEMMA_VARIANTS,
    VISION_VARIANTS,
    GemmaDims,
    PiConfig,
    VisionDims,
)
from flash_rt.models.pi_norm import (
    NormStats,
    find_openpi_norm_stats,
    load_lerobot_norm_stats,
    load_openpi_norm_stats,
)
from flash_rt.models.pi_params import (
    LAYER_DEPTH,
    MODEL_MARKERS,
    UNUSED_KEYS,
    count_layers,
    expected_tensors,
)

if TYPE_CHECKING:
    import torch

FORMATS = ("lerobot", "openpi-pytorch", "openpi-jax")
MODEL_TYPES = ("pi05", "pi0")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LEROBOT_PREFIX = "model."
TIED_WEIGHTS = {"paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight": UNUSED_KEYS[0]}
# openpi's token budgets (Pi0Config.max_token_len): used where the format does not say.
DEFAULT_MAX_TOKEN_LEN = {"pi05": 200, "pi0": 48}
IMAGES_PREFIX = "observation.images."
# PiConfig field <- the config.json keys that state it (for a JAX checkpoint's optional config).
JAX_CONFIG_OVERRIDES = {
    "paligemma": ("paligemma_dims", "paligemma_variant"),
    "expert": ("action_expert_dims", "action_expert_variant"),
    "vision": ("vision_dims", "vision_variant"),
    "action_dim": ("action_dim",),
    "action_horizon": ("action_horizon",),
    "max_state_dim": ("max_state_dim", "action_dim"),
    "max_token_len": ("max_token_len",),
    "num_steps": ("num_steps",),
}
STATE_FEATURE = "observation.state"
ACTION_FEATURE = "action"


@dataclass
class PiCheckpoint:
    config: PiConfig
    state_dict: dict[str, torch.Tensor]
    norm_stats: NormStats | None
    format: str
    directory: Path


# -- format detection ---------------------------------------------------------------------------
def _is_orbax_dir(path: Path) -> bool:
    markers = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "checkpoint")
    return path.is_dir() and any((path / m).exists() for m in markers)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}. Expected a JSON object.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _listing(directory: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"


def _jax_root(directory: Path) -> Path | None:
    """The checkpoint root whose params/ is an orbax tree (``directory`` itself may be params/)."""
    if _is_orbax_dir(directory / "params"):
        return directory
    if directory.name == "params" and _is_orbax_dir(directory):
        return directory.parent
    return None


def detect_format(path: str | Path) -> str:
    """"lerobot" | "openpi-pytorch" | "openpi-jax" for the checkpoint directory ``path``."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is a file; a Pi0/Pi0.5 checkpoint is a directory (config.json + model.safetensors, "
            f"or an openpi checkpoint with params/)"
        )
    if _jax_root(directory) is not None:
        return "openpi-jax"
    has_weights = (directory / WEIGHTS_FILE).is_file() or (directory / WEIGHTS_INDEX).is_file()
    config_path = directory / "config.json"
    if not has_weights and (directory / "params").is_dir():
        raise CheckpointError(
            f"{directory / 'params'} holds no orbax checkpoint (no _METADATA / manifest.ocdbt); the openpi JAX "
            f"checkpoint is incomplete. Found in it: {_listing(directory / 'params')}"
        )
    if not has_weights:
        raise CheckpointError(
            f"no weights in {directory}: expected {WEIGHTS_FILE} (lerobot or openpi PyTorch) or an orbax "
            f"params/ directory (openpi JAX); found: {_listing(directory)}"
        )
    if config_path.is_file():
        config = _read_json(config_path)
        if "type" in config:
            return "lerobot"
        if "action_horizon" in config or "action_dim" in config or "paligemma_variant" in config:
            return "openpi-pytorch"
    # No telling config: the weight names decide (lerobot prefixes them with "model.").
    names = _safetensors_source(directory, strip_prefix="").names()
    if any(n.startswith(LEROBOT_PREFIX) for n in names):
        return "lerobot"
    return "openpi-pytorch"


# -- tensor sources -----------------------------------------------------------------------------
class _Tensors:
    """The view this module reads through: names (openpi-PyTorch), shape/dtype, read, tied aliases.

    Wraps a ``flash_rt.executors`` weight source (safetensors: headers checked up front, so a
    truncated file is reported before any read; tensors read one at a time).
    """

    def __init__(self, source):
        self._source = source
        self._aliases: dict[str, str] = {}

    def alias(self, name: str, existing: str) -> None:
        """Make ``name`` read the tensor stored as ``existing`` (a tied weight saved once)."""
        self._aliases[name] = existing

    def names(self) -> list[str]:
        return [*self._source.keys(), *self._aliases]

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        meta = self._source.meta(self._aliases.get(name, name))
        return tuple(meta.shape), str(meta.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._source.read(self._aliases.get(name, name))


def _safetensors_source(directory: Path, strip_prefix: str) -> _Tensors:
    from flash_rt.executors.torch_weights import SafetensorsSource  # noqa: PLC0415

    single = directory / WEIGHTS_FILE
    # Name the file when there is one: a lerobot directory also holds the processors' stats files.
    source = _Tensors(SafetensorsSource(single if single.is_file() else directory,
                                        strip_prefix=strip_prefix or None))
    # safetensors' save_model keeps one name of a tied pair - for PaliGemma the LM head, not the
    # embedding. The embedding is then read from the head.
    names = set(source.names())
    for name, tied in TIED_WEIGHTS.items():
        if name not in names and tied in names:
            source.alias(name, tied)
    return source


# -- config -------------------------------------------------------------------------------------
def _dims(cls, value: Any, where: str):
    names = [f.name for f in fields(cls)]
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: expected an object with {names}, found {value!r}")
    missing = [n for n in names if n not in value]
    if missing:
        raise CheckpointError(f"{where}: missing {missing}; expected the fields {names}")
    try:
        return cls(**{n: int(value[n]) for n in names})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: every field must be an integer ({exc})") from exc


def gemma_dims(config: Mapping[str, Any], dims_key: str, variant_key: str, default: str, where: str) -> GemmaDims:
    if config.get(dims_key) is not None:
        return _dims(GemmaDims, config[dims_key], f"{where} {dims_key}")
    variant = config.get(variant_key) or default
    if variant not in GEMMA_VARIANTS:
        raise CheckpointError(
            f"{where}: unknown {variant_key} {variant!r}; known variants: {sorted(GEMMA_VARIANTS)} "
            f"(or declare explicit {dims_key})"
        )
    return GEMMA_VARIANTS[variant]


def vision_dims(config: Mapping[str, Any], where: str) -> VisionDims:
    if config.get("vision_dims") is not None:
        return _dims(VisionDims, config["vision_dims"], f"{where} vision_dims")
    variant = config.get("vision_variant") or "So400m/14"
    if variant not in VISION_VARIANTS:
        raise CheckpointError(f"{where}: unknown vision_variant {variant!r}; known: {sorted(VISION_VARIANTS)}")
    return VISION_VARIANTS[variant]


def _int(config: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: {key} must be a positive integer, found {value!r}")
    return value


def _feature_dim(features: Mapping[str, Any] | None, key: str) -> int | None:
    feature = (features or {}).get(key)
    if not isinstance(feature, Mapping) or not feature.get("shape"):
        return None
    return int(feature["shape"][-1])


def lerobot_config(config: Mapping[str, Any], where: str) -> PiConfig:
    model_type = config.get("type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{where}: lerobot policy type {model_type!r} is not a Pi0/Pi0.5 policy; expected one of "
            f"{MODEL_TYPES}"
        )
    vision = vision_dims(config, where)
    resolution = config.get("image_resolution")
    if resolution is not None and config.get("vision_dims") is None:
        if len(resolution) != 2 or resolution[0] != resolution[1]:
            raise CheckpointError(f"{where}: image_resolution must be square, found {resolution}")
        vision = replace(vision, image_size=int(resolution[0]))
    inputs = config.get("input_features") or {}
    cameras = tuple(
        key[len(IMAGES_PREFIX):] if key.startswith(IMAGES_PREFIX) else key
        for key, feature in inputs.items()
        if isinstance(feature, Mapping) and feature.get("type") == "VISUAL"
    )
    max_state_dim = _int(config, "max_state_dim", 32, where)
    max_action_dim = _int(config, "max_action_dim", 32, where)
    state_dim = _feature_dim(inputs, STATE_FEATURE)
    action_dim = _feature_dim(config.get("output_features"), ACTION_FEATURE)
    return PiConfig(
        model_type=model_type,
        paligemma=gemma_dims(config, "paligemma_dims", "paligemma_variant", "gemma_2b", where),
        expert=gemma_dims(config, "action_expert_dims", "action_expert_variant", "gemma_300m", where),
        vision=vision,
        action_dim=max_action_dim,
        action_horizon=_int(config, "chunk_size", 50, where),
        max_state_dim=max_state_dim,
        max_token_len=_int(config, "tokenizer_max_length", DEFAULT_MAX_TOKEN_LEN[model_type], where),
        num_steps=_int(config, "num_inference_steps", 10, where),
        state_dim=state_dim if state_dim is not None and state_dim < max_state_dim else None,
        robot_action_dim=action_dim if action_dim is not None and action_dim < max_action_dim else None,
        camera_keys=cameras or CAMERA_SLOTS,
    )


def openpi_config(config: Mapping[str, Any], model_type: str, where: str) -> PiConfig:
    action_dim = _int(config, "action_dim", 32, where)
    return PiConfig(
        model_type=model_type,
        paligemma=gemma_dims(config, "paligemma_dims", "paligemma_variant", "gemma_2b", where),
        expert=gemma_dims(config, "action_expert_dims", "action_expert_variant", "gemma_300m", where),
        vision=vision_dims(config, where),
        action_dim=action_dim,
        action_horizon=_int(config, "action_horizon", 50, where),
        # openpi pads the state to the action dim
        max_state_dim=_int(config, "max_state_dim", action_dim, where),
        max_token_len=_int(config, "max_token_len", DEFAULT_MAX_TOKEN_LEN[model_type], where),
        num_steps=_int(config, "num_steps", 10, where),
    )


# -- checks -------------------------------------------------------------------------------------
def model_type_of(names: Iterable[str], where: str) -> str:
    names = set(names)
    found = [t for t, marker in MODEL_MARKERS.items() if marker in names]
    if len(found) != 1:
        if "action_in_proj.weight" not in names:
            hint = "no action expert at all (a Pi0-FAST or plain PaliGemma checkpoint?)"
        else:
            hint = f"markers {[MODEL_MARKERS[t] for t in found] or 'none'}"
        raise CheckpointError(
            f"{where}: cannot tell Pi0 from Pi0.5 by the weights ({hint}); a Pi0.5 checkpoint holds "
            f"{MODEL_MARKERS['pi05']!r}, a Pi0 checkpoint {MODEL_MARKERS['pi0']!r}"
        )
    return found[0]


def check_model_type(found: str, expected: str | None, where: str) -> None:
    if expected is not None and expected not in MODEL_TYPES:
        raise CheckpointError(f"unknown Pi model type {expected!r}; expected one of {MODEL_TYPES}")
    if expected is not None and found != expected:
        raise CheckpointError(
            f"{where} holds a {found} model, but config={expected!r} was requested; load it with "
            f"config={found!r}"
        )


def check_tensors(config: PiConfig, metas: Mapping[str, tuple[tuple[int, ...], str]], where: str) -> None:
    """Every expected tensor present with its shape, layer counts as declared, nothing unknown."""
    names = set(metas)
    for depth in LAYER_DEPTH:
        declared = LAYER_DEPTH[depth](config)
        found = count_layers(names, depth)
        if found != declared:
            raise CheckpointError(
                f"{where}: the config declares {declared} {depth} layers but the weights hold {found}; the "
                f"config.json does not describe these weights (check its variant / *_dims entries)"
            )
    expected = list(expected_tensors(config))
    missing = [t.name for t in expected if t.name not in names]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}; the checkpoint is incomplete or "
            f"not a {config.model_type} model"
        )
    for tensor in expected:
        shape = tuple(metas[tensor.name][0])
        if shape != tensor.shape:
            raise CheckpointError(
                f"{where}: tensor {tensor.name} has shape {shape}, expected {tensor.shape} for the declared "
                f"dims (paligemma {config.paligemma}, expert {config.expert}, vision {config.vision}, "
                f"action_dim {config.action_dim})"
            )
    unknown = sorted(names - {t.name for t in expected} - set(UNUSED_KEYS))
    if unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} tensor(s) that a {config.model_type} model does not have, e.g. "
            f"{unknown[:3]}"
        )


# -- loading ------------------------------------------------------------------------------------
def _read_state_dict(source, config: PiConfig, dtype, device) -> dict[str, torch.Tensor]:
    state_dict = {}
    for tensor in expected_tensors(config):
        try:
            value = source.read(tensor.name)
        except Exception as exc:  # a file that is corrupt past its header
            raise CheckpointError(f"cannot read tensor {tensor.name}: {exc}") from exc
        state_dict[tensor.name] = value.to(device=device, dtype=dtype)
    return state_dict


def _norm_stats_openpi(root: Path, model_type: str, asset_id: str | None) -> NormStats | None:
    path = find_openpi_norm_stats(root / "assets", asset_id)
    return None if path is None else load_openpi_norm_stats(path, model_type)


def load_pi_checkpoint(
    path: str | Path,
    expected_type: str | None,
    *,
    dtype=None,
    device="cpu",
    asset_id: str | None = None,
) -> PiCheckpoint:
    """Read, check and load the checkpoint at ``path`` (any format) as openpi-PyTorch named tensors.

    ``expected_type`` ("pi05" | "pi0" | None to accept either) must match the model in the files.
    ``dtype`` defaults to float32. ``asset_id`` picks openpi norm stats when several are present.
    """
    import torch  # noqa: PLC0415

    dtype = torch.float32 if dtype is None else dtype
    directory = Path(path).expanduser()
    fmt = detect_format(directory)
    if fmt == "openpi-jax":
        from flash_rt.models import pi_jax  # noqa: PLC0415

        root = _jax_root(directory)
        source, declared = pi_jax.open_params(root / "params")
        model_type = model_type_of(source.names(), str(root))
        check_model_type(model_type, expected_type, str(root))
        # No config in a JAX checkpoint: dims come from the array shapes. An optional config.json
        # (openpi-PyTorch form) beside params/ overrides what it states (horizon, token budget, dims).
        config = pi_jax.infer_config(source, model_type, declared)
        config_path = root / "config.json"
        if config_path.is_file():
            raw = _read_json(config_path)
            stated = openpi_config(raw, model_type, str(config_path))
            overrides = {field: getattr(stated, field) for field, keys in JAX_CONFIG_OVERRIDES.items()
                         if any(k in raw for k in keys)}
            config = replace(config, **overrides)
        norm_stats = _norm_stats_openpi(root, model_type, asset_id)
        directory = root
    elif fmt == "lerobot":
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{directory}: lerobot checkpoint without config.json")
        raw = _read_json(config_path)
        source = _safetensors_source(directory, strip_prefix=LEROBOT_PREFIX)
        config = lerobot_config(raw, str(config_path))
        check_model_type(config.model_type, expected_type, str(directory))
        weights_type = model_type_of(source.names(), str(directory))
        if weights_type != config.model_type:
            raise CheckpointError(
                f"{directory}: config.json says type {config.model_type!r} but the weights are a {weights_type} "
                f"model"
            )
        norm_stats = load_lerobot_norm_stats(directory)
    else:
        config_path = directory / "config.json"
        raw = _read_json(config_path) if config_path.is_file() else {}
        source = _safetensors_source(directory, strip_prefix="")
        model_type = model_type_of(source.names(), str(directory))
        check_model_type(model_type, expected_type, str(directory))
        config = openpi_config(raw, model_type, str(config_path))
        norm_stats = _norm_stats_openpi(directory, model_type, asset_id)

    check_tensors(config, {n: source.meta(n) for n in source.names()}, str(directory))
    if norm_stats is not None:
        config = _with_norm_dims(config, norm_stats)
    state_dict = _read_state_dict(source, config, dtype, device)
    return PiCheckpoint(config=config, state_dict=state_dict, norm_stats=norm_stats, format=fmt,
                        directory=directory)


def _with_norm_dims(config: PiConfig, stats: NormStats) -> PiConfig:
    """Fill the robot's real dims from the norm stats where the config left them open."""
    updates = {}
    if config.state_dim is None and stats.state_dim is not None and stats.state_dim < config.max_state_dim:
        updates["state_dim"] = stats.state_dim
    if (config.robot_action_dim is None and stats.action_dim is not None
            and stats.action_dim < config.action_dim):
        updates["robot_action_dim"] = stats.action_dim
    if stats.state_dim is not None and stats.state_dim > config.max_state_dim:
        raise CheckpointError(
            f"{stats.source}: state stats cover {stats.state_dim} dims, more than max_state_dim "
            f"{config.max_state_dim}"
        )
    if stats.action_dim is not None and stats.action_dim > config.action_dim:
        raise CheckpointError(
            f"{stats.source}: action stats cover {stats.action_dim} dims, more than the model's action dim "
            f"{config.action_dim}"
        )
    return replace(config, **updates) if updates else config


__all__ = [
    "FORMATS",
    "PiCheckpoint",
    "detect_format",
    "load_pi_checkpoint",
    "lerobot_config",
    "openpi_config",
]
