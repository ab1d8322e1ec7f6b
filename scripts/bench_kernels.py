#!/usr/bin/env python3
"""Kernel benchmark: every flashrt_kernels op at Pi0.5 / SigLIP shapes against its torch / cuBLAS
baseline and the card's measured ceilings, in one process.

    python scripts/bench_kernels.py [--out results.json] [--quick] [--only skinny,attention] [--sweep]

Timing: each op is captured N times into a CUDA graph (launch gaps as in the real pipeline), the
calls rotate over enough input sets to exceed L2 where the op is memory-bound, the graph is
replayed after warm-up and the median over replays (CUDA events) is divided by N. Ceilings measured
here: device-to-device copy (bytes read + written), bf16 GEMM (torch.matmul 8192^3), fp8 GEMM
(torch._scaled_mm 8192^3). Prints a table last; writes JSON to --out or $OUT/bench_kernels.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

import flashrt_kernels as fk

DEV = "cuda"
BF16 = torch.bfloat16
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES  # memory-bound ops rotate over at least this much input


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def n_sets(bytes_per_set: int, cap: int = 64) -> int:
    return max(1, min(cap, -(-ROTATE_BYTES // max(1, bytes_per_set))))


def time_graph(calls, per_graph: int = 20, replays: int = 30, warmup: int = 3) -> float:
    """Median microseconds per call. calls: list of zero-arg launchers (rotated through)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[: min(len(calls), 3)]:
            c()  # plan / tune / lazy init outside the capture
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        for i in range(per_graph):
            calls[i % len(calls)]()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / per_graph)
    return statistics.median(times)


def maybe_time(calls, **kw):
    """Baselines may not support a shape (e.g. torch._scaled_mm wants multiples of 16): None then."""
    try:
        return time_graph(calls, **kw)
    except Exception as exc:
        print(f"  baseline failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return None


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------
# ceilings


def measure_ceilings(quick: bool) -> dict:
    out = {}
    n = (256 if quick else 1024) * 2**20
    src, dst = torch.empty(n, dtype=torch.uint8, device=DEV).random_(), torch.empty(n, dtype=torch.uint8, device=DEV)
    us = time_graph([lambda: dst.copy_(src)], per_graph=5, replays=10)
    out["copy_TBps"] = 2 * n / (us * 1e-6) / 1e12
    m = 8192
    a, b = rnd(m, m), rnd(m, m)
    us = time_graph([lambda: torch.matmul(a, b)], per_graph=3, replays=10)
    out["bf16_TFLOPs"] = 2 * m**3 / (us * 1e-6) / 1e12
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=DEV)
        us = time_graph([lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=BF16)],
                        per_graph=3, replays=10)
        out["fp8_TFLOPs"] = 2 * m**3 / (us * 1e-6) / 1e12
    except Exception as exc:  # older torch / card without fp8
        out["fp8_TFLOPs"] = None
        out["fp8_error"] = repr(exc)
    return out


# ------------------------------------------------------------------------------------------------
# cases: each returns (ours_us, baseline_us, bytes, flops, baseline_name)


def case_rms_norm(rows, hidden, fp8=False, residual=False):
    elem_out = 1 if fp8 else 2
    per = rows * hidden * (2 + elem_out + (4 if residual else 0))
    k = n_sets(per)
    xs = [rnd(rows, hidden) for _ in range(k)]
    rs = [rnd(rows, hidden) for _ in range(k)] if residual else [None] * k
    outs = [torch.empty(rows, hidden, dtype=torch.uint8 if fp8 else BF16, device=DEV) for _ in range(k)]
    w = rnd(hidden)
    scale = torch.tensor([0.01], device=DEV)
    sp = scale.data_ptr() if fp8 else 0
    if residual:
        ours = [lambda i=i: fk.add_rms_norm(xs[i].data_ptr(), rs[i].data_ptr(), w.data_ptr(), outs[i].data_ptr(),
                                            rows, hidden, out_scale=sp, stream=stream()) for i in range(k)]
    else:
        ours = [lambda i=i: fk.rms_norm(xs[i].data_ptr(), w.data_ptr(), outs[i].data_ptr(), rows, hidden,
                                        out_scale=sp, stream=stream()) for i in range(k)]

    def torch_ref(i):
        x = xs[i].float()
        if residual:
            r = (rs[i].float() + x).to(BF16)
            rs[i].copy_(r)
            x = r.float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.float())
        return y.to(torch.float8_e4m3fn) if fp8 else y.to(BF16)

    base = [lambda i=i: torch_ref(i) for i in range(k)]
    return time_graph(ours), maybe_time(base), per, 0, "torch composition"


def case_layer_norm(rows, hidden):
    per = rows * hidden * 4
    k = n_sets(per)
    xs = [rnd(rows, hidden) for _ in range(k)]
    outs = [torch.empty_like(x) for x in xs]
    w, b = rnd(hidden), rnd(hidden)
    ours = [lambda i=i: fk.layer_norm(xs[i].data_ptr(), w.data_ptr(), b.data_ptr(), outs[i].data_ptr(), rows,
                                      hidden, stream=stream()) for i in range(k)]
    base = [lambda i=i: F.layer_norm(xs[i], (hidden,), w, b, 1e-6) for i in range(k)]
    return time_graph(ours), maybe_time(base), per, 0, "F.layer_norm"


def case_geglu(rows, inter, fp8=False):
    per = rows * inter * (4 + (1 if fp8 else 2))
    k = n_sets(per)
    gus = [rnd(rows, 2 * inter) for _ in range(k)]
    outs = [torch.empty(rows, inter, dtype=torch.uint8 if fp8 else BF16, device=DEV) for _ in range(k)]
    scale = torch.tensor([0.01], device=DEV)
    ours = [lambda i=i: fk.geglu(gus[i].data_ptr(), outs[i].data_ptr(), rows, inter,
                                 out_scale=scale.data_ptr() if fp8 else 0, stream=stream()) for i in range(k)]
    base = [lambda i=i: F.gelu(gus[i][:, :inter], approximate="tanh") * gus[i][:, inter:] for i in range(k)]
    return time_graph(ours), maybe_time(base), per, 0, "F.gelu * up"


def case_quantize(n):
    per = n * 3
    k = n_sets(per)
    xs = [rnd(n) for _ in range(k)]
    outs = [torch.empty(n, dtype=torch.uint8, device=DEV) for _ in range(k)]
    scale = torch.tensor([0.01], device=DEV)
    ours = [lambda i=i: fk.quantize_fp8(xs[i].data_ptr(), outs[i].data_ptr(), n, scale.data_ptr(), stream=stream())
            for i in range(k)]
    base = [lambda i=i: (xs[i].float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn) for i in range(k)]
    return time_graph(ours), maybe_time(base), per, 0, "torch div+clamp+cast"


def case_small_linear(m, k_dim, n, x_dtype):
    """The fp32 action projections beside a flow policy's state (in: fp32 x; out: bf16 x), written
    (the pipeline's out-projection accumulates into the state), against torch's fp32 addmm."""
    dt = {"fp32": torch.float32, "bf16": BF16}[x_dtype]
    per = n * k_dim * 4 + m * k_dim * dt.itemsize + m * n * 4
    k = n_sets(per)
    xs = [rnd(m, k_dim, dtype=dt) for _ in range(k)]
    ws = [rnd(n, k_dim, dtype=torch.float32, scale=k_dim**-0.5) for _ in range(k)]
    b = rnd(n, dtype=torch.float32)
    outs = [torch.empty(m, n, device=DEV) for _ in range(k)]
    ours = [lambda i=i: fk.small_linear(xs[i].data_ptr(), ws[i].data_ptr(), outs[i].data_ptr(), m, n, k_dim,
                                        bias=b.data_ptr(), x_dtype=x_dtype, stream=stream()) for i in range(k)]
    base = [lambda i=i: torch.addmm(b, xs[i].float(), ws[i].t()) for i in range(k)]
    return time_graph(ours), maybe_time(base), per, 2 * m * n * k_dim, "torch.addmm fp32"


def case_rope(tokens, hq, hkv, d):
    width = (hq + 2 * hkv) * d
    per = tokens * width * 4
    k = n_sets(per, cap=16)
    qkvs = [rnd(tokens, width) for _ in range(k)]
    pos = torch.arange(tokens, device=DEV, dtype=torch.int32)
    qo = torch.empty(tokens, hq, d, dtype=BF16, device=DEV)
    kc, vc = torch.empty(tokens, hkv, d, dtype=BF16, device=DEV), torch.empty(tokens, hkv, d, dtype=BF16, device=DEV)
    # positions 0 (token t at position t, no load), as the pipeline calls it
    ours = [lambda i=i: fk.rope_qkv(qkvs[i].data_ptr(), 0, qo.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                                    tokens, hq, hkv, d, stream=stream()) for i in range(k)]
    inv = 1.0 / (10000.0 ** ((2.0 / d) * torch.arange(d // 2, device=DEV, dtype=torch.float32)))

    def base_fn(i):
        q, kk, v = qkvs[i].view(tokens, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
        ang = pos.float()[:, None, None] * inv
        s, c = ang.sin(), ang.cos()

        def rot(x):
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(BF16)

        qo.copy_(rot(q))
        kc.copy_(rot(kk))
        vc.copy_(v)

    base = [lambda i=i: base_fn(i) for i in range(k)]
    return time_graph(ours), maybe_time(base), per, 0, "torch rope+copies"


def case_gemm(m, k_dim, n, fp8=False, workspace=None, autotune=3):
    flops = 2 * m * n * k_dim
    x = rnd(m, k_dim)
    w = rnd(n, k_dim, scale=k_dim**-0.5)
    out = torch.empty(m, n, dtype=BF16, device=DEV)
    one = torch.ones((), device=DEV)
    if fp8:
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        s = torch.ones(1, device=DEV)
        ours = [lambda: fk.gemm(x8.data_ptr(), w8.data_ptr(), out.data_ptr(), m, n, k_dim, dtype="fp8",
                                x_scale=s.data_ptr(), w_scale=s.data_ptr(), workspace=workspace.data_ptr(),
                                workspace_size=workspace.numel(), autotune=autotune, stream=stream())]
        base = [lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=BF16)]
        name = "torch._scaled_mm"
    else:
        ours = [lambda: fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k_dim, workspace=workspace.data_ptr(),
                                workspace_size=workspace.numel(), autotune=autotune, stream=stream())]
        base = [lambda: torch.matmul(x, w.t())]
        name = "torch.matmul"
    return time_graph(ours), maybe_time(base), (m * k_dim + n * k_dim) * (1 if fp8 else 2) + m * n * 2, flops, name


def case_skinny(m, k_dim, n, workspace=None, pdl=True, split=0, baselines=True):
    wbytes = n * k_dim * 2
    k = n_sets(wbytes)
    x = rnd(m, k_dim)
    ws = [rnd(n, k_dim, scale=k_dim**-0.5) for _ in range(k)]
    out = torch.empty(m, n, dtype=BF16, device=DEV)
    ours = [lambda i=i: fk.skinny_gemm(x.data_ptr(), ws[i].data_ptr(), out.data_ptr(), m, n, k_dim, pdl=pdl,
                                       split=split, stream=stream()) for i in range(k)]
    if not baselines:
        return time_graph(ours), None, wbytes, 2 * m * n * k_dim, "-"
    base = [lambda i=i: torch.matmul(x, ws[i].t()) for i in range(k)]
    lt = [lambda i=i: fk.gemm(x.data_ptr(), ws[i].data_ptr(), out.data_ptr(), m, n, k_dim,
                              workspace=workspace.data_ptr(), workspace_size=workspace.numel(), autotune=5,
                              stream=stream()) for i in range(k)]
    t_lt = maybe_time(lt)
    lt_note = f"{t_lt:.1f} us" if t_lt else "failed"
    return time_graph(ours), maybe_time(base), wbytes, 2 * m * n * k_dim, f"torch.matmul (cuBLASLt tuned {lt_note})"


def _fp8_operands(m, k_dim, n, sets):
    """E4M3 x [m, k], ``sets`` weights [n, k] (rotated past L2 where there are several) and a unit scale."""
    x8 = rnd(m, k_dim).to(torch.float8_e4m3fn)
    ws = [rnd(n, k_dim, scale=0.5).to(torch.float8_e4m3fn) for _ in range(sets)]
    return x8, ws, torch.ones(1, device=DEV)


def case_skinny_fp8(m, k_dim, n, workspace=None, l2="cold"):
    """l2: "cold" rotates weights past L2 (DRAM every call), "hot" reuses one set (L2 hits: what an
    L2 prefetch of the weights could give at best)."""
    wbytes = n * k_dim
    k = 1 if l2 == "hot" else n_sets(wbytes)
    x8, ws, s = _fp8_operands(m, k_dim, n, k)
    out = torch.empty(m, n, dtype=BF16, device=DEV)
    ours = [lambda i=i: fk.skinny_gemm(x8.data_ptr(), ws[i].data_ptr(), out.data_ptr(), m, n, k_dim, dtype="fp8",
                                       x_scale=s.data_ptr(), w_scale=s.data_ptr(), stream=stream()) for i in range(k)]
    lt = [lambda i=i: fk.gemm(x8.data_ptr(), ws[i].data_ptr(), out.data_ptr(), m, n, k_dim, dtype="fp8",
                              x_scale=s.data_ptr(), w_scale=s.data_ptr(), workspace=workspace.data_ptr(),
                              workspace_size=workspace.numel(), autotune=5, stream=stream()) for i in range(k)]
    return time_graph(ours), maybe_time(lt), wbytes, 2 * m * n * k_dim, f"cuBLASLt fp8 (tuned), L2 {l2}"


def case_skinny_rope_fp8(m, k_dim, hq, hkv, d, given_positions=False):
    """The expert's QKV projection with RoPE, the q split and the cache write in the skinny GEMM's
    epilogue, against the plain skinny GEMM at the same shape (the baseline column: what the
    epilogue costs), weights rotated past L2. given_positions: read positions from memory instead
    of rows at cache_offset + i (the pipeline's call)."""
    n = (hq + 2 * hkv) * d
    wbytes = n * k_dim
    k = n_sets(wbytes)
    x8, ws, s = _fp8_operands(m, k_dim, n, k)
    pos = torch.arange(600, 600 + m, device=DEV, dtype=torch.int32)
    q_out = torch.empty(m, hq, d, dtype=BF16, device=DEV)
    kc, vc = torch.empty(m, hkv, d, dtype=BF16, device=DEV), torch.empty(m, hkv, d, dtype=BF16, device=DEV)
    out = torch.empty(m, n, dtype=BF16, device=DEV)
    pos_ptr = pos.data_ptr() if given_positions else 0
    ours = [lambda i=i: fk.skinny_gemm_rope_qkv(x8.data_ptr(), ws[i].data_ptr(), pos_ptr, q_out.data_ptr(),
                                                kc.data_ptr(), vc.data_ptr(), m, k_dim, hq, hkv, d, dtype="fp8",
                                                x_scale=s.data_ptr(), w_scale=s.data_ptr(), stream=stream())
            for i in range(k)]
    plain = [lambda i=i: fk.skinny_gemm(x8.data_ptr(), ws[i].data_ptr(), out.data_ptr(), m, n, k_dim, dtype="fp8",
                                        x_scale=s.data_ptr(), w_scale=s.data_ptr(), stream=stream()) for i in range(k)]
    return time_graph(ours), maybe_time(plain), wbytes, 2 * m * n * k_dim, "skinny fp8 without the epilogue"


def _sdpa_cudnn(q, k, v, mask=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def case_attention(sq, sk, hq, hkv, d, with_mask=False, split=False, static_keys=0):
    """split: False (one pass), True (split-KV, count chosen by the kernel) or a split count.
    static_keys: keys declared written before the previous kernel (their first tiles load before
    the kernel's wait: back to back under PDL, during the previous call's tail)."""
    flops = 4 * sq * sk * hq * d
    q, k, v = rnd(1, sq, hq, d), rnd(1, sk, hkv, d), rnd(1, sk, hkv, d)
    o = torch.empty_like(q)
    mask = torch.ones(1, sk, dtype=torch.uint8, device=DEV)
    if with_mask:
        mask[:, sk - sk // 10:] = 0
    nl, no = fk.attention_splitkv_sizes(1, sq, hq, d)
    lse_acc, o_acc = torch.empty(nl, device=DEV), torch.empty(no, device=DEV)

    def strides(t):
        return (t.stride(0), t.stride(1), t.stride(2))

    ours = [lambda: fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=1, seqlen_q=sq,
                                 seqlen_k=sk, num_heads_q=hq, num_heads_kv=hkv, head_dim=d, q_strides=strides(q),
                                 k_strides=strides(k), v_strides=strides(v), o_strides=strides(o),
                                 softmax_scale=d**-0.5, mask=mask.data_ptr() if with_mask else 0,
                                 mask_strides=(sk, 0), lse_accum=lse_acc.data_ptr() if split else 0,
                                 o_accum=o_acc.data_ptr() if split else 0,
                                 num_splits=(0 if split is True else int(split)) if split else 1,
                                 static_keys=static_keys, stream=stream())]
    # Baseline in torch's [B, H, S, D] layout, K/V expanded to the query heads (MQA).
    qt = q.transpose(1, 2).contiguous()
    kt = k.transpose(1, 2).repeat_interleave(hq // hkv, dim=1).contiguous()
    vt = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1).contiguous()
    amask = mask.bool()[:, None, None, :] if with_mask else None
    name = "SDPA cuDNN"
    t_base = maybe_time([lambda: _sdpa_cudnn(qt, kt, vt, amask)])
    if t_base is None:
        name = "SDPA default"
        t_base = maybe_time([lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=amask)])
    return time_graph(ours), t_base, (sq * hq + 2 * sk * hkv) * d * 2 * 2, flops, name


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_kernels.json or ./bench_kernels.json)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, smaller ceiling runs")
    ap.add_argument("--only", default="", help="comma-separated substrings of 'op shape': run only matching cases")
    ap.add_argument("--sweep", action="store_true", help="add skinny GEMM cases at every cluster split")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device", file=sys.stderr)
        return 2
    out_path = args.out or os.path.join(os.environ.get("OUT") or ".", "bench_kernels.json")
    props = torch.cuda.get_device_properties(0)
    ceil = measure_ceilings(args.quick)
    print(f"  ceilings: {ceil}", flush=True)
    workspace = torch.empty(fk.GEMM_WORKSPACE_BYTES, dtype=torch.uint8, device=DEV)

    cases = [
        ("rms_norm", "968x2048", lambda: case_rms_norm(968, 2048)),
        ("rms_norm", "50x1024", lambda: case_rms_norm(50, 1024)),
        ("rms_norm->fp8", "968x2048", lambda: case_rms_norm(968, 2048, fp8=True)),
        ("add_rms_norm", "968x2048", lambda: case_rms_norm(968, 2048, residual=True)),
        ("layer_norm", "512x1152", lambda: case_layer_norm(512, 1152)),
        ("geglu", "968x16384", lambda: case_geglu(968, 16384)),
        ("geglu->fp8", "968x16384", lambda: case_geglu(968, 16384, fp8=True)),
        ("geglu", "50x4096", lambda: case_geglu(50, 4096)),
        ("quantize_fp8", "968x2048", lambda: case_quantize(968 * 2048)),
        ("rope_qkv", "968x(8+2)x256", lambda: case_rope(968, 8, 1, 256)),
        ("rope_qkv", "577x(8+2)x256", lambda: case_rope(577, 8, 1, 256)),
        ("rope_qkv", "50x(8+2)x256", lambda: case_rope(50, 8, 1, 256)),
        ("small_linear", "50x32->1024 fp32", lambda: case_small_linear(50, 32, 1024, "fp32")),
        ("small_linear", "50x1024->32 bf16", lambda: case_small_linear(50, 1024, 32, "bf16")),
        ("skinny_gemm", "50x1024->4096", lambda: case_skinny(50, 1024, 4096, workspace)),
        ("skinny_gemm", "50x4096->1024", lambda: case_skinny(50, 4096, 1024, workspace)),
        ("skinny_gemm", "50x1024->2048", lambda: case_skinny(50, 1024, 2048, workspace)),
        ("skinny_gemm noPDL", "50x1024->4096", lambda: case_skinny(50, 1024, 4096, workspace, pdl=False)),
        ("skinny_gemm", "50x1024->2560", lambda: case_skinny(50, 1024, 2560, workspace)),
        ("skinny_gemm_fp8", "50x1024->4096", lambda: case_skinny_fp8(50, 1024, 4096, workspace)),
        ("skinny_gemm_fp8", "50x4096->1024", lambda: case_skinny_fp8(50, 4096, 1024, workspace)),
        ("skinny_gemm_fp8", "50x1024->2048", lambda: case_skinny_fp8(50, 1024, 2048, workspace)),
        ("skinny_fp8 rope epilogue", "50x1024->(8+2)x256", lambda: case_skinny_rope_fp8(50, 1024, 8, 1, 256)),
        ("skinny_fp8 rope positions", "50x1024->(8+2)x256",
         lambda: case_skinny_rope_fp8(50, 1024, 8, 1, 256, given_positions=True)),
        # the same with the weights already in L2 (what an L2 prefetch could give at best)
        ("skinny_fp8 L2-hot", "50x1024->4096", lambda: case_skinny_fp8(50, 1024, 4096, workspace, l2="hot")),
        ("skinny_fp8 L2-hot", "50x4096->1024", lambda: case_skinny_fp8(50, 4096, 1024, workspace, l2="hot")),
        ("skinny_fp8 L2-hot", "50x1024->2048", lambda: case_skinny_fp8(50, 1024, 2048, workspace, l2="hot")),
        ("gemm_bf16", "968x2048->2560", lambda: case_gemm(968, 2048, 2560, workspace=workspace)),
        ("gemm_bf16", "968x2048->32768", lambda: case_gemm(968, 2048, 32768, workspace=workspace)),
        ("gemm_bf16", "968x16384->2048", lambda: case_gemm(968, 16384, 2048, workspace=workspace)),
        ("gemm_bf16", "512x1152->4304", lambda: case_gemm(512, 1152, 4304, workspace=workspace)),
        ("gemm_fp8", "968x2048->32768", lambda: case_gemm(968, 2048, 32768, fp8=True, workspace=workspace)),
        ("gemm_fp8", "968x16384->2048", lambda: case_gemm(968, 16384, 2048, fp8=True, workspace=workspace)),
        ("attention", "816 q8 kv1 d256", lambda: case_attention(816, 816, 8, 1, 256)),
        ("attention+mask", "968 q8 kv1 d256", lambda: case_attention(968, 968, 8, 1, 256, with_mask=True)),
        ("attention", "512 h16 d72", lambda: case_attention(512, 512, 16, 16, 72)),
        ("attention", "200 q16 kv8 d128", lambda: case_attention(200, 200, 16, 8, 128)),
        ("attn decode", "50x1018 q8 kv1 d256", lambda: case_attention(50, 1018, 8, 1, 256, with_mask=True)),
        ("attn decode split", "50x1018 q8 kv1 d256",
         lambda: case_attention(50, 1018, 8, 1, 256, with_mask=True, split=True)),
        # the denoise step's call: 50 queries x 8 heads over 577 prefix + 50 own keys, splits auto
        ("attn decode split", "50x627 q8 kv1 d256", lambda: case_attention(50, 627, 8, 1, 256, split=True)),
        ("attn decode static", "50x627 q8 kv1 d256",
         lambda: case_attention(50, 627, 8, 1, 256, split=True, static_keys=577)),
    ]
    if args.sweep:
        for m, k_dim, n in [(50, 1024, 4096), (50, 4096, 1024), (50, 1024, 2048)]:
            for split in (1, 2, 4, 8, 16):
                cases.append((f"skinny split={split}", f"{m}x{k_dim}->{n}",
                              lambda m=m, k_dim=k_dim, n=n, split=split:
                              case_skinny(m, k_dim, n, split=split, baselines=False)))
        for splits in (2, 4, 7, 10, 16):  # the denoise step's attention: 50 x 8 heads over 577 + 50 keys
            cases.append((f"attn decode split={splits}", "50x627 q8 kv1 d256",
                          lambda splits=splits: case_attention(50, 627, 8, 1, 256, split=splits)))
        cases.append(("attn decode split=auto", "50x627 q8 kv1 d256",
                      lambda: case_attention(50, 627, 8, 1, 256, split=True)))
        # the prefix attention (issue 4's shape, and the pipeline's 577 tokens at 2 views): ~100 tiles
        # of 64 rows leave SMs idle and the kernel does not split them itself; a split fills the card
        # at the cost of the fp32 partials' round trip and a combine
        for tokens in (816, 577):
            for splits in (1, 2, 3, 4):
                cases.append((f"attention split={splits}", f"{tokens} q8 kv1 d256",
                              lambda tokens=tokens, splits=splits: case_attention(tokens, tokens, 8, 1, 256,
                                                                                  split=splits)))
    if args.quick:
        cases = cases[::2]
    if args.only:
        keys = [key.strip() for key in args.only.split(",") if key.strip()]
        cases = [c for c in cases if any(key in f"{c[0]} {c[1]}" for key in keys)]

    rows = []
    for op, shape, fn in cases:
        try:
            ours, base, nbytes, flops, base_name = fn()
            row = {"op": op, "shape": shape, "us": ours, "baseline_us": base, "baseline": base_name,
                   "speedup": base / ours if base else None, "bytes": nbytes, "flops": flops,
                   "TBps": nbytes / (ours * 1e-6) / 1e12, "TFLOPs": flops / (ours * 1e-6) / 1e12 if flops else None}
            if op.startswith("skinny"):
                row["bound"], row["of_ceiling"] = "weight TB/s", row["TBps"] / ceil["copy_TBps"]
            elif flops and not op.startswith("skinny"):
                peak = ceil["fp8_TFLOPs"] if op.endswith("fp8") else ceil["bf16_TFLOPs"]
                row["bound"], row["of_ceiling"] = "TFLOP/s", (row["TFLOPs"] / peak) if peak else None
            else:
                row["bound"], row["of_ceiling"] = "TB/s", row["TBps"] / ceil["copy_TBps"]
        except Exception as exc:
            row = {"op": op, "shape": shape, "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc(limit=3)}
        rows.append(row)
        # progress line: if the run is cut off, the log still says how far it got
        print(f"  {op} {shape}: " + (f"{row['us']:.2f} us" if "error" not in row else row["error"][:120]), flush=True)
        torch.cuda.empty_cache()

    # FLASHRT_COMMIT first, as flashrt bench: the GPU machine's copy of the tree may carry a stale .git
    commit = os.environ.get("FLASHRT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
    result = {"device": props.name, "sms": props.multi_processor_count,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit, "torch": torch.__version__, "flashrt_kernels": fk.__version__,
              "built_archs": fk.built_archs(), "ceilings": ceil, "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)

    fp8 = ceil.get("fp8_TFLOPs")
    print(f"\n{props.name}: copy {ceil['copy_TBps']:.2f} TB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
          f"fp8 {fp8 and round(fp8)} TFLOP/s  (JSON: {out_path})")
    print(f"{'op':<18} {'shape':<22} {'us':>8} {'rate':>14} {'ceil%':>6} {'base us':>8} {'x base':>7}  baseline")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<18} {r['shape']:<22} ERROR {r['error'][:80]}")
            continue
        rate = f"{r['TFLOPs']:.0f} TFLOP/s" if r["bound"] == "TFLOP/s" else f"{r['TBps']:.2f} TB/s"
        pct = f"{100 * r['of_ceiling']:.0f}" if r.get("of_ceiling") is not None else "-"
        base_us = f"{r['baseline_us']:8.2f}" if r["baseline_us"] else f"{'-':>8}"
        speed = f"{r['speedup']:7.2f}" if r["speedup"] else f"{'-':>7}"
        print(f"{r['op']:<18} {r['shape']:<22} {r['us']:8.2f} {rate:>14} {pct:>6} {base_us} {speed}  {r['baseline']}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
