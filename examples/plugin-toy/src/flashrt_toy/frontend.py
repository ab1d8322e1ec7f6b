"""The toy frontend: what flash_rt.load_model(..., config="toy") constructs.

A frontend takes the checkpoint path plus the load_model options its constructor names, and
implements set_prompt(prompt, state=None) and infer(observation, noise=None).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from flash_rt.errors import InputError
from flashrt_toy.model import WEIGHT_ATTRS, ToyConfig, ToyPolicy

_VIEW_KEYS = ("image", "wrist_image", "wrist_image_right")


class _Weights:
    """Where the loader's Attr sinks put the tensors."""


class ToyFrontend:
    def __init__(self, checkpoint: str, num_views: int = 2):
        from flash_rt.executors.torch_weights import SafetensorsSource
        from flash_rt.executors.weight_loader import WeightLoader

        directory = Path(checkpoint)
        self.config = ToyConfig.read(directory)
        self.num_views = num_views
        loaded = _Weights()
        WeightLoader(SafetensorsSource(directory), self.config.weight_spec(), loaded, unused="error").run()
        self.policy = ToyPolicy(self.config, {name: getattr(loaded, attr).numpy()
                                              for name, attr in WEIGHT_ATTRS.items()})
        self._prompt_feature = 0.0

    def set_prompt(self, prompt: str, state=None) -> None:
        # A stable hash of the prompt stands in for a language model.
        self._prompt_feature = (zlib.crc32(prompt.encode()) % 1000) / 1000.0

    def infer(self, observation: dict, noise=None) -> np.ndarray:
        images = self._images(observation)
        state = np.asarray(observation.get("state", np.zeros(self.config.state_dim)), dtype=np.float64)
        if state.shape != (self.config.state_dim,) or not np.all(np.isfinite(state)):
            raise InputError(f"state must be {self.config.state_dim} finite floats; got shape {state.shape}")
        actions = self.policy(images, state, self._prompt_feature)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float64)
            if noise.shape != actions.shape:
                raise InputError(f"noise must have shape {actions.shape}; got {noise.shape}")
            actions = actions + 0.01 * noise
        return actions.astype(np.float32)

    def _images(self, observation: dict) -> np.ndarray:
        views = observation.get("images")
        if views is None:
            views = [observation[k] for k in _VIEW_KEYS if k in observation]
        if len(views) != self.num_views:
            raise InputError(f"expected {self.num_views} images; got {len(views)}")
        out = []
        for i, image in enumerate(views):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise InputError(f"image {i} must be (H, W, 3) uint8; got {image.shape} {image.dtype}")
            out.append(image.astype(np.float64) / 127.5 - 1.0)
        return np.stack(out)
