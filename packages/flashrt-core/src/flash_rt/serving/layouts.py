"""Observation layouts robot clients send, mapped onto ``VLAModel.predict(images, prompt, state)``.

A layout is recognised by its keys (openpi's input transforms define them per robot):

    libero   observation/image, observation/wrist_image, observation/state, prompt
    droid    observation/exterior_image_1_left, observation/wrist_image_left,
             observation/joint_position + observation/gripper_position (concatenated), prompt
    aloha    images {cam_high, cam_left_wrist, cam_right_wrist[, cam_low]} as (3, H, W), state, prompt
    generic  images [base, left wrist, right wrist] or {image, wrist_image, wrist_image_right},
             state, prompt  (FlashRT's own)

Views come out in the model's order: base, left wrist, right wrist. Images may be (H, W, 3) or
(3, H, W) and uint8 or float in [0, 1] (converted like openpi does, 255 * x truncated). Keys a
layout does not use are ignored, as openpi ignores them. ``action_dim`` is the width openpi's
output transform keeps for that robot (LIBERO 7, DROID 8, ALOHA 14); the server slices wider
model outputs to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from flash_rt.errors import InputError

MAX_PROMPT_CHARS = 4096


@dataclass(frozen=True)
class Layout:
    name: str
    view_keys: tuple[str, ...]  # top-level keys (or keys inside "images"), in model view order
    state_keys: tuple[str, ...]  # concatenated into one state vector
    action_dim: int | None
    nested_images: bool = False  # views live in obs["images"] rather than at the top level
    optional_views: tuple[str, ...] = ()  # views a client may leave out
    ignored_views: tuple[str, ...] = ()  # views the layout accepts but the model does not take
    state_required: bool = True


LIBERO = Layout(
    "libero",
    view_keys=("observation/image", "observation/wrist_image"),
    state_keys=("observation/state",),
    action_dim=7,
)
DROID = Layout(
    "droid",
    view_keys=("observation/exterior_image_1_left", "observation/wrist_image_left"),
    state_keys=("observation/joint_position", "observation/gripper_position"),
    action_dim=8,
)
# openpi's ALOHA inputs use cam_high as the base view and the two wrist cameras; cam_low is
# accepted and not used (pi0's three image slots are base, left wrist, right wrist).
ALOHA = Layout(
    "aloha",
    view_keys=("cam_high", "cam_left_wrist", "cam_right_wrist"),
    state_keys=("state",),
    action_dim=14,
    nested_images=True,
    optional_views=("cam_left_wrist", "cam_right_wrist"),
    ignored_views=("cam_low",),
)
GENERIC_DICT = Layout(
    "generic",
    view_keys=("image", "wrist_image", "wrist_image_right"),
    state_keys=("state",),
    action_dim=None,
    nested_images=True,
    optional_views=("wrist_image", "wrist_image_right"),
    state_required=False,
)
LAYOUTS = (LIBERO, DROID, ALOHA, GENERIC_DICT)
_ALOHA_CAMERAS = set(ALOHA.view_keys) | set(ALOHA.ignored_views)


@dataclass
class PolicyInput:
    layout: Layout
    images: list[np.ndarray]  # (H, W, 3) uint8, writable copies
    state: np.ndarray | None  # (D,) float32
    prompt: str | None


def detect_layout(obs) -> Layout:
    if not isinstance(obs, Mapping):
        raise InputError(f"an observation must be a msgpack map; got {type(obs).__name__}")
    if "observation/image" in obs:
        return LIBERO
    if "observation/exterior_image_1_left" in obs:
        return DROID
    images = obs.get("images")
    if isinstance(images, Mapping) and any(isinstance(k, str) and k in _ALOHA_CAMERAS for k in images):
        return ALOHA
    if images is not None:
        return GENERIC_DICT
    keys = sorted(str(k) for k in obs)[:8]
    raise InputError(
        "unrecognised observation layout; expected openpi LIBERO ('observation/image', ...), DROID "
        "('observation/exterior_image_1_left', ...), ALOHA ('images': {'cam_high', ...}) or "
        f"'images' (list or dict) + 'state' + 'prompt'; got keys {keys}"
    )


def to_policy_input(obs, *, num_views: int | None = None) -> PolicyInput:
    """Validate ``obs`` and convert it; every problem is an ``InputError`` with a short message."""
    layout = detect_layout(obs)
    if layout is GENERIC_DICT and not isinstance(obs["images"], Mapping):
        images = _generic_list_views(obs["images"])
    else:
        images = _views(obs, layout)
    if num_views is not None and len(images) != num_views:
        raise InputError(
            f"the model takes {num_views} camera view(s); this {layout.name} observation has "
            f"{len(images)}. Send {num_views}, or serve a model loaded with --num-views {len(images)}"
        )
    return PolicyInput(layout=layout, images=images, state=_state(obs, layout), prompt=_prompt(obs))


def _views(obs: Mapping, layout: Layout) -> list[np.ndarray]:
    source = obs["images"] if layout.nested_images else obs
    where = "images" if layout.nested_images else "observation"
    if layout.nested_images:
        unknown = [k for k in source if k not in layout.view_keys and k not in layout.ignored_views]
        if unknown:
            raise InputError(
                f"unknown {layout.name} image keys {sorted(map(str, unknown))[:4]}; expected "
                f"{list(layout.view_keys + layout.ignored_views)}"
            )
    views, missing = [], []
    for key in layout.view_keys:
        if key not in source:
            missing.append(key)
            continue
        if missing:  # a later view without an earlier one would shift view order
            raise InputError(
                f"{layout.name} image {key!r} was sent without {missing[0]!r}; views fill base, left "
                "wrist, right wrist in order"
            )
        views.append(_image(source[key], f"{where}[{key!r}]"))
    required_missing = [k for k in missing if k not in layout.optional_views]
    if required_missing:
        raise InputError(f"{layout.name} observation is missing image {required_missing[0]!r}")
    return views


def _generic_list_views(images) -> list[np.ndarray]:
    if isinstance(images, (str, bytes, np.ndarray)) or not isinstance(images, Sequence):
        raise InputError(
            "'images' must be a list of (H, W, 3) uint8 arrays or a map with keys image, wrist_image, "
            f"wrist_image_right; got {type(images).__name__}"
        )
    if not 1 <= len(images) <= 3:
        raise InputError(f"'images' must hold 1 to 3 views (base, left wrist, right wrist); got {len(images)}")
    return [_image(image, f"images[{i}]") for i, image in enumerate(images)]


def _image(value, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InputError(f"{where} must be an image array (H, W, 3) uint8; got {type(value).__name__}")
    if value.ndim != 3 or 3 not in (value.shape[0], value.shape[-1]):
        raise InputError(f"{where} must have shape (H, W, 3) or (3, H, W); got {value.shape}")
    if value.shape[0] == 3 and value.shape[-1] != 3:
        value = value.transpose(1, 2, 0)  # channels-first, as ALOHA and LeRobot store images
    if min(value.shape[:2]) < 1:
        raise InputError(f"{where} is empty: shape {value.shape}")
    if value.dtype == np.uint8:
        return np.array(value, copy=True, order="C")
    if value.dtype.kind == "f":
        if not np.isfinite(value).all() or value.min() < 0.0 or value.max() > 1.0:
            raise InputError(f"{where} is a float image with values outside [0, 1]; send uint8 or floats in [0, 1]")
        return np.ascontiguousarray((255 * value).astype(np.uint8))
    raise InputError(f"{where} must be uint8 (or float in [0, 1]); got dtype {value.dtype}")


def _state(obs: Mapping, layout: Layout) -> np.ndarray | None:
    parts = []
    for key in layout.state_keys:
        if key not in obs:
            if layout.state_required:
                raise InputError(f"{layout.name} observation is missing {key!r}")
            return None
        parts.append(_vector(obs[key], repr(key)))
    state = np.concatenate(parts).astype(np.float32)
    if not np.isfinite(state).all():
        raise InputError(f"{layout.name} state has NaN or Inf entries; send finite values")
    return state


def _vector(value, where: str) -> np.ndarray:
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        value = np.asarray(value, dtype=np.float64)
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        value = np.asarray([value], dtype=np.float64)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise InputError(f"{where} must be a 1-D numeric array; got {type(value).__name__}"
                         f"{'' if not isinstance(value, np.ndarray) else ' of dtype ' + str(value.dtype)}")
    if value.ndim == 0:
        value = value.reshape(1)
    if value.ndim != 1 or value.size == 0:
        raise InputError(f"{where} must be a non-empty 1-D array; got shape {value.shape}")
    return value


def _prompt(obs: Mapping) -> str | None:
    prompt = obs.get("prompt")
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        raise InputError(f"'prompt' must be a string; got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"'prompt' is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    return prompt
