"""GPU tests: cuBLASLt GEMM (bf16 / FP8) and the skinny GEMM against torch.

Plain-torch references in fp32 / fp64; fresh random inputs per case (never zeros); outputs poisoned
with NaN before the call and checked fully written; true Pi0.5 / SigLIP / GR00T shapes plus odd
sizes; explicit tolerances. Ops get raw device addresses (tensor.data_ptr()) and the current stream.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
fk = pytest.importorskip("flashrt_kernels", reason="flashrt_kernels is not installed")

from flashrt_kernels_testlib import (  # noqa: E402
    BF16,
    DEV,
    E4M3,
    check,
    check_rel,
    fp8_ref,
    gelu_tanh_ref,
    gemm_ref,
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
# GEMM (cuBLASLt)

# (M, K, N): SigLIP qkv / mlp, Gemma-2B prefix qkv / gate_up / down, expert, GR00T, odd sizes
GEMM_SHAPES = [(512, 1152, 3456), (512, 1152, 4304), (512, 4304, 1152), (968, 2048, 2560), (968, 2048, 32768),
               (968, 16384, 2048), (50, 1024, 4096), (50, 4096, 1024), (64, 1536, 4608), (7, 72, 136),
               (1, 64, 16)]


@pytest.fixture(scope="module")
def workspace():
    return torch.empty(fk.GEMM_WORKSPACE_BYTES, device=DEV, dtype=torch.uint8)


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_gemm_bf16(m, k, n, workspace):
    x, w = rnd(m, k), rnd(n, k, scale=k**-0.5)
    out = poisoned(m, n)
    fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, workspace=workspace.data_ptr(),
            workspace_size=workspace.numel(), stream=stream())
    ref = gemm_ref(x, w)
    check_rel(out, ref, rel=5e-3, what="gemm bf16")
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what="gemm bf16")


@pytest.mark.parametrize("m,k,n", [(968, 2048, 2048), (50, 1024, 1024), (9, 136, 72)])
def test_gemm_bias_residual_inplace_and_alpha(m, k, n, workspace):
    x, w, bias, res = rnd(m, k), rnd(n, k, scale=k**-0.5), rnd(n), rnd(m, n)
    out = res.clone()  # residual added in place: out = alpha * x @ w^T + bias + out
    fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, workspace=workspace.data_ptr(),
            workspace_size=workspace.numel(), bias=bias.data_ptr(), residual=out.data_ptr(), alpha=0.5,
            stream=stream())
    ref = gemm_ref(x, w, 0.5, bias, res)
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what="gemm bias+residual")


@pytest.mark.parametrize("m,k,n", [(512, 1152, 4304), (50, 1024, 4096)])
def test_gemm_gelu_epilogue(m, k, n, workspace):
    x, w, bias = rnd(m, k), rnd(n, k, scale=k**-0.5), rnd(n)
    out = poisoned(m, n)
    fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, workspace=workspace.data_ptr(),
            workspace_size=workspace.numel(), bias=bias.data_ptr(), epilogue="gelu_tanh", stream=stream())
    ref = gemm_ref(x, w, bias=bias, gelu=True)
    check(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2, what="gemm gelu epilogue")


@pytest.mark.parametrize("m,k,n", [(968, 2048, 2560), (968, 16384, 2048), (50, 1024, 4096), (512, 1152, 4304),
                                   (16, 64, 32)])
def test_gemm_fp8_per_tensor_scales(m, k, n, workspace):
    if E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    xs, ws = 0.02, 0.003
    x8 = fp8_ref(rnd(m, k, scale=3.0), xs)
    w8 = fp8_ref(rnd(n, k, scale=0.5), ws)
    bias = rnd(n)
    out = poisoned(m, n)
    fk.gemm(x8.data_ptr(), w8.data_ptr(), out.data_ptr(), m, n, k, dtype="fp8", workspace=workspace.data_ptr(),
            workspace_size=workspace.numel(), x_scale=scalar(xs).data_ptr(), w_scale=scalar(ws).data_ptr(),
            bias=bias.data_ptr(), alpha=2.0, stream=stream())
    ref = gemm_ref(x8.double() * xs, w8.double() * ws, 2.0, bias)
    check_rel(out, ref, rel=5e-3, what="gemm fp8")
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what="gemm fp8")


@pytest.mark.parametrize("m,k,n,dtype", [(512, 4304, 1152, "bf16"), (577, 16384, 2048, "fp8"),
                                         (50, 4096, 1024, "fp8"), (7, 72, 136, "bf16")])
def test_gemm_autotune_5_in_place_residual_and_log(m, k, n, dtype, workspace, capfd, monkeypatch):
    """Whichever of up to 32 candidates level 5 picks is exact with the residual in place, on the
    first call and again from the plan cache, and FLASHRT_GEMM_TUNE_LOG reports the shape's timing."""
    if dtype == "fp8" and E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    monkeypatch.setenv("FLASHRT_GEMM_TUNE_LOG", "1")
    fk.gemm_cache_clear()
    x, w, res = rnd(m, k), rnd(n, k, scale=k**-0.5), rnd(m, n)
    xs, ws = 1.0, 1.0
    if dtype == "fp8":
        xs, ws = 0.02, 0.003
        x, w = fp8_ref(x * 3.0, xs), fp8_ref(w * 0.5 * k**0.5, ws)
    scales = dict(x_scale=scalar(xs).data_ptr(), w_scale=scalar(ws).data_ptr()) if dtype == "fp8" else {}
    out = res.clone()
    fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, dtype=dtype, workspace=workspace.data_ptr(),
            workspace_size=workspace.numel(), residual=out.data_ptr(), autotune=5, stream=stream(), **scales)
    ref = gemm_ref(x.double() * xs, w.double() * ws, residual=res)
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what=f"gemm autotune 5 {dtype} in place")
    for _ in range(3):  # the cached plan, called again on a fresh copy of the residual
        out.copy_(res)
        fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, dtype=dtype, workspace=workspace.data_ptr(),
                workspace_size=workspace.numel(), residual=out.data_ptr(), autotune=5, stream=stream(), **scales)
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what=f"gemm autotune 5 {dtype} replayed")
    torch.cuda.synchronize()
    log = capfd.readouterr().err
    assert f"m={m} n={n} k={k} {dtype} autotune 5" in log, log
    print(log.strip())


@pytest.mark.parametrize("level", [0, 3, 5])
def test_gemm_autotune_levels_and_cache(level, workspace):
    fk.gemm_cache_clear()
    m, k, n = 512, 1152, 4304
    x, w, res = rnd(m, k), rnd(n, k, scale=k**-0.5), rnd(m, n)
    out = res.clone()  # in-place residual: tuning must not run the candidates into `out`
    fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, workspace=workspace.data_ptr(),
            workspace_size=workspace.numel(), residual=out.data_ptr(), autotune=level, stream=stream())
    ref = gemm_ref(x, w, residual=res)
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what=f"gemm autotune {level}")
    assert fk.gemm_cache_size() == 1
    out2 = poisoned(m, n)
    fk.gemm(x.data_ptr(), w.data_ptr(), out2.data_ptr(), m, n, k, workspace=workspace.data_ptr(),
            workspace_size=workspace.numel(), autotune=level, stream=stream())
    check(out2, gemm_ref(x, w), atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what="gemm second plan")
    assert fk.gemm_cache_size() == 2


def test_gemm_inside_cuda_graph(workspace):
    m, k, n = 50, 1024, 4096
    x, w = rnd(m, k), rnd(n, k, scale=k**-0.5)
    out = poisoned(m, n)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # plan + tuning outside the capture
        fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, workspace=workspace.data_ptr(),
                workspace_size=workspace.numel(), autotune=3, stream=s.cuda_stream)
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        fk.gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, workspace=workspace.data_ptr(),
                workspace_size=workspace.numel(), autotune=3, stream=s.cuda_stream)
    x.copy_(rnd(m, k))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = gemm_ref(x, w)
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what="gemm graph replay")


# ------------------------------------------------------------------------------------------------
# skinny GEMM

SKINNY_SHAPES = [(50, 1024, 4096), (50, 4096, 1024), (50, 1024, 2048), (50, 1024, 2560), (51, 2048, 1024),
                 (1, 64, 72), (7, 200, 136), (16, 1000, 520), (17, 512, 300), (64, 2048, 4104), (33, 8, 130),
                 (64, 16384, 64)]


@pytest.mark.parametrize("m,k,n", SKINNY_SHAPES)
def test_skinny_gemm(m, k, n):
    x, w = rnd(m, k), rnd(n, k, scale=k**-0.5)
    out = poisoned(m, n)
    fk.skinny_gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, stream=stream())
    ref = gemm_ref(x, w)
    check_rel(out, ref, rel=5e-3, what="skinny")
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what="skinny")


@pytest.mark.parametrize("split", [1, 2, 4, 8, 16])
def test_skinny_gemm_every_split_with_bias_and_inplace_residual(split):
    cap = torch.cuda.get_device_capability()
    if split > 1 and cap[0] < 9:
        pytest.skip("cluster split-K needs sm_90+")
    m, k, n = 50, 4096, 1024
    x, w, bias, res = rnd(m, k), rnd(n, k, scale=k**-0.5), rnd(n), rnd(m, n)
    out = res.clone()
    fk.skinny_gemm(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, bias=bias.data_ptr(),
                   residual=out.data_ptr(), alpha=0.25, split=split, stream=stream())
    ref = gemm_ref(x, w, 0.25, bias, res)
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what=f"skinny split {split}")


@pytest.mark.parametrize("m,k,n", [(50, 1024, 4096), (50, 4096, 1024), (50, 1024, 2048), (51, 2048, 2560),
                                   (64, 2048, 520), (7, 256, 136), (16, 1008, 72), (1, 16, 8)])
def test_skinny_gemm_fp8(m, k, n):
    if E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 tensor cores need sm_89+")
    xs, ws = 0.02, 0.004
    x8, w8 = fp8_ref(rnd(m, k, scale=3.0), xs), fp8_ref(rnd(n, k, scale=0.5), ws)
    bias, res = rnd(n), rnd(m, n)
    out = res.clone()
    fk.skinny_gemm(x8.data_ptr(), w8.data_ptr(), out.data_ptr(), m, n, k, dtype="fp8",
                   x_scale=scalar(xs).data_ptr(), w_scale=scalar(ws).data_ptr(), bias=bias.data_ptr(),
                   residual=out.data_ptr(), alpha=1.5, stream=stream())
    ref = gemm_ref(x8.double() * xs, w8.double() * ws, 1.5, bias, res)
    check_rel(out, ref, rel=5e-3, what="skinny fp8")
    check(out, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2, what="skinny fp8")


@pytest.mark.parametrize("graph", [False, True])
def test_skinny_gemm_chain_with_programmatic_dependent_launch(graph):
    """Each GEMM reads the previous one's output (and one input a torch kernel just rewrote): the
    weight prefetch before the grid-dependency wait must never let x / residual be read early."""
    m, dims = 50, [1024, 4096, 1024, 2048, 1024]
    x = rnd(m, dims[0])
    ws = [rnd(dims[i + 1], dims[i], scale=dims[i] ** -0.5) for i in range(len(dims) - 1)]
    res = rnd(m, dims[-1])

    def run(pdl, outs, s):
        cur = x
        for i, w in enumerate(ws):
            last = i == len(ws) - 1
            if last:
                outs[i].copy_(res)  # a torch kernel writes the residual right before the GEMM reads it
            fk.skinny_gemm(cur.data_ptr(), w.data_ptr(), outs[i].data_ptr(), m, w.shape[0], w.shape[1],
                           residual=outs[i].data_ptr() if last else 0, pdl=pdl, stream=s)
            if i == 1:
                outs[i].mul_(0.5)  # torch rewrites an intermediate the next GEMM reads
            cur = outs[i]

    results = {}
    for pdl in (False, True):
        outs = [poisoned(m, w.shape[0]) for w in ws]
        if graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                run(pdl, outs, s.cuda_stream)  # warm-up (device facts, attributes)
            s.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                run(pdl, outs, s.cuda_stream)
            for o in outs:
                o.fill_(float("nan"))
            g.replay()
        else:
            run(pdl, outs, stream())
        torch.cuda.synchronize()
        results[pdl] = outs
    for a, b in zip(results[False], results[True], strict=True):
        assert torch.equal(a, b), "PDL changed a result: an input was read before its producer finished"
    ref = x.double()
    for i, w in enumerate(ws):
        ref = ref @ w.double().T
        if i == 1:
            ref = ref * 0.5
        ref = ref.to(BF16).double()  # the chain stores bf16 between GEMMs
    ref = ref + res.double()
    check(results[True][-1], ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2, what="skinny chain")


def test_skinny_gemm_is_deterministic_and_graph_capturable():
    m, k, n = 50, 1024, 4096
    x, w = rnd(m, k), rnd(n, k, scale=k**-0.5)
    a, b = poisoned(m, n), poisoned(m, n)
    fk.skinny_gemm(x.data_ptr(), w.data_ptr(), a.data_ptr(), m, n, k, stream=stream())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        fk.skinny_gemm(x.data_ptr(), w.data_ptr(), b.data_ptr(), m, n, k, stream=s.cuda_stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Skinny GEMM with fused epilogues (GeGLU, RoPE + KV cache), the fp32 small linear


def _fp8_operands(x, w):
    """x and w as E4M3 at static scales (x at 0.01, w at its max / 448), their scales, and the
    kernels' x_scale / w_scale arguments: the fused-epilogue tests' FP8 case."""
    xs, ws = 0.01, float(w.float().abs().max()) / 448
    args = dict(x_scale=scalar(xs).data_ptr(), w_scale=scalar(ws).data_ptr())
    return fp8_ref(x.float(), xs), fp8_ref(w.float(), ws), xs, ws, args


@pytest.mark.parametrize("m,k,inter", [(50, 1024, 4096), (51, 1024, 4096), (7, 256, 136), (64, 512, 520)])
@pytest.mark.parametrize("dtype,out_fp8", [("bf16", False), ("fp8", False), ("fp8", True)])
def test_skinny_gemm_geglu(m, k, inter, dtype, out_fp8):
    if dtype == "fp8" and (E4M3 is None or torch.cuda.get_device_capability() < (8, 9)):
        pytest.skip("E4M3 needs torch float8 and sm_89+")
    gate_up, bias = rnd(2 * inter, k, scale=k**-0.5), rnd(2 * inter, scale=0.1)
    order = torch.tensor(fk.geglu_row_order(inter), device=DEV)
    w, b = gate_up[order].contiguous(), bias[order].contiguous()
    x = rnd(m, k)
    args = {}
    if dtype == "fp8":
        x, w, xs, ws, args = _fp8_operands(x, w)
        x_ref, w_ref = x.double() * xs, w.double() * ws
    else:
        x_ref, w_ref = x, w
    y = gemm_ref(x_ref, w_ref, bias=b)[:, torch.argsort(order)]  # natural [gate | up] columns
    ref = gelu_tanh_ref(y[:, :inter]) * y[:, inter:]
    out_scale = float(ref.abs().max()) / 448
    out = poisoned(m, inter, dtype=E4M3 if out_fp8 else BF16)
    fk.skinny_gemm_geglu(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, 2 * inter, k, bias=b.data_ptr(),
                         dtype=dtype, out_scale=scalar(out_scale).data_ptr() if out_fp8 else 0, stream=stream(),
                         **args)
    if out_fp8:
        check_rel(out.float() * out_scale, ref, rel=5e-2, what="skinny geglu fp8 out")
    else:
        check_rel(out, ref, rel=1e-2, what=f"skinny geglu {dtype}")
        check(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2, what=f"skinny geglu {dtype}")


@pytest.mark.parametrize("m,k,hq,hkv,d,offset", [(50, 1024, 8, 1, 256, 577), (1, 1024, 8, 1, 256, 600),
                                                 (13, 256, 4, 2, 64, 3), (9, 128, 2, 1, 72, 0)])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("given_positions", [True, False])
def test_skinny_gemm_rope_qkv(m, k, hq, hkv, d, offset, dtype, given_positions):
    """given_positions False: positions 0, row i at position offset + i (the pipeline's call)."""
    if dtype == "fp8" and (E4M3 is None or torch.cuda.get_device_capability() < (8, 9)):
        pytest.skip("E4M3 needs torch float8 and sm_89+")
    n = (hq + 2 * hkv) * d
    w_nat = rnd(n, k, scale=k**-0.5)
    order = torch.tensor(fk.rope_row_order(hq, hkv, d), device=DEV)
    w = w_nat[order].contiguous()
    x = rnd(m, k)
    args = {}
    if dtype == "fp8":
        x, w, xs, ws, args = _fp8_operands(x, w)
        qkv = gemm_ref(x.double() * xs, w.double()[torch.argsort(order)] * ws)
    else:
        qkv = gemm_ref(x, w_nat)
    if given_positions:
        positions = torch.randint(0, 1100, (m,), device=DEV, dtype=torch.int32)
    else:
        positions = torch.arange(offset, offset + m, device=DEV, dtype=torch.int32)
    rows = offset + m + 3
    q_out = poisoned(m, hq, d)
    k_cache, v_cache = rnd(rows, hkv, d), rnd(rows, hkv, d)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    fk.skinny_gemm_rope_qkv(x.data_ptr(), w.data_ptr(), positions.data_ptr() if given_positions else 0,
                            q_out.data_ptr(), k_cache.data_ptr(),
                            v_cache.data_ptr(), m, k, hq, hkv, d, cache_offset=offset, dtype=dtype, stream=stream(),
                            **args)
    q, kk, v = qkv.view(m, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
    sl = slice(offset, offset + m)
    check(q_out, rope_ref(q, positions), atol=2e-2, rtol=2e-2, what=f"fused rope q {dtype}")
    check(k_cache[sl], rope_ref(kk, positions), atol=2e-2, rtol=2e-2, what=f"fused rope k {dtype}")
    check(v_cache[sl], v, atol=2e-2, rtol=2e-2, what=f"fused v {dtype}")
    outside = torch.ones(rows, dtype=torch.bool)
    outside[sl] = False
    assert torch.equal(k_cache[outside], k_before[outside]) and torch.equal(v_cache[outside], v_before[outside]), \
        "cache rows outside [offset, offset + m) must be untouched"


# the action in / out projections; one row; K at the column path's limit (64) with a partial
# column block; a warp-path K that is no multiple of 32; K past the 1024 held in registers
@pytest.mark.parametrize("m,k,n", [(50, 32, 1024), (50, 1024, 32), (1, 32, 1024), (5, 7, 3), (7, 64, 130),
                                   (50, 100, 17), (3, 1500, 5)])
@pytest.mark.parametrize("x_dtype,out_dtype,accumulate", [("fp32", "fp32", False), ("bf16", "fp32", True),
                                                          ("fp32", "bf16", False), ("bf16", "bf16", True)])
def test_small_linear(m, k, n, x_dtype, out_dtype, accumulate):
    dt = {"fp32": torch.float32, "bf16": BF16}
    x = rnd(m, k, dtype=dt[x_dtype])
    w, b = rnd(n, k, dtype=torch.float32, scale=k**-0.5), rnd(n, dtype=torch.float32)
    start = rnd(m, n, dtype=dt[out_dtype])
    out = start.clone() if accumulate else poisoned(m, n, dtype=dt[out_dtype])
    fk.small_linear(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, bias=b.data_ptr(), x_dtype=x_dtype,
                    out_dtype=out_dtype, accumulate=accumulate, stream=stream())
    ref = gemm_ref(x, w, bias=b) + (start.double() if accumulate else 0.0)
    tol = 1e-5 if out_dtype == "fp32" else 1e-2
    check(out, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol, what="small linear")
