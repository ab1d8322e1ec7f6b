"""RtxFlashAttnBackendGroot: the RTX FA2 backend with GR00T's attention sites.

GR00T N1.6/N1.7 run attention in four shapes: the vision tower ("vision"), the language
backbone ("llm", grouped-query), and the action DiT, whose even blocks cross-attend to the
vision-language features ("dit_cross", K/V as long as the VL sequence of this call) and whose
odd blocks self-attend over state + action tokens ("dit_self"). Slots, ``run`` and the layout
are those of :class:`RtxFlashAttnBackend`; this class adds the GR00T spec and the mapping of a
DiT block to its (site, layer).
"""

from __future__ import annotations

import warnings

from flash_rt.errors import ConfigError
from flash_rt.hardware.backend import AttentionSpec
from flash_rt.hardware.rtx.attn_backend import RtxFlashAttnBackend


def groot_attention_spec(
    *,
    vision_layers: int = 27,
    vision_heads: int = 16,
    vision_head_dim: int = 72,
    vision_tokens: int = 256,
    llm_layers: int = 16,
    llm_heads: int = 16,
    llm_kv_heads: int = 8,
    llm_head_dim: int = 128,
    max_vl_tokens: int = 512,
    dit_layers: int = 32,
    dit_heads: int = 32,
    dit_head_dim: int = 48,
    max_action_tokens: int = 51,
) -> AttentionSpec:
    """The GR00T sites. Defaults are N1.6's (SigLIP2 27 x 1152/16 heads, Qwen3 truncated to 16
    layers, DiT 32 x 32 heads x 48); every size is a parameter since checkpoints differ."""
    if dit_layers % 2:
        raise ConfigError(f"GR00T's DiT alternates cross / self blocks, so dit_layers must be even, got {dit_layers}")
    return (
        AttentionSpec()
        .add_site("vision", num_layers=vision_layers, num_q_heads=vision_heads, num_kv_heads=vision_heads,
                  head_dim=vision_head_dim, max_q_seq=vision_tokens)
        .add_site("llm", num_layers=llm_layers, num_q_heads=llm_heads, num_kv_heads=llm_kv_heads,
                  head_dim=llm_head_dim, max_q_seq=max_vl_tokens)
        .add_site("dit_cross", num_layers=dit_layers // 2, num_q_heads=dit_heads, num_kv_heads=dit_heads,
                  head_dim=dit_head_dim, max_q_seq=max_action_tokens, max_kv_seq=max_vl_tokens)
        .add_site("dit_self", num_layers=dit_layers // 2, num_q_heads=dit_heads, num_kv_heads=dit_heads,
                  head_dim=dit_head_dim, max_q_seq=max_action_tokens)
    )


class RtxFlashAttnBackendGroot(RtxFlashAttnBackend):
    """RTX FA2 backend over :func:`groot_attention_spec` (or any spec with its site names)."""

    def __init__(self, spec: AttentionSpec | None = None, dtype="bf16", device: int = 0) -> None:
        super().__init__(spec if spec is not None else groot_attention_spec(), dtype=dtype, device=device)

    @staticmethod
    def dit_site(block_idx: int) -> tuple[str, int]:
        """(site, layer) of DiT block ``block_idx``: even blocks cross-attend, odd self-attend."""
        return ("dit_cross" if block_idx % 2 == 0 else "dit_self", block_idx // 2)


def __getattr__(name: str):
    if name == "TorchFlashAttnBackendGroot":
        warnings.warn(
            "TorchFlashAttnBackendGroot is a deprecated alias of RtxFlashAttnBackendGroot (the backend "
            "is framework-neutral); it will be removed in the next major version",
            DeprecationWarning,
            stacklevel=2,
        )
        return RtxFlashAttnBackendGroot
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RtxFlashAttnBackendGroot", "groot_attention_spec"]
