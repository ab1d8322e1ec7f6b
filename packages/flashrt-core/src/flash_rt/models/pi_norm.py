"""Normalisation statistics of Pi0 / Pi0.5 checkpoints: state in, actions out.

Two on-disk homes, two slightly different formulas:

- openpi: ``assets/<asset_id>/norm_stats.json`` = ``{"norm_stats": {"state": {...}, "actions": {...}}}``
  with ``mean``, ``std``, ``q01``, ``q99`` lists. Pi0.5 (and Pi0-FAST) use quantiles, Pi0 mean/std.
  openpi always adds 1e-6 to the denominator: ``(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`` and
  ``(x - mean) / (std + 1e-6)``; the inverses multiply by the same padded denominator.
- lerobot: the policy's processor files. ``policy_preprocessor.json`` lists steps; the step with
  ``registry_name == "normalizer_processor"`` names a ``state_file`` (safetensors) holding flat keys
  ``"observation.state.q01"``, ``"action.mean"``, ... and a config with ``norm_map``
  (``{"STATE": "QUANTILES", "ACTION": "MEAN_STD", ...}``) and ``eps``. ``policy_postprocessor.json``
  holds the same for ``unnormalizer_processor``. lerobot adds eps to std only, and to a
  quantile / min-max range only where the range is exactly zero; its inverses use no eps.

``normalize_state`` pads nothing (the model pads to ``max_state_dim``); ``unnormalize_actions``
keeps the first ``action_dim`` dims of the model's (padded) output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flash_rt.errors import CheckpointError, InputError

MODES = ("quantile", "mean_std", "min_max", "identity")
OPENPI_EPS = 1e-6
LEROBOT_DEFAULT_EPS = 1e-8
LEROBOT_MODES = {"QUANTILES": "quantile", "MEAN_STD": "mean_std", "MIN_MAX": "min_max", "IDENTITY": "identity"}
LEROBOT_STATE_KEY = "observation.state"
LEROBOT_ACTION_KEY = "action"
LEROBOT_PREPROCESSOR = "policy_preprocessor.json"
LEROBOT_POSTPROCESSOR = "policy_postprocessor.json"
ENV_ASSET_ID = "FLASH_RT_PI_ASSET_ID"

# The statistics each mode needs.
_NEEDS = {"quantile": ("q01", "q99"), "mean_std": ("mean", "std"), "min_max": ("min", "max"), "identity": ()}


@dataclass(frozen=True)
class FeatureStats:
    """Per-dimension statistics of one feature (state or actions); any may be absent."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    @property
    def dim(self) -> int:
        for value in (self.q01, self.mean, self.min, self.q99, self.std, self.max):
            if value is not None:
                return int(value.shape[-1])
        return 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], where: str) -> FeatureStats:
        arrays = {}
        for name in ("mean", "std", "q01", "q99", "min", "max"):
            if values.get(name) is None:
                continue
            array = np.asarray(values[name], dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(array)):
                raise CheckpointError(f"{where}: statistic {name!r} holds NaN or inf; the stats file is corrupt")
            arrays[name] = array
        dims = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(dims.values())) > 1:
            raise CheckpointError(f"{where}: statistics disagree on the dimension: {dims}")
        return cls(**arrays)


@dataclass(frozen=True)
class NormStats:
    """How to normalise the state and unnormalise the actions of one checkpoint."""

    state: FeatureStats | None
    actions: FeatureStats | None
    state_mode: str = "quantile"
    action_mode: str = "quantile"
    convention: str = "openpi"  # "openpi" | "lerobot": where the eps goes (see the module doc)
    eps: float = OPENPI_EPS
    source: str = field(default="", compare=False)

    def __post_init__(self):
        for label, mode, stats in (("state", self.state_mode, self.state), ("actions", self.action_mode,
                                                                             self.actions)):
            if mode not in MODES:
                raise CheckpointError(f"{self.source}: unknown {label} normalisation {mode!r}; known: {MODES}")
            missing = [n for n in _NEEDS[mode] if stats is None or getattr(stats, n) is None]
            if missing:
                raise CheckpointError(
                    f"{self.source}: {label} normalisation {mode!r} needs {', '.join(_NEEDS[mode])}, "
                    f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
                )

    @property
    def mode(self) -> str:
        """The normalisation mode ("quantile" | "mean_std" | ...); "state/actions" if they differ."""
        if self.state_mode == self.action_mode:
            return self.state_mode
        return f"{self.state_mode}/{self.action_mode}"

    @property
    def state_dim(self) -> int | None:
        return None if self.state is None else self.state.dim or None

    @property
    def action_dim(self) -> int | None:
        return None if self.actions is None else self.actions.dim or None

    # -- the two transforms --------------------------------------------------------------------
    def normalize_state(self, x: np.ndarray) -> np.ndarray:
        """Map a raw state (..., d) to model space; d may be below the stats' dim (openpi slices)."""
        x = np.asarray(x, dtype=np.float64)
        if self.state is None or self.state_mode == "identity":
            return x.astype(np.float32)
        dim = self.state.dim
        if x.shape[-1] > dim:
            raise InputError(
                f"state has {x.shape[-1]} dims but the checkpoint's norm stats cover {dim}; pass the robot's "
                f"unpadded state of {dim} values"
            )
        s = _sliced(self.state, x.shape[-1])
        lerobot = self.convention == "lerobot"
        if self.state_mode == "quantile":
            lo, rng = s.q01, s.q99 - s.q01
            rng = np.where(rng == 0, self.eps, rng) if lerobot else rng + self.eps
            out = (x - lo) / rng * 2.0 - 1.0
        elif self.state_mode == "mean_std":
            out = (x - s.mean) / (s.std + self.eps)
        else:  # min_max (lerobot only)
            rng = s.max - s.min
            rng = np.where(rng == 0, self.eps, rng)
            out = (x - s.min) / rng * 2.0 - 1.0
        return out.astype(np.float32)

    def unnormalize_actions(self, a: np.ndarray) -> np.ndarray:
        """Map model actions (..., D >= action_dim) back to robot units; keeps the first action_dim dims."""
        a = np.asarray(a, dtype=np.float64)
        if self.actions is None:
            return a.astype(np.float32)
        dim = self.actions.dim
        if a.shape[-1] < dim:
            raise InputError(f"actions have {a.shape[-1]} dims, fewer than the {dim} the norm stats cover")
        a = a[..., :dim]
        s = self.actions
        lerobot = self.convention == "lerobot"
        if self.action_mode == "identity":
            out = a
        elif self.action_mode == "quantile":
            rng = s.q99 - s.q01
            rng = np.where(rng == 0, self.eps, rng) if lerobot else rng + self.eps
            out = (a + 1.0) / 2.0 * rng + s.q01
        elif self.action_mode == "mean_std":
            out = a * s.std + s.mean if lerobot else a * (s.std + self.eps) + s.mean
        else:
            rng = s.max - s.min
            rng = np.where(rng == 0, self.eps, rng)
            out = (a + 1.0) / 2.0 * rng + s.min
        return out.astype(np.float32)


def _sliced(stats: FeatureStats, dim: int) -> FeatureStats:
    return FeatureStats(**{k: (None if v is None else v[:dim]) for k, v in vars(stats).items()})


# -- openpi -------------------------------------------------------------------------------------
def openpi_mode(model_type: str) -> str:
    """openpi normalises Pi0 with mean/std and every later model (Pi0.5, Pi0-FAST) with quantiles."""
    return "mean_std" if model_type == "pi0" else "quantile"


def find_openpi_norm_stats(assets_dir: Path, asset_id: str | None = None) -> Path | None:
    """The norm_stats.json under ``assets_dir`` (one asset id, or the one named)."""
    asset_id = asset_id or os.environ.get(ENV_ASSET_ID) or None
    if not assets_dir.is_dir():
        return None
    if asset_id is not None:
        path = assets_dir / asset_id / "norm_stats.json"
        if not path.is_file():
            found = sorted(p.parent.name for p in assets_dir.glob("*/norm_stats.json"))
            raise CheckpointError(f"no norm stats for asset id {asset_id!r} under {assets_dir}; found: {found}")
        return path
    candidates = sorted(assets_dir.glob("**/norm_stats.json"))
    if not candidates:
        return None
    if len(candidates) > 1:
        ids = [str(p.parent.relative_to(assets_dir)) for p in candidates]
        raise CheckpointError(
            f"{assets_dir} holds norm stats for several asset ids {ids}; choose one with the environment "
            f"variable {ENV_ASSET_ID}=<asset id> (or asset_id= where the API takes it)"
        )
    return candidates[0]


def load_openpi_norm_stats(path: Path, model_type: str) -> NormStats:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read norm stats {path}: {exc}") from exc
    table = data.get("norm_stats", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: expected {{'norm_stats': {{'state': ..., 'actions': ...}}}}")
    state = table.get("state")
    actions = table.get("actions")
    if state is None and actions is None:
        raise CheckpointError(f"{path}: no 'state' or 'actions' entry; found keys {sorted(table)}")
    mode = openpi_mode(model_type)
    return NormStats(
        state=None if state is None else FeatureStats.from_mapping(state, f"{path} [state]"),
        actions=None if actions is None else FeatureStats.from_mapping(actions, f"{path} [actions]"),
        state_mode=mode if state is not None else "identity",
        action_mode=mode if actions is not None else "identity",
        convention="openpi",
        eps=OPENPI_EPS,
        source=str(path),
    )


def write_openpi_norm_stats(path: Path, state: FeatureStats, actions: FeatureStats) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def as_dict(stats: FeatureStats) -> dict:
        return {k: v.tolist() for k, v in vars(stats).items() if v is not None and k in ("mean", "std", "q01",
                                                                                      "q99")}

    path.write_text(json.dumps({"norm_stats": {"state": as_dict(state), "actions": as_dict(actions)}}, indent=2))
    return path


# -- lerobot ------------------------------------------------------------------------------------
def _lerobot_step(directory: Path, pipeline_file: str, registry_name: str):
    """(config, stats dict) of the named step of a lerobot processor pipeline, or None."""
    path = directory / pipeline_file
    if not path.is_file():
        return None
    try:
        pipeline = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read lerobot processor config {path}: {exc}") from exc
    for step in pipeline.get("steps", []):
        if step.get("registry_name") != registry_name:
            continue
        state_file = step.get("state_file")
        if not state_file:
            return None
        stats_path = directory / state_file
        if not stats_path.is_file():
            raise CheckpointError(f"{path} names the stats file {state_file}, which is missing from {directory}")
        from safetensors.numpy import load_file  # noqa: PLC0415

        try:
            flat = load_file(str(stats_path))
        except Exception as exc:
            raise CheckpointError(f"cannot read lerobot stats {stats_path}: {exc}") from exc
        return step.get("config", {}), flat, stats_path
    return None


def _lerobot_feature(flat: Mapping[str, np.ndarray], key: str, where: str) -> FeatureStats | None:
    prefix = key + "."
    values = {name[len(prefix):]: value for name, value in flat.items() if name.startswith(prefix)}
    return FeatureStats.from_mapping(values, f"{where} [{key}]") if values else None


def load_lerobot_norm_stats(directory: Path) -> NormStats | None:
    """Stats from lerobot's saved processors next to the policy; None when there are none."""
    directory = Path(directory)
    pre = _lerobot_step(directory, LEROBOT_PREPROCESSOR, "normalizer_processor")
    post = _lerobot_step(directory, LEROBOT_POSTPROCESSOR, "unnormalizer_processor")
    if pre is None and post is None:
        return None
    state = actions = None
    norm_map: dict = {}
    eps = LEROBOT_DEFAULT_EPS
    sources = []
    for found in (pre, post):
        if found is None:
            continue
        config, flat, stats_path = found
        sources.append(stats_path.name)
        norm_map = {**config.get("norm_map", {}), **norm_map}
        eps = float(config.get("eps", eps))
        state = state or _lerobot_feature(flat, LEROBOT_STATE_KEY, str(stats_path))
    if post is not None:  # the unnormalizer is the authority for actions
        actions = _lerobot_feature(post[1], LEROBOT_ACTION_KEY, str(post[2]))
    if actions is None and pre is not None:
        actions = _lerobot_feature(pre[1], LEROBOT_ACTION_KEY, str(pre[2]))

    def mode(feature_type: str, stats) -> str:
        if stats is None:
            return "identity"
        name = norm_map.get(feature_type, "IDENTITY")
        if name not in LEROBOT_MODES:
            raise CheckpointError(
                f"{directory}: lerobot normalisation {name!r} for {feature_type} is not supported; supported: "
                f"{sorted(LEROBOT_MODES)}"
            )
        return LEROBOT_MODES[name]

    return NormStats(
        state=state,
        actions=actions,
        state_mode=mode("STATE", state),
        action_mode=mode("ACTION", actions),
        convention="lerobot",
        eps=eps,
        source=f"{directory} ({', '.join(sources)})",
    )


_LEROBOT_MODE_NAMES = {v: k for k, v in LEROBOT_MODES.items()}


def write_lerobot_processors(
    directory: Path, state: FeatureStats, actions: FeatureStats, state_mode: str, action_mode: str,
    state_shape: tuple[int, ...], action_shape: tuple[int, ...],
) -> None:
    """Write the normaliser / unnormaliser steps the way lerobot's processor pipelines save them."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    directory = Path(directory)
    flat = {}
    for key, stats in ((LEROBOT_STATE_KEY, state), (LEROBOT_ACTION_KEY, actions)):
        for name, value in vars(stats).items():
            if value is not None:
                flat[f"{key}.{name}"] = np.asarray(value, dtype=np.float32)
    norm_map = {"VISUAL": "IDENTITY", "STATE": _LEROBOT_MODE_NAMES[state_mode],
                "ACTION": _LEROBOT_MODE_NAMES[action_mode]}
    features = {LEROBOT_STATE_KEY: {"type": "STATE", "shape": list(state_shape)},
                LEROBOT_ACTION_KEY: {"type": "ACTION", "shape": list(action_shape)}}
    for pipeline_name, step_name, index in (("policy_preprocessor", "normalizer_processor", 0),
                                            ("policy_postprocessor", "unnormalizer_processor", 0)):
        state_file = f"{pipeline_name}_step_{index}_{step_name}.safetensors"
        save_file(flat, str(directory / state_file))
        pipeline = {"name": pipeline_name, "steps": [{
            "registry_name": step_name,
            "config": {"eps": LEROBOT_DEFAULT_EPS, "features": features, "norm_map": norm_map},
            "state_file": state_file,
        }]}
        (directory / f"{pipeline_name}.json").write_text(json.dumps(pipeline, indent=2))


def random_feature_stats(rng: np.random.Generator, dim: int) -> FeatureStats:
    """Plausible random stats (q01 < mean < q99, std > 0) for a test checkpoint."""
    mean = rng.normal(0.0, 0.5, dim)
    std = rng.uniform(0.2, 1.0, dim)
    return FeatureStats(mean=mean, std=std, q01=mean - 2.3 * std, q99=mean + 2.3 * std,
                        min=mean - 3.0 * std, max=mean + 3.0 * std)
