"""``flash_rt.flash_rt_fa2``: the seed's FA2-style forward entry points, backed by FlashRT's own
attention kernels (``flashrt_kernels.attention``; mma.sync tensor cores, sm_80 and newer).

    fwd_fp16(Q, K, V, O, softmax_lse, softmax_lse_accum=0, o_accum=0, *, batch, seqlen_q, seqlen_k,
             num_heads_q, num_heads_kv, head_dim, q_strides, k_strides, v_strides, o_strides,
             softmax_scale=1.0, num_sms=0, stream=0)
    fwd_bf16(...)  same, bfloat16

All pointers are int device addresses; strides are (batch, row, head) in elements, the last dim
contiguous. softmax_lse (fp32 [batch, heads_q, seqlen_q]) may be 0. Passing both split-KV scratch
pointers enables split-KV, chosen from the grid and ``num_sms`` (0 = ask the device); the scratch
must hold ``attention_splitkv_sizes(batch, seqlen_q, num_heads_q, head_dim)`` fp32 elements
(lse_accum, o_accum), i.e. sized for ``attention_max_splits()`` splits. Pipeline code should go
through an AttentionBackend rather than calling this directly.
"""

from __future__ import annotations

from collections.abc import Sequence

from flash_rt import flash_rt_kernels as _fk

__all__ = ["fwd_fp16", "fwd_bf16"]


def _fwd(dtype: str, Q: int, K: int, V: int, O: int, softmax_lse: int,  # noqa: E741 (the seed's names)
         softmax_lse_accum: int, o_accum: int, *,
         batch: int, seqlen_q: int, seqlen_k: int, num_heads_q: int, num_heads_kv: int, head_dim: int,
         q_strides: Sequence[int], k_strides: Sequence[int], v_strides: Sequence[int],
         o_strides: Sequence[int], softmax_scale: float, num_sms: int, stream: int) -> None:
    split = bool(softmax_lse_accum) and bool(o_accum)
    _fk.attention(
        Q, K, V, O, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, num_heads_q=num_heads_q,
        num_heads_kv=num_heads_kv, head_dim=head_dim, q_strides=tuple(q_strides), k_strides=tuple(k_strides),
        v_strides=tuple(v_strides), o_strides=tuple(o_strides), softmax_scale=softmax_scale, dtype=dtype,
        softmax_lse=softmax_lse or 0, lse_accum=softmax_lse_accum if split else 0,
        o_accum=o_accum if split else 0, num_splits=0 if split else 1, num_sms=num_sms, stream=stream)


def fwd_fp16(Q, K, V, O, softmax_lse, softmax_lse_accum=0, o_accum=0, *, batch, seqlen_q, seqlen_k,  # noqa: E741
             num_heads_q, num_heads_kv, head_dim, q_strides, k_strides, v_strides, o_strides,
             softmax_scale=1.0, num_sms=0, stream=0) -> None:
    """Attention forward, float16. See the module docstring."""
    _fwd("fp16", Q, K, V, O, softmax_lse, softmax_lse_accum, o_accum, batch=batch, seqlen_q=seqlen_q,
         seqlen_k=seqlen_k, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, head_dim=head_dim,
         q_strides=q_strides, k_strides=k_strides, v_strides=v_strides, o_strides=o_strides,
         softmax_scale=softmax_scale, num_sms=num_sms, stream=stream)


def fwd_bf16(Q, K, V, O, softmax_lse, softmax_lse_accum=0, o_accum=0, *, batch, seqlen_q, seqlen_k,  # noqa: E741
             num_heads_q, num_heads_kv, head_dim, q_strides, k_strides, v_strides, o_strides,
             softmax_scale=1.0, num_sms=0, stream=0) -> None:
    """Attention forward, bfloat16. See the module docstring."""
    _fwd("bf16", Q, K, V, O, softmax_lse, softmax_lse_accum, o_accum, batch=batch, seqlen_q=seqlen_q,
         seqlen_k=seqlen_k, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, head_dim=head_dim,
         q_strides=q_strides, k_strides=k_strides, v_strides=v_strides, o_strides=o_strides,
         softmax_scale=softmax_scale, num_sms=num_sms, stream=stream)
