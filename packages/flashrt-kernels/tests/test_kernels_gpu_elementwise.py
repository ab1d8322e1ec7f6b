"""GPU tests: norms, activations, FP8 quantisation against torch.

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
    F32,
    check,
    check_fp8,
    gelu_tanh_ref,
    poisoned,
    rnd,
    scalar,
    stream,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


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


def test_ada_rms_norm_params_written_by_the_kernels_just_before():
    """static_params=False: modulation vectors that the two previous kernels of the stream write
    (poisoned until then) are read only after they land, on every repetition."""
    rows, hidden = 50, 1024
    for _ in range(5):
        x, res, gate = rnd(rows, hidden), rnd(rows, hidden, scale=2.0), rnd(hidden)
        src_scale, src_shift = rnd(hidden, scale=0.3), rnd(hidden, scale=0.3)
        mscale, mshift = poisoned(hidden), poisoned(hidden)
        new_res = (res.float() + x.float() * gate.float()).to(BF16)
        ref = rms_ref(new_res, None, 0.0) * (1 + src_scale.float()) + src_shift.float()
        residual, out = res.clone(), poisoned(rows, hidden)
        fk.bias_act(src_scale.data_ptr(), 0, mscale.data_ptr(), 1, hidden, activation="none", stream=stream())
        fk.bias_act(src_shift.data_ptr(), 0, mshift.data_ptr(), 1, hidden, activation="none", stream=stream())
        fk.add_rms_norm(x.data_ptr(), residual.data_ptr(), 0, out.data_ptr(), rows, hidden, gate=gate.data_ptr(),
                        mod_scale=mscale.data_ptr(), mod_shift=mshift.data_ptr(), static_params=False,
                        stream=stream())
        check(out, ref, atol=2e-2, rtol=1e-2, what="ada rms, modulation written just before")


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
@pytest.mark.parametrize("interleaved", [False, True])
def test_geglu(rows, inter, fp8, interleaved):
    if fp8 and E4M3 is None:
        pytest.skip("torch has no float8_e4m3fn")
    gu = rnd(rows, 2 * inter, scale=2.0)
    gate, up = (gu[:, 0::2], gu[:, 1::2]) if interleaved else (gu[:, :inter], gu[:, inter:])
    ref = gelu_tanh_ref(gate) * up.double()
    scale = ref.abs().max().item() / 448.0
    out = poisoned(rows, inter, dtype=E4M3 if fp8 else BF16)
    fk.geglu(gu.data_ptr(), out.data_ptr(), rows, inter, out_scale=scalar(scale).data_ptr() if fp8 else 0,
             interleaved=interleaved, stream=stream())
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
