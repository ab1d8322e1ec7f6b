"""GPU tests: RoPE + KV-cache write, attention, the flash_rt_fa2 shim against torch.

Plain-torch references in fp32 / fp64; fresh random inputs per case (never zeros); outputs poisoned
with NaN before the call and checked fully written; true Pi0.5 / SigLIP / GR00T shapes plus odd
sizes; explicit tolerances. Ops get raw device addresses (tensor.data_ptr()) and the current stream.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
fk = pytest.importorskip("flashrt_kernels", reason="flashrt_kernels is not installed")

from flashrt_kernels_testlib import (  # noqa: E402
    BF16,
    DEV,
    E4M3,
    F32,
    check,
    check_fp8,
    check_rel,
    poisoned,
    rnd,
    rope_ref,
    scalar,
    stream,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


# ------------------------------------------------------------------------------------------------
# RoPE + QKV split + KV-cache write


@pytest.mark.parametrize("tokens,hq,hkv,d,offset", [(968, 8, 1, 256, 0), (50, 8, 1, 256, 968), (200, 16, 8, 128, 5),
                                                    (13, 4, 4, 16, 3), (9, 3, 1, 72, 0), (1, 8, 1, 256, 1017),
                                                    (7, 32, 8, 128, 2)])  # 384 items: threads loop
@pytest.mark.parametrize("given_positions", [True, False])
def test_rope_qkv_split_and_cache_write(tokens, hq, hkv, d, offset, given_positions):
    """given_positions False: positions 0, token t at position offset + t (the pipeline's call)."""
    qkv = rnd(tokens, (hq + 2 * hkv) * d)
    if given_positions:
        positions = torch.randint(0, 1100, (tokens,), device=DEV, dtype=torch.int32)
    else:
        positions = torch.arange(offset, offset + tokens, device=DEV, dtype=torch.int32)
    rows = offset + tokens + 4
    q_out = poisoned(tokens, hq, d)
    k_cache, v_cache = rnd(rows, hkv, d), rnd(rows, hkv, d)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_scale = d**-0.5
    fk.rope_qkv(qkv.data_ptr(), positions.data_ptr() if given_positions else 0, q_out.data_ptr(),
                k_cache.data_ptr(), v_cache.data_ptr(), tokens, hq, hkv, d, cache_offset=offset, q_scale=q_scale,
                stream=stream())
    q, k, v = qkv.view(tokens, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
    check(q_out, rope_ref(q, positions) * q_scale, atol=1e-2, rtol=1e-2, what="rope q")
    sl = slice(offset, offset + tokens)
    check(k_cache[sl], rope_ref(k, positions), atol=1e-2, rtol=1e-2, what="rope k")
    assert torch.equal(v_cache[sl], v), "v must be copied bit-exactly into the cache"
    outside = torch.ones(rows, dtype=torch.bool)
    outside[sl] = False
    assert torch.equal(k_cache[outside], k_before[outside]) and torch.equal(v_cache[outside], v_before[outside]), \
        "rows outside [offset, offset + tokens) must be untouched"


@pytest.mark.parametrize("d", [256, 72])
def test_rope_qkv_rotates_q_in_place(d):
    tokens, hq, hkv = 50, 8, 1
    width = (hq + 2 * hkv) * d
    qkv = rnd(tokens, width)
    original = qkv.clone()
    positions = torch.arange(968, 968 + tokens, device=DEV, dtype=torch.int32)
    k_cache, v_cache = poisoned(tokens, hkv, d), poisoned(tokens, hkv, d)
    fk.rope_qkv(qkv.data_ptr(), positions.data_ptr(), qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                tokens, hq, hkv, d, q_row_stride=width, stream=stream())
    q, k, v = original.view(tokens, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
    check(qkv.view(tokens, hq + 2 * hkv, d)[:, :hq], rope_ref(q, positions), atol=1e-2, rtol=1e-2,
          what="rope q in place")
    assert torch.equal(qkv.view(tokens, -1, d)[:, hq:], original.view(tokens, -1, d)[:, hq:]), \
        "k / v inside the fused buffer must stay as they were"
    check(k_cache, rope_ref(k, positions), atol=1e-2, rtol=1e-2, what="rope k")
    assert torch.equal(v_cache, v)


# ------------------------------------------------------------------------------------------------
# attention


def attn_ref(q, k, v, scale, mask=None):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; mask [B, Sq, Sk] bool or None. fp64 softmax."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    kk = k.double().repeat_interleave(g, dim=2)
    vv = v.double().repeat_interleave(g, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, Sq]
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    return out, lse


def contiguous_strides(t):
    return (t.stride(0), t.stride(1), t.stride(2))


# (batch, sq, sk, hq, hkv, d, mask kind)
ATTN_CASES = [
    (1, 816, 816, 8, 1, 256, "keys"),      # Pi0.5 prefix (2 views + 200 prompt tokens... padded)
    (1, 968, 968, 8, 1, 256, "keys"),      # 3 views + 200
    (2, 256, 256, 16, 16, 72, None),       # SigLIP, two images batched
    (1, 512, 512, 16, 16, 72, None),       # SigLIP, two images as one sequence
    (1, 50, 1018, 8, 1, 256, "keys"),      # Pi0.5 suffix against prefix KV + own block
    (1, 51, 867, 8, 1, 256, "pi0"),        # Pi0 suffix: state token does not see the actions
    (1, 200, 200, 16, 8, 128, None),       # Qwen3 (GR00T backbone)
    (1, 66, 66, 32, 32, 48, None),         # GR00T DiT self-attention
    (1, 66, 300, 32, 32, 48, "keys"),      # GR00T DiT cross-attention
    (1, 37, 129, 4, 2, 64, "keys"),        # odd sizes
    (3, 5, 1, 2, 1, 16, None),             # one key
    (1, 100, 77, 8, 1, 96, "full"),        # arbitrary 2-D mask
    (2, 64, 64, 4, 4, 32, None),
    # more blocks than SMs: one warp group per block (the other cases run two)
    (4, 300, 300, 8, 1, 256, "keys"),
    (8, 256, 256, 16, 16, 72, None),
    (4, 200, 200, 16, 8, 128, None),
]


def make_mask(kind, b, sq, sk):
    if kind is None:
        return None
    if kind == "keys":  # key padding: some random invalid keys, at least the first valid
        valid = torch.rand(b, sk, device=DEV) > 0.2
        valid[:, 0] = True
        return valid[:, None, :].expand(b, sq, sk)
    if kind == "pi0":  # row 0 (state) sees only the prefix; action rows see everything
        m = torch.ones(b, sq, sk, dtype=torch.bool, device=DEV)
        m[:, 0, sk - sq + 1:] = False
        m[:, :, 5:9] = False  # a missing camera's padded tokens
        return m
    m = torch.rand(b, sq, sk, device=DEV) > 0.5
    m[:, :, 0] = True
    return m


@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,mask_kind", ATTN_CASES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_attention(b, sq, sk, hq, hkv, d, mask_kind, dtype):
    tdt = BF16 if dtype == "bf16" else torch.float16
    q, k, v = rnd(b, sq, hq, d, dtype=tdt), rnd(b, sk, hkv, d, dtype=tdt), rnd(b, sk, hkv, d, dtype=tdt)
    mask = make_mask(mask_kind, b, sq, sk)
    scale = d**-0.5
    o = poisoned(b, sq, hq, d, dtype=tdt)
    lse = poisoned(b, hq, sq, dtype=F32)
    mask_arg, mask_strides = 0, (0, 0)
    if mask is not None:
        if mask_kind == "keys":
            mask_u8 = mask[:, 0, :].contiguous().to(torch.uint8)
            mask_arg, mask_strides = mask_u8.data_ptr(), (sk, 0)
        else:
            mask_u8 = mask.contiguous().to(torch.uint8)
            mask_arg, mask_strides = mask_u8.data_ptr(), (sq * sk, sk)
    fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=b, seqlen_q=sq, seqlen_k=sk,
                 num_heads_q=hq, num_heads_kv=hkv, head_dim=d, q_strides=contiguous_strides(q),
                 k_strides=contiguous_strides(k), v_strides=contiguous_strides(v), o_strides=contiguous_strides(o),
                 softmax_scale=scale, dtype=dtype, mask=mask_arg, mask_strides=mask_strides,
                 softmax_lse=lse.data_ptr(), stream=stream())
    ref, ref_lse = attn_ref(q, k, v, scale, mask)
    tol = 2e-2 if dtype == "bf16" else 5e-3
    check(o, ref, atol=tol, rtol=tol, what=f"attention {dtype}")
    check_rel(o, ref, rel=1e-2 if dtype == "bf16" else 3e-3, what=f"attention {dtype}")
    check(lse, ref_lse, atol=1e-3, rtol=1e-4, what="attention lse")


@pytest.mark.parametrize("splits", [0, 2, 5, 16])
@pytest.mark.parametrize("sq,sk", [(50, 1018), (51, 867), (8, 300)])
def test_attention_split_kv(splits, sq, sk):
    b, hq, hkv, d = 1, 8, 1, 256
    q, k, v = rnd(b, sq, hq, d), rnd(b, sk, hkv, d), rnd(b, sk, hkv, d)
    mask = make_mask("keys", b, sq, sk)
    mask_u8 = mask[:, 0, :].contiguous().to(torch.uint8)
    n_lse, n_o = fk.attention_splitkv_sizes(b, sq, hq, d)
    lse_acc, o_acc = poisoned(n_lse, dtype=F32), poisoned(n_o, dtype=F32)
    o, lse = poisoned(b, sq, hq, d), poisoned(b, hq, sq, dtype=F32)
    used = fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=b, seqlen_q=sq, seqlen_k=sk,
                        num_heads_q=hq, num_heads_kv=hkv, head_dim=d, q_strides=contiguous_strides(q),
                        k_strides=contiguous_strides(k), v_strides=contiguous_strides(v),
                        o_strides=contiguous_strides(o), softmax_scale=d**-0.5, mask=mask_u8.data_ptr(),
                        mask_strides=(sk, 0), softmax_lse=lse.data_ptr(), lse_accum=lse_acc.data_ptr(),
                        o_accum=o_acc.data_ptr(), num_splits=splits, stream=stream())
    assert used >= 1
    ref, ref_lse = attn_ref(q, k, v, d**-0.5, mask)
    check(o, ref, atol=2e-2, rtol=2e-2, what=f"split-kv {splits}")
    check(lse, ref_lse, atol=1e-3, rtol=1e-4, what="split-kv lse")


@pytest.mark.parametrize("d,hq,hkv", [(64, 8, 1), (72, 4, 4), (128, 8, 2)])
def test_attention_split_kv_head_dims(d, hq, hkv):
    """The combine at head dims of one 128-column chunk (lanes past head_dim idle) and with GQA."""
    b, sq, sk, splits = 2, 19, 700, 7
    q, k, v = rnd(b, sq, hq, d), rnd(b, sk, hkv, d), rnd(b, sk, hkv, d)
    n_lse, n_o = fk.attention_splitkv_sizes(b, sq, hq, d)
    lse_acc, o_acc = poisoned(n_lse, dtype=F32), poisoned(n_o, dtype=F32)
    o, lse = poisoned(b, sq, hq, d), poisoned(b, hq, sq, dtype=F32)
    fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=b, seqlen_q=sq, seqlen_k=sk,
                 num_heads_q=hq, num_heads_kv=hkv, head_dim=d, q_strides=contiguous_strides(q),
                 k_strides=contiguous_strides(k), v_strides=contiguous_strides(v), o_strides=contiguous_strides(o),
                 softmax_scale=d**-0.5, softmax_lse=lse.data_ptr(), lse_accum=lse_acc.data_ptr(),
                 o_accum=o_acc.data_ptr(), num_splits=splits, stream=stream())
    ref, ref_lse = attn_ref(q, k, v, d**-0.5, None)
    check(o, ref, atol=2e-2, rtol=2e-2, what=f"split-kv d{d} {hq}/{hkv}")
    check(lse, ref_lse, atol=1e-3, rtol=1e-4, what=f"split-kv d{d} lse")


@pytest.mark.parametrize("splits", [0, 3])
def test_attention_split_kv_heads_folded_into_rows(splits):
    """The pipeline's decode call: MQA with the 8 query heads folded into 400 rows of one head
    (group 1), against a 627-key cache, split over the keys."""
    sq, sk, d = 400, 627, 256
    q, k, v = rnd(1, sq, 1, d), rnd(1, sk, 1, d), rnd(1, sk, 1, d)
    n_lse, n_o = fk.attention_splitkv_sizes(1, sq, 1, d)
    lse_acc, o_acc = poisoned(n_lse, dtype=F32), poisoned(n_o, dtype=F32)
    o, lse = poisoned(1, sq, 1, d), poisoned(1, 1, sq, dtype=F32)
    fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=1, seqlen_q=sq, seqlen_k=sk,
                 num_heads_q=1, num_heads_kv=1, head_dim=d, q_strides=contiguous_strides(q),
                 k_strides=contiguous_strides(k), v_strides=contiguous_strides(v), o_strides=contiguous_strides(o),
                 softmax_scale=d**-0.5, softmax_lse=lse.data_ptr(), lse_accum=lse_acc.data_ptr(),
                 o_accum=o_acc.data_ptr(), num_splits=splits, stream=stream())
    ref, ref_lse = attn_ref(q, k, v, d**-0.5, None)
    check(o, ref, atol=2e-2, rtol=2e-2, what=f"folded split-kv {splits}")
    check(lse, ref_lse, atol=1e-3, rtol=1e-4, what="folded split-kv lse")


def test_attention_strided_views_of_a_fused_qkv_buffer():
    """Q/K/V as views into one [S, (Hq + 2 Hkv) * D] buffer, O written into a wider buffer."""
    s, hq, hkv, d = 130, 8, 1, 256
    qkv = rnd(1, s, hq + 2 * hkv, d)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    big = poisoned(1, s, hq + 3, d)
    o = big[:, :, 1:hq + 1]
    fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=1, seqlen_q=s, seqlen_k=s,
                 num_heads_q=hq, num_heads_kv=hkv, head_dim=d, q_strides=contiguous_strides(q),
                 k_strides=contiguous_strides(k), v_strides=contiguous_strides(v), o_strides=contiguous_strides(o),
                 softmax_scale=0.0625, stream=stream())
    ref, _ = attn_ref(q, k, v, 0.0625)
    check(o, ref, atol=2e-2, rtol=2e-2, what="strided attention")
    torch.cuda.synchronize()
    assert torch.isnan(big[:, :, 0].float()).all() and torch.isnan(big[:, :, hq + 1:].float()).all(), \
        "attention wrote outside its output view"


@pytest.mark.parametrize("fn,tdt", [("fwd_bf16", BF16), ("fwd_fp16", torch.float16)])
@pytest.mark.parametrize("split", [False, True])
def test_flash_rt_fa2_shim(fn, tdt, split):
    from flash_rt import flash_rt_fa2

    b, sq, sk, hq, hkv, d = 1, 50, 1018, 8, 1, 256
    q, k, v = rnd(b, sq, hq, d, dtype=tdt), rnd(b, sk, hkv, d, dtype=tdt), rnd(b, sk, hkv, d, dtype=tdt)
    o, lse = poisoned(b, sq, hq, d, dtype=tdt), poisoned(b, hq, sq, dtype=F32)
    n_lse, n_o = fk.attention_splitkv_sizes(b, sq, hq, d)
    lse_acc, o_acc = poisoned(n_lse, dtype=F32), poisoned(n_o, dtype=F32)
    getattr(flash_rt_fa2, fn)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
        lse_acc.data_ptr() if split else 0, o_acc.data_ptr() if split else 0,
        batch=b, seqlen_q=sq, seqlen_k=sk, num_heads_q=hq, num_heads_kv=hkv, head_dim=d,
        q_strides=contiguous_strides(q), k_strides=contiguous_strides(k), v_strides=contiguous_strides(v),
        o_strides=contiguous_strides(o), softmax_scale=d**-0.5,
        num_sms=torch.cuda.get_device_properties(0).multi_processor_count, stream=stream())
    ref, ref_lse = attn_ref(q, k, v, d**-0.5)
    check(o, ref, atol=2e-2, rtol=2e-2, what=fn)
    check(lse, ref_lse, atol=1e-3, rtol=1e-4, what=fn + " lse")


def test_attention_fully_masked_rows_give_zero():
    b, sq, sk, h, d = 1, 16, 64, 2, 64
    q, k, v = rnd(b, sq, h, d), rnd(b, sk, h, d), rnd(b, sk, h, d)
    mask = torch.ones(b, sq, sk, dtype=torch.uint8, device=DEV)
    mask[:, 3] = 0
    o = poisoned(b, sq, h, d)
    fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=b, seqlen_q=sq, seqlen_k=sk,
                 num_heads_q=h, num_heads_kv=h, head_dim=d, q_strides=contiguous_strides(q),
                 k_strides=contiguous_strides(k), v_strides=contiguous_strides(v), o_strides=contiguous_strides(o),
                 softmax_scale=0.125, mask=mask.data_ptr(), mask_strides=(sq * sk, sk), stream=stream())
    torch.cuda.synchronize()
    assert torch.equal(o[:, 3].float(), torch.zeros_like(o[:, 3].float()))
    ref, _ = attn_ref(q, k, v, 0.125, mask.bool())
    check(o, ref, atol=2e-2, rtol=2e-2, what="masked rows")


def test_launch_errors_are_raised_with_cuda_message():
    # An address the GPU cannot read: the launch is accepted, the fault surfaces at synchronisation
    # (checked by torch). What we own: a bad configuration is refused before the launch.
    with pytest.raises(ValueError):
        fk.skinny_gemm(0x1000, 0x2000, 0x3000, 50, 64, 60)
    from flashrt_kernels import _C

    rc = _C.skinny_gemm(0x1000, 0x2000, 0x3000, 0, 0, 1.0, 80, 64, 64, 0, False, 0, 0, True, 0)  # m > 64, C level
    assert rc == 1 and "invalid argument" in fk.error_string(rc)
    assert math.isfinite(float(fk.attention_num_splits(1, 50, 1018, 8, 1, 256)))


@pytest.mark.parametrize("sq,sk,splits", [(50, 627, 0), (50, 1018, 0), (577, 577, 1), (50, 300, 1)])
def test_attention_fp8_out(sq, sk, splits):
    """O written as E4M3 at a static scale (the input of an FP8 output projection), from the direct
    store (one split) and from the split-KV combine."""
    if E4M3 is None or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 needs torch float8 and sm_89+")
    b, hq, hkv, d = 1, 8, 1, 256
    q, k, v = rnd(b, sq, hq, d), rnd(b, sk, hkv, d), rnd(b, sk, hkv, d)
    n_lse, n_o = fk.attention_splitkv_sizes(b, sq, hq, d)
    lse_acc, o_acc = poisoned(n_lse, dtype=F32), poisoned(n_o, dtype=F32)
    ref, _ = attn_ref(q, k, v, d**-0.5)
    scale = float(ref.abs().max()) / 448
    outs = {}
    for fp8 in (False, True):
        o = poisoned(b, sq, hq, d, dtype=E4M3 if fp8 else BF16)
        fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=b, seqlen_q=sq, seqlen_k=sk,
                     num_heads_q=hq, num_heads_kv=hkv, head_dim=d, q_strides=contiguous_strides(q),
                     k_strides=contiguous_strides(k), v_strides=contiguous_strides(v),
                     o_strides=contiguous_strides(o), softmax_scale=d**-0.5, lse_accum=lse_acc.data_ptr(),
                     o_accum=o_acc.data_ptr(), num_splits=splits,
                     out_scale=scalar(scale).data_ptr() if fp8 else 0, stream=stream())
        outs[fp8] = o
    # the bf16 output holds the kernel's (bf16 P @ V) error, ~1e-4 absolute: the FP8 output is that
    # result quantised (one E4M3 step either side), and both are checked against the fp64 reference
    check(outs[False], ref, atol=2e-2, rtol=2e-2, what="attention bf16 out")
    check_fp8(outs[True], outs[False].float(), scale, what=f"attention fp8 out ({sq}x{sk}, splits {splits})")
    check_rel(outs[True].float() * scale, ref, rel=0.05, what="attention fp8 out vs fp64")


@pytest.mark.parametrize("static,splits", [(577, 0), (577, 1), (0, 0), (560, 3)])  # static <= the prefix
def test_attention_static_keys_after_the_writer_of_the_last_block(static, splits):
    """A denoise step's chain, captured and replayed as a graph: rope_qkv writes Q and the last 50
    keys of the cache, then attention over the whole cache, whose first tiles of keys [0, static)
    are copied before it waits for rope_qkv (programmatic dependent launch). New QKV before every
    replay: a tile read before rope_qkv's writes landed would give the previous replay's keys."""
    prefix, t, hq, d = 577, 50, 8, 256
    sk = prefix + t
    k_cache, v_cache = rnd(sk, 1, d), rnd(sk, 1, d)
    qkv = rnd(t, (hq + 2) * d)
    positions = torch.arange(prefix, sk, device=DEV, dtype=torch.int32)
    q = poisoned(t, hq, d)
    o = poisoned(t * hq, 1, d)
    n_lse, n_o = fk.attention_splitkv_sizes(1, t * hq, 1, d)
    lse_acc, o_acc = poisoned(n_lse, dtype=F32), poisoned(n_o, dtype=F32)
    strides = (sk * d, d, d)

    def step(s):
        fk.rope_qkv(qkv.data_ptr(), positions.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                    t, hq, 1, d, cache_offset=prefix, stream=s)
        fk.attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o.data_ptr(), batch=1, seqlen_q=t * hq,
                     seqlen_k=sk, num_heads_q=1, num_heads_kv=1, head_dim=d, q_strides=(t * hq * d, d, d),
                     k_strides=strides, v_strides=strides, o_strides=(t * hq * d, d, d), softmax_scale=d**-0.5,
                     lse_accum=lse_acc.data_ptr(), o_accum=o_acc.data_ptr(), num_splits=splits,
                     static_keys=static, stream=s)

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step(s.cuda_stream)  # outside the capture: the kernels' one-time attributes
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        step(s.cuda_stream)
    for replay in range(3):
        qkv.copy_(rnd(t, (hq + 2) * d))
        o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = attn_ref(q.view(1, t * hq, 1, d), k_cache[None], v_cache[None], d**-0.5, None)
        check(o[None], ref, atol=2e-2, rtol=2e-2, what=f"replay {replay}, static {static}, splits {splits}")
        assert torch.equal(v_cache[prefix:], qkv.view(t, hq + 2, d)[:, hq + 1 :]), "the last block is this replay's"
