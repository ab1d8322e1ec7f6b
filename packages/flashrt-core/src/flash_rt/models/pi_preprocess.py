"""Observation checks and image preprocessing for the PaliGemma-family policies (Pi0, Pi0.5, Pi0-FAST).

Accepted images (decided here, documented in docs/models/pi05.md):
- a list of ``num_views`` numpy arrays (H, W, 3) uint8, in slot order (base, left wrist, right
  wrist); or
- a dict with ``"image"``, ``"wrist_image"``, ``"wrist_image_right"`` (the first ``num_views`` of
  them), or the checkpoint's own camera keys in slot order; ``VLAModel.predict`` wraps a list
  as ``{"images": [...]}``, which is accepted too.
Float images are refused rather than guessed at: openpi's float convention is [-1, 1], lerobot's
is [0, 1], and a wrong guess would silently shift every pixel. Convert with
``(img * 255).round().astype(np.uint8)`` (for [0, 1]) first.

Each image is resized with padding to ``image_size`` (224) as openpi's ``resize_with_pad`` does:
scale by 1/max(w/W, h/H) keeping the aspect ratio (sizes truncated to int), bilinear (antialiased
when shrinking, like ``jax.image.resize``), rounded back to uint8, then padded symmetrically with
black (0; the odd pixel goes to the bottom / right). An image already at the size is untouched.
Then ``x / 255 * 2 - 1`` -> float32 in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from flash_rt.errors import InputError

IMAGE_KEYS = ("image", "wrist_image", "wrist_image_right")
SLOT_NAMES = ("base", "left wrist", "right wrist")

_EXPECTED = (
    "images as a list of (H, W, 3) uint8 numpy arrays in slot order (base, left wrist, right wrist), "
    f"or a dict with keys {list(IMAGE_KEYS)}"
)


def _as_image(value, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
            value = np.asarray(value)
        else:
            raise InputError(f"{where}: expected a (H, W, 3) uint8 numpy array; got {type(value).__name__}")
    if value.ndim != 3 or value.shape[-1] != 3:
        hint = " (channels-first? use img.transpose(1, 2, 0))" if value.ndim == 3 and value.shape[0] == 3 else ""
        raise InputError(f"{where}: expected shape (H, W, 3) (RGB, channels last); got {value.shape}{hint}")
    if value.dtype != np.uint8:
        raise InputError(
            f"{where}: expected dtype uint8 (0..255); got {value.dtype}. Float images are not guessed "
            "at: for [0, 1] floats pass (img * 255).round().astype(np.uint8)"
        )
    if value.shape[0] < 1 or value.shape[1] < 1:
        raise InputError(f"{where}: empty image of shape {value.shape}")
    return value


def observation_images(observation, num_views: int, camera_keys: Sequence[str] = ()) -> list[np.ndarray]:
    """The ``num_views`` images of an observation, validated, in slot order."""
    if isinstance(observation, Mapping) and "images" in observation:
        observation = observation["images"]
    if isinstance(observation, Mapping):
        found = []
        for slot in range(num_views):
            names = [IMAGE_KEYS[slot]] + ([camera_keys[slot]] if slot < len(camera_keys) else [])
            key = next((n for n in names if n in observation), None)
            if key is None:
                raise InputError(
                    f"the model was loaded with num_views={num_views} and needs the {SLOT_NAMES[slot]} "
                    f"image under key {' or '.join(repr(n) for n in names)}; the observation has keys "
                    f"{sorted(observation)}"
                )
            found.append(_as_image(observation[key], f"image {key!r}"))
        extra = [k for k in IMAGE_KEYS[num_views:] if k in observation]
        if extra:
            raise InputError(
                f"the observation has {num_views + len(extra)} images but the model was loaded with "
                f"num_views={num_views}; drop {extra} or load_model(..., num_views={num_views + len(extra)})"
            )
        return found
    if isinstance(observation, np.ndarray) or isinstance(observation, (str, bytes)) or not isinstance(
        observation, Sequence
    ):
        raise InputError(f"expected {_EXPECTED}; got {type(observation).__name__}")
    if len(observation) != num_views:
        raise InputError(
            f"the model was loaded with num_views={num_views} and needs {num_views} image(s) in slot order "
            f"(base, left wrist, right wrist); got {len(observation)}. Pass {num_views} images or "
            f"load_model(..., num_views={len(observation)})"
        )
    return [_as_image(img, f"image {i} ({SLOT_NAMES[i] if i < 3 else '?'})") for i, img in enumerate(observation)]


def resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, aspect kept, padded with black."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    import torch  # noqa: PLC0415

    out = torch.empty((size, size, 3), dtype=torch.uint8)
    resize_with_pad_into(torch.from_numpy(np.ascontiguousarray(image)), out)
    return out.numpy()


def resize_with_pad_into(image, out) -> None:
    """The resize-with-pad above in torch, on any device: ``image`` (H, W, 3) uint8 into ``out``
    (size, size, 3) uint8 on the same device. The GPU pipeline runs it inside its call's graph
    (camera-size images); the host path is this same code on the CPU."""
    import torch.nn.functional as F  # noqa: PLC0415

    size = out.shape[0]
    height, width = image.shape[:2]
    ratio = max(width / size, height / size)
    new_h, new_w = max(1, int(height / ratio)), max(1, int(width / ratio))
    x = image.permute(2, 0, 1)[None].float()
    shrinking = new_h < height or new_w < width
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=shrinking)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out.zero_()
    # rounded and clamped first, so the cast to uint8 is exact
    out[top : top + new_h, left : left + new_w].copy_(x.round().clamp(0, 255)[0].permute(1, 2, 0))


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 255.0 * 2.0 - 1.0


def prepare_images(observation, num_views: int, image_size: int = 224, camera_keys: Sequence[str] = ()) -> np.ndarray:
    """Validated, resized and scaled images: float32 (num_views, image_size, image_size, 3) in [-1, 1]."""
    images = observation_images(observation, num_views, camera_keys)
    return np.stack([to_unit_range(resize_with_pad(img, image_size)) for img in images])


def validate_state(state, expected_dim: int | None, max_dim: int, model: str) -> np.ndarray:
    """A finite 1-D float32 state of the expected length (or at most ``max_dim`` if unknown)."""
    if state is None:
        raise InputError(
            f"{model} needs the robot state: pass predict(images, prompt, state=np.array([...])) "
            "(a 1-D float array of the robot's joint / gripper values)"
        )
    try:
        array = np.asarray(state, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"state must be a 1-D array of numbers; got {type(state).__name__} ({exc})") from None
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise InputError(f"state must be 1-D (state_dim,); got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array)).tolist()
        raise InputError(f"state must be finite; entries {bad} are NaN or inf: {array.tolist()}")
    if expected_dim is not None and array.shape[0] != expected_dim:
        raise InputError(f"state must have {expected_dim} values for this checkpoint; got {array.shape[0]}")
    if array.shape[0] > max_dim:
        raise InputError(f"state has {array.shape[0]} values; this model takes at most {max_dim}")
    return array.astype(np.float32)


class PiInputs:
    """predict() inputs -> model inputs for one Pi0 / Pi0.5 checkpoint, and model outputs -> robot
    actions. Shared by the frontends of every arch (numpy only; no torch).

    ``config`` is the checkpoint's PiConfig, ``norm_stats`` its NormStats or None, ``tokenizer`` a
    PaligemmaTokenizer. Without norm stats the state is used as given and the actions are the raw
    model output (the robot's action dims when the checkpoint declares them, else all of them).
    """

    def __init__(self, config, norm_stats, tokenizer, num_views: int):
        if num_views not in (1, 2, 3):
            raise InputError(f"num_views must be 1, 2 or 3; got {num_views!r}")
        self.config, self.norm_stats, self.tokenizer, self.num_views = config, norm_stats, tokenizer, num_views
        self.model_name = "Pi0.5" if config.model_type == "pi05" else "Pi0"

    @property
    def state_dim(self) -> int | None:
        if self.norm_stats is not None and self.norm_stats.state_dim is not None:
            return self.norm_stats.state_dim
        return self.config.state_dim

    def images(self, observation) -> np.ndarray:
        size = self.config.vision.image_size
        keys = tuple(k for k in self.config.camera_keys if k not in IMAGE_KEYS)
        return prepare_images(observation, self.num_views, size, keys if len(keys) >= self.num_views else ())

    def normalized_state(self, state) -> np.ndarray:
        """Validated and normalised (with norm stats), unpadded, float32."""
        array = validate_state(state, self.state_dim, self.config.max_state_dim, self.model_name)
        if self.norm_stats is not None:
            array = self.norm_stats.normalize_state(array)
        return np.asarray(array, dtype=np.float32)

    def padded_state(self, normalized: np.ndarray) -> np.ndarray:
        out = np.zeros(self.config.max_state_dim, dtype=np.float32)
        out[: normalized.shape[0]] = normalized
        return out

    def prompt_tokens(self, prompt, normalized_state: np.ndarray | None = None):
        """(ids int64 (max_token_len,), mask bool) for the model's prompt format."""
        if prompt is None or not isinstance(prompt, str) or not prompt.strip():
            raise InputError(
                f"{self.model_name} needs a non-empty task prompt (a str such as 'pick up the cup'); "
                f"got {prompt!r}"
            )
        max_len = self.config.max_token_len
        if self.config.model_type == "pi05":
            return self.tokenizer.tokenize_pi05(prompt, normalized_state, max_len)
        return self.tokenizer.tokenize_pi0(prompt, max_len)

    def noise(self, noise, rng: np.random.Generator) -> np.ndarray:
        shape = (self.config.action_horizon, self.config.action_dim)
        if noise is None:
            return rng.standard_normal(shape, dtype=np.float32)
        try:
            array = np.asarray(noise, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"noise must be a float array of shape {shape}; got {type(noise).__name__}") from None
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if array.shape != shape:
            raise InputError(f"noise must have shape {shape} (action_horizon, model action dim); got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise InputError("noise holds NaN or inf")
        return array

    def actions(self, raw: np.ndarray) -> np.ndarray:
        """(H, model action dim) -> (H, robot action dim) in robot units (float32)."""
        if self.norm_stats is not None and self.norm_stats.action_dim is not None:
            return np.asarray(self.norm_stats.unnormalize_actions(raw), dtype=np.float32)
        dim = self.config.robot_action_dim or raw.shape[-1]
        return np.ascontiguousarray(raw[:, :dim], dtype=np.float32)


__all__ = [
    "PiInputs",
    "IMAGE_KEYS",
    "observation_images",
    "resize_with_pad",
    "resize_with_pad_into",
    "to_unit_range",
    "prepare_images",
    "validate_state",
]
