"""A tiny but real policy for the serving tests: a two-layer numpy network from image features,
state and prompt to an action chunk. Any mix-up of views, state entries, prompts or requests
between clients changes the actions, so comparing a served result with ``model.predict`` on the
same observation checks the whole path.

Its "checkpoint" is a directory with ``config.json`` (state_dim, action_dim, horizon, delay_s,
seed); ``delay_s`` makes each inference sleep, to hold the worker busy in concurrency tests.
"""

import json
import time
from pathlib import Path

import numpy as np

from flash_rt.errors import InputError

CONFIG = "servetest"
TARGET = "serving_testmodel:TinyServePolicy"


def write_checkpoint(directory, *, state_dim=8, action_dim=32, horizon=10, delay_s=0.0, seed=0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"state_dim": state_dim, "action_dim": action_dim, "horizon": horizon, "delay_s": delay_s,
              "seed": seed}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


class TinyServePolicy:
    def __init__(self, checkpoint, num_views=2):
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        self.num_views = num_views
        self.state_dim = config["state_dim"]
        self.action_dim = config["action_dim"]
        self.horizon = config["horizon"]
        self.delay_s = config["delay_s"]
        features = 6 * num_views + self.state_dim + 1
        rng = np.random.default_rng(config["seed"])
        self.w1 = rng.standard_normal((features, 64)) / np.sqrt(features)
        self.w2 = rng.standard_normal((64, self.horizon * self.action_dim)) / 8.0
        self.prompt_code = 0.0

    def set_prompt(self, prompt):
        # A stable number per prompt (Python's hash() is salted per process).
        self.prompt_code = (sum(prompt.encode()) % 997) / 997.0

    def infer(self, observation, noise=None):
        images = observation.get("images")
        if not isinstance(images, list) or len(images) != self.num_views:
            raise InputError(f"TinyServePolicy takes {self.num_views} views; got {images!r:.40}")
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise InputError(f"view {i} must be (H, W, 3) uint8")
        state = observation.get("state")
        if state is None or np.shape(state) != (self.state_dim,):
            raise InputError(f"state must have shape ({self.state_dim},); got {np.shape(state)}")
        pixels = [np.asarray(image, dtype=np.float64) / 255.0 for image in images]
        # Per-channel mean and a spatial contrast term: swapping views or transposing an image shows.
        feats = [np.concatenate([p.mean(axis=(0, 1)), p[: p.shape[0] // 2].mean(axis=(0, 1)) - p.mean(axis=(0, 1))])
                 for p in pixels]
        x = np.concatenate(feats + [np.asarray(state, dtype=np.float64), [self.prompt_code]])
        out = (np.tanh(x @ self.w1) @ self.w2).reshape(self.horizon, self.action_dim)
        if noise is not None:
            out = out + 0.1 * np.asarray(noise, dtype=np.float64)
        if self.delay_s:
            time.sleep(self.delay_s)
        return out.astype(np.float32)
