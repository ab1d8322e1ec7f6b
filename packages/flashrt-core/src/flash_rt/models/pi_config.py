"""Dimensions of the PaliGemma-family policies (Pi0, Pi0.5, Pi0-FAST).

Named variants follow openpi; a checkpoint's config.json may instead declare explicit dims
(``paligemma_dims`` / ``action_expert_dims`` / ``vision_dims``), which is how small test
checkpoints are described.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GemmaDims:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionDims:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


GEMMA_VARIANTS: dict[str, GemmaDims] = {
    "gemma_2b": GemmaDims(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaDims(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
}
SIGLIP_SO400M_14 = VisionDims(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224)
VISION_VARIANTS: dict[str, VisionDims] = {"So400m/14": SIGLIP_SO400M_14}

PALIGEMMA_VOCAB_SIZE = 257152
CAMERA_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass(frozen=True)
class PiConfig:
    """Everything the Pi0 / Pi0.5 model and its frontend need from a checkpoint."""

    model_type: str  # "pi05" | "pi0"
    paligemma: GemmaDims = GEMMA_VARIANTS["gemma_2b"]
    expert: GemmaDims = GEMMA_VARIANTS["gemma_300m"]
    vision: VisionDims = SIGLIP_SO400M_14
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32  # model-internal (padded) action dim
    action_horizon: int = 50
    max_state_dim: int = 32  # model-internal (padded) state dim
    max_token_len: int = 200  # Pi0.5 200, Pi0 48
    num_steps: int = 10
    # The robot's real dims (from lerobot features or norm stats); None = the padded dims.
    state_dim: int | None = None
    robot_action_dim: int | None = None
    # Camera keys in slot order (base, left wrist, right wrist), when the checkpoint names them.
    camera_keys: tuple[str, ...] = field(default=CAMERA_SLOTS)

    @property
    def is_pi05(self) -> bool:
        return self.model_type == "pi05"
