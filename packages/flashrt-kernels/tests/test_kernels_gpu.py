"""Every kernel against a plain-torch reference in fp32 / fp64, on the GPU.

Fresh random inputs per case (never zeros), outputs poisoned with NaN before the call and checked
fully written, true Pi0.5 / SigLIP / GR00T shapes plus odd sizes, explicit tolerances per dtype.
Ops get raw device addresses (tensor.data_ptr()) and the current stream.
"""

from __future__ import annotations

import math
import zlib

import pytest

torch = pytest.importorskip("torch")
fk = pytest.importorskip("flashrt_kernels", reason="flashrt_kernels is not installed")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BF16, F32 = torch.bfloat16, torch.float32
E4M3 = getattr(torch, "float8_e4m3fn", None)
DEV = "cuda"


# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reproducible seed per test case: inputs differ between cases, reruns match.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    torch.cuda.synchronize()  # surface asynchronous launch failures inside the test that caused them


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=F32) * scale).to(dtype)


def poisoned(*shape, dtype=BF16):
    if dtype == E4M3:
        return torch.full(shape, 0x7F, device=DEV, dtype=torch.uint8).view(E4M3)  # 0x7F is E4M3 NaN
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


def stream():
    return torch.cuda.current_stream().cuda_stream


def scalar(value):
    return torch.tensor([value], device=DEV, dtype=F32)


def check(out, ref, *, atol, rtol, what=""):
    torch.cuda.synchronize()
    out = out.float()
    assert not torch.isnan(out).any(), f"{what}: output has NaN (unwritten or bad) elements"
    ref = ref.float()
    err = (out - ref).abs()
    bound = atol + rtol * ref.abs()
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} / {out.numel()} elements out of tolerance; "
                             f"max err {err.max().item():.4g}; first at {idx}: out {out[tuple(idx)].item():.6g} "
                             f"ref {ref[tuple(idx)].item():.6g}")


def check_rel(out, ref, *, rel, what=""):
    torch.cuda.synchronize()
    assert not torch.isnan(out.float()).any(), f"{what}: output has NaN elements"
    r = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert r < rel, f"{what}: relative error {r:.3g} >= {rel}"


def fp8_ref(ref, scale):
    return (ref.float() / scale).clamp(-448.0, 448.0).to(E4M3)


def check_fp8(out, ref, scale, what=""):
    """E4M3 has 3 mantissa bits: allow one step of rounding either side of the fp32 reference."""
    assert E4M3 is not None
    torch.cuda.synchronize()
    deq = out.float() * scale
    assert not torch.isnan(deq).any(), f"{what}: FP8 output has NaN (unwritten) elements"
    expect = fp8_ref(ref, scale).float() * scale
    check(deq, expect, atol=scale * 2.0**-9 * 1.01, rtol=0.126, what=what + " (fp8)")


# ------------------------------------------------------------------------------------------------
# norms

NORM_SHAPES = [(968, 2048), (50, 1024), (512, 1152), (1, 64), (7, 136), (33, 4304), (3, 16384)]


def rms_ref(x, weight, offset, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y * (weight.float() + offset) if weight is not None else y


@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_rms_norm_gemma(rows, hidden, fp8):
    if fp8 and E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    x, w = rnd(rows, hidden, scale=3.0), rnd(hidden, scale=0.5)
    ref = rms_ref(x, w, 1.0)
    if fp8:
        scale = ref.abs().max().item() / 448.0 * 1.1
        out = poisoned(rows, hidden, dtype=E4M3)
        fk.rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, hidden, out_scale=scalar(scale).data_ptr(),
                    stream=stream())
        check_fp8(out, ref, scale, "rms_norm fp8")
    else:
        out = poisoned(rows, hidden)
        fk.rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, hidden, stream=stream())
        check(out, ref, atol=1e-2, rtol=1e-2, what="rms_norm")


def test_rms_norm_without_weight_and_plain_weight():
    rows, hidden = 50, 1024
    x, w = rnd(rows, hidden), rnd(hidden)
    out = poisoned(rows, hidden)
    fk.rms_norm(x.data_ptr(), 0, out.data_ptr(), rows, hidden, stream=stream())
    check(out, rms_ref(x, None, 0.0), atol=1e-2, rtol=1e-2, what="rms_norm no weight")
    out = poisoned(rows, hidden)
    fk.rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, hidden, weight_offset=0.0, eps=1e-5,
                stream=stream())
    check(out, rms_ref(x, w, 0.0, 1e-5), atol=1e-2, rtol=1e-2, what="rms_norm plain weight")


@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_add_rms_norm_writes_residual_and_norm(rows, hidden, fp8):
    if fp8 and E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    x, res, w = rnd(rows, hidden), rnd(rows, hidden, scale=4.0), rnd(hidden, scale=0.5)
    new_res = (res.float() + x.float()).to(BF16)
    ref = rms_ref(new_res, w, 1.0)
    residual = res.clone()
    scale = ref.abs().max().item() / 448.0
    out = poisoned(rows, hidden, dtype=E4M3 if fp8 else BF16)
    fk.add_rms_norm(x.data_ptr(), residual.data_ptr(), w.data_ptr(), out.data_ptr(), rows, hidden,
                    out_scale=scalar(scale).data_ptr() if fp8 else 0, stream=stream())
    check(residual, new_res, atol=0, rtol=0, what="add_rms_norm residual")
    if fp8:
        check_fp8(out, ref, scale, "add_rms_norm")
    else:
        check(out, ref, atol=1e-2, rtol=1e-2, what="add_rms_norm out")


@pytest.mark.parametrize("rows", [50, 1, 17])
def test_ada_rms_norm_with_gated_residual(rows):
    """Pi0.5 expert: residual += x * gate; out = rmsnorm(residual) * (1 + scale) + shift."""
    hidden = 1024
    x, res = rnd(rows, hidden), rnd(rows, hidden, scale=2.0)
    gate, mscale, mshift = rnd(hidden), rnd(hidden, scale=0.3), rnd(hidden, scale=0.3)
    new_res = (res.float() + x.float() * gate.float()).to(BF16)
    ref = rms_ref(new_res, None, 0.0) * (1 + mscale.float()) + mshift.float()
    residual = res.clone()
    out = poisoned(rows, hidden)
    fk.add_rms_norm(x.data_ptr(), residual.data_ptr(), 0, out.data_ptr(), rows, hidden, gate=gate.data_ptr(),
                    mod_scale=mscale.data_ptr(), mod_shift=mshift.data_ptr(), stream=stream())
    check(residual, new_res, atol=0, rtol=2.0**-7, what="gated residual")
    check(out, ref, atol=2e-2, rtol=1e-2, what="ada rms")


@pytest.mark.parametrize("rows,hidden", [(512, 1152), (256, 1152), (50, 1536), (5, 2048), (3, 72 * 8)])
@pytest.mark.parametrize("fp8", [False, True])
def test_layer_norm_siglip(rows, hidden, fp8):
    if fp8 and E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    x = rnd(rows, hidden, scale=2.0) + 0.7  # a non-zero mean exercises the centring
    w, b = rnd(hidden, scale=0.5), rnd(hidden, scale=0.5)
    ref = torch.nn.functional.layer_norm(x.float(), (hidden,), w.float(), b.float(), eps=1e-6)
    scale = ref.abs().max().item() / 448.0
    out = poisoned(rows, hidden, dtype=E4M3 if fp8 else BF16)
    fk.layer_norm(x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), rows, hidden,
                  out_scale=scalar(scale).data_ptr() if fp8 else 0, stream=stream())
    if fp8:
        check_fp8(out, ref, scale, "layer_norm")
    else:
        check(out, ref, atol=1e-2, rtol=1e-2, what="layer_norm")


def test_layer_norm_with_residual_and_no_affine():
    rows, hidden = 64, 1536  # GR00T DiT: LayerNorm without affine
    x, res = rnd(rows, hidden), rnd(rows, hidden)
    new_res = (res.float() + x.float()).to(BF16)
    ref = torch.nn.functional.layer_norm(new_res.float(), (hidden,), eps=1e-6)
    residual, out = res.clone(), poisoned(rows, hidden)
    fk.layer_norm(x.data_ptr(), 0, 0, out.data_ptr(), rows, hidden, residual=residual.data_ptr(), stream=stream())
    check(residual, new_res, atol=0, rtol=0, what="layer_norm residual")
    check(out, ref, atol=1e-2, rtol=1e-2, what="layer_norm no affine")


# ------------------------------------------------------------------------------------------------
# activations and quantisation


def gelu_tanh_ref(x):
    return torch.nn.functional.gelu(x.double(), approximate="tanh")


@pytest.mark.parametrize("rows,cols", [(512, 4304), (50, 4096), (968, 2048), (3, 8), (1, 1048)])
@pytest.mark.parametrize("activation", ["gelu_tanh", "silu", "relu", "none"])
def test_bias_act(rows, cols, activation):
    x, bias = rnd(rows, cols, scale=2.0), rnd(cols)
    pre = x.double() + bias.double()
    ref = {"gelu_tanh": gelu_tanh_ref(pre), "silu": torch.nn.functional.silu(pre),
           "relu": torch.relu(pre), "none": pre}[activation]
    out = poisoned(rows, cols)
    fk.bias_act(x.data_ptr(), bias.data_ptr(), out.data_ptr(), rows, cols, activation=activation, stream=stream())
    check(out, ref, atol=1e-2, rtol=1e-2, what=f"bias_act {activation}")


@pytest.mark.parametrize("n", [8, 1024 * 4096, 50 * 4304 + 8])
@pytest.mark.parametrize("fp8", [False, True])
def test_gelu_tanh(n, fp8):
    if fp8 and E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    x = rnd(n, scale=3.0)
    ref = gelu_tanh_ref(x)
    scale = ref.abs().max().item() / 448.0
    out = poisoned(n, dtype=E4M3 if fp8 else BF16)
    fk.gelu_tanh(x.data_ptr(), out.data_ptr(), n, out_scale=scalar(scale).data_ptr() if fp8 else 0, stream=stream())
    if fp8:
        check_fp8(out, ref, scale, "gelu fp8")
    else:
        check(out, ref, atol=1e-2, rtol=1e-2, what="gelu")


@pytest.mark.parametrize("rows,inter", [(968, 16384), (50, 4096), (7, 8), (33, 136)])
@pytest.mark.parametrize("fp8", [False, True])
def test_geglu(rows, inter, fp8):
    if fp8 and E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    gu = rnd(rows, 2 * inter, scale=2.0)
    ref = gelu_tanh_ref(gu[:, :inter]) * gu[:, inter:].double()
    scale = ref.abs().max().item() / 448.0
    out = poisoned(rows, inter, dtype=E4M3 if fp8 else BF16)
    fk.geglu(gu.data_ptr(), out.data_ptr(), rows, inter, out_scale=scalar(scale).data_ptr() if fp8 else 0,
             stream=stream())
    if fp8:
        check_fp8(out, ref, scale, "geglu fp8")
    else:
        check(out, ref, atol=2e-2, rtol=1e-2, what="geglu")


@pytest.mark.parametrize("n", [968 * 2048, 50 * 1024, 13, 8 * 1000 + 5])
def test_quantize_fp8_and_amax(n):
    if E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    x = rnd(n, scale=5.0)
    amax = poisoned(1, dtype=F32)
    fk.amax(x.data_ptr(), n, amax.data_ptr(), stream=stream())
    torch.cuda.synchronize()
    assert amax.item() == x.float().abs().max().item()
    scale = amax.item() / 448.0
    out = poisoned(n, dtype=E4M3)
    fk.quantize_fp8(x.data_ptr(), out.data_ptr(), n, scalar(scale).data_ptr(), stream=stream())
    check_fp8(out, x.float(), scale, "quantize_fp8")
    # accumulate keeps the running maximum across calls (calibration over many batches)
    running = scalar(1e6)
    fk.amax(x.data_ptr(), n, running.data_ptr(), accumulate=True, stream=stream())
    smaller = scalar(0.5)
    fk.amax(x.data_ptr(), n, smaller.data_ptr(), accumulate=True, stream=stream())
    torch.cuda.synchronize()
    assert running.item() == 1e6 and smaller.item() == x.float().abs().max().item()


def test_quantize_saturates_instead_of_nan():
    if E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    x = torch.tensor([1e4, -1e4, 3.0, -0.001, 447.0, 449.0, 0.5, 2.0], device=DEV, dtype=BF16)
    out = poisoned(8, dtype=E4M3)
    fk.quantize_fp8(x.data_ptr(), out.data_ptr(), 8, scalar(1.0).data_ptr(), stream=stream())
    torch.cuda.synchronize()
    got = out.float().cpu().tolist()
    assert got[0] == 448.0 and got[1] == -448.0 and got[2] == 3.0 and got[6] == 0.5


# ------------------------------------------------------------------------------------------------
# GEMM (cuBLASLt)

# (M, K, N): SigLIP qkv / mlp, Gemma-2B prefix qkv / gate_up / down, expert, GR00T, odd sizes
GEMM_SHAPES = [(512, 1152, 3456), (512, 1152, 4304), (512, 4304, 1152), (968, 2048, 2560), (968, 2048, 32768),
               (968, 16384, 2048), (50, 1024, 4096), (50, 4096, 1024), (64, 1536, 4608), (7, 72, 136),
               (1, 64, 16)]


@pytest.fixture(scope="module")
def workspace():
    return torch.empty(fk.GEMM_WORKSPACE_BYTES, device=DEV, dtype=torch.uint8)


def gemm_ref(x, w, alpha=1.0, bias=None, residual=None, beta=1.0, gelu=False):
    y = alpha * (x.double() @ w.double().T)
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = gelu_tanh_ref(y)
    if residual is not None:
        y = y + beta * residual.double()
    return y


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
# RoPE + QKV split + KV-cache write


def rope_ref(x, positions, theta=10000.0):
    """openpi's split-half RoPE in fp32: x [T, H, D], positions [T]."""
    d = x.shape[-1]
    freq_exponents = (2.0 / d) * torch.arange(d // 2, dtype=F32, device=x.device)
    timescale = theta**freq_exponents
    radians = positions.float()[:, None, None] / timescale[None, None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("tokens,hq,hkv,d,offset", [(968, 8, 1, 256, 0), (50, 8, 1, 256, 968), (200, 16, 8, 128, 5),
                                                    (13, 4, 4, 16, 3), (9, 3, 1, 72, 0), (1, 8, 1, 256, 1017)])
def test_rope_qkv_split_and_cache_write(tokens, hq, hkv, d, offset):
    qkv = rnd(tokens, (hq + 2 * hkv) * d)
    positions = torch.randint(0, 1100, (tokens,), device=DEV, dtype=torch.int32)
    rows = offset + tokens + 4
    q_out = poisoned(tokens, hq, d)
    k_cache, v_cache = rnd(rows, hkv, d), rnd(rows, hkv, d)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_scale = d**-0.5
    fk.rope_qkv(qkv.data_ptr(), positions.data_ptr(), q_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                tokens, hq, hkv, d, cache_offset=offset, q_scale=q_scale, stream=stream())
    q, k, v = qkv.view(tokens, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
    check(q_out, rope_ref(q, positions) * q_scale, atol=1e-2, rtol=1e-2, what="rope q")
    sl = slice(offset, offset + tokens)
    check(k_cache[sl], rope_ref(k, positions), atol=1e-2, rtol=1e-2, what="rope k")
    assert torch.equal(v_cache[sl], v), "v must be copied bit-exactly into the cache"
    outside = torch.ones(rows, dtype=torch.bool)
    outside[sl] = False
    assert torch.equal(k_cache[outside], k_before[outside]) and torch.equal(v_cache[outside], v_before[outside]), \
        "rows outside [offset, offset + tokens) must be untouched"


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

    rc = _C.skinny_gemm(0x1000, 0x2000, 0x3000, 0, 0, 1.0, 80, 64, 64, 0, False, 0, 0, 0)  # m > 64, C level
    assert rc == 1 and "invalid argument" in fk.error_string(rc)
    assert math.isfinite(float(fk.attention_num_splits(1, 50, 1018, 8, 1, 256)))
