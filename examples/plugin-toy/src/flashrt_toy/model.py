"""The toy policy: per-view mean colour + state -> one hidden layer -> an action chunk.

Checkpoint = ``config.json`` + ``model.safetensors``; weights are read through flash_rt's
declarative loader, so a missing or mis-shaped tensor is a CheckpointError that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flash_rt.errors import CheckpointError

MODEL_TYPE = "toy"
# checkpoint key -> attribute the loader stores it under
WEIGHT_ATTRS = {
    "encoder.image.weight": "image_w",
    "encoder.state.weight": "state_w",
    "encoder.bias": "encoder_b",
    "head.weight": "head_w",
    "head.bias": "head_b",
}


@dataclass(frozen=True)
class ToyConfig:
    state_dim: int = 4
    action_dim: int = 3
    horizon: int = 5
    hidden: int = 16

    @classmethod
    def read(cls, directory: Path) -> ToyConfig:
        path = directory / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{directory} has no config.json; expected a toy checkpoint "
                                  "(write one with `flashrt toy-make-checkpoint DIR`)")
        raw = json.loads(path.read_text())
        if raw.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'toy'")
        return cls(**{k: int(raw[k]) for k in ("state_dim", "action_dim", "horizon", "hidden")})

    def weight_spec(self):
        """The checkpoint key map, as data: every tensor with the shape and dtype it must have."""
        from flash_rt.executors.torch_weights import Attr
        from flash_rt.executors.weight_loader import Item, ModelWeightSpec

        return ModelWeightSpec([Item(name, sink=Attr(WEIGHT_ATTRS[name]), shape=shape, dtype="float32")
                                for name, shape in self.shapes().items()])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "encoder.image.weight": (self.hidden, 3),
            "encoder.state.weight": (self.hidden, self.state_dim),
            "encoder.bias": (self.hidden,),
            "head.weight": (self.horizon * self.action_dim, self.hidden),
            "head.bias": (self.horizon * self.action_dim,),
        }


def write_checkpoint(out: str | Path, *, seed: int = 0, config: ToyConfig | None = None) -> Path:
    from safetensors.numpy import save_file

    config = config or ToyConfig()
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
               for name, shape in config.shapes().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **config.__dict__}))
    return directory


class ToyPolicy:
    def __init__(self, config: ToyConfig, weights: dict[str, np.ndarray]):
        self.config = config
        self.w = weights

    def __call__(self, images: np.ndarray, state: np.ndarray, prompt_feature: float) -> np.ndarray:
        """images (V, H, W, 3) in [-1, 1]; state (state_dim,) -> (horizon, action_dim)."""
        colour = images.mean(axis=(0, 1, 2))
        hidden = np.tanh(self.w["encoder.image.weight"] @ colour
                         + self.w["encoder.state.weight"] @ state
                         + self.w["encoder.bias"] + prompt_feature)
        out = self.w["head.weight"] @ hidden + self.w["head.bias"]
        return out.reshape(self.config.horizon, self.config.action_dim)
