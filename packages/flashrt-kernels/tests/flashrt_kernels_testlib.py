"""Shared helpers of the -m gpu kernel tests (torch only; imported by the test files)."""

from __future__ import annotations

import torch

BF16, F32 = torch.bfloat16, torch.float32
E4M3 = getattr(torch, "float8_e4m3fn", None)
DEV = "cuda"


# ------------------------------------------------------------------------------------------------
# helpers


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=F32) * scale).to(dtype)


def poisoned(*shape, dtype=BF16):
    if dtype == E4M3:
        return torch.full(shape, 0x7F, device=DEV, dtype=torch.uint8).view(E4M3)  # 0x7F is E4M3 NaN
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


def stream():
    return torch.cuda.current_stream().cuda_stream


_SCALARS_IN_FLIGHT = []


def scalar(value):
    """A device fp32 scalar for a kernel's scale pointer. Tests pass `scalar(x).data_ptr()` inline;
    without this reference the temporary is freed before the kernel runs and the next scalar can
    reuse its memory (two scales then read the same value), so keep every one alive."""
    tensor = torch.tensor([value], device=DEV, dtype=F32)
    _SCALARS_IN_FLIGHT.append(tensor)
    return tensor


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


def gelu_tanh_ref(x):
    return torch.nn.functional.gelu(x.double(), approximate="tanh")


def gemm_ref(x, w, alpha=1.0, bias=None, residual=None, beta=1.0, gelu=False):
    y = alpha * (x.double() @ w.double().T)
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = gelu_tanh_ref(y)
    if residual is not None:
        y = y + beta * residual.double()
    return y


def rope_ref(x, positions, theta=10000.0):
    """openpi's split-half RoPE in fp32: x [T, H, D], positions [T]."""
    d = x.shape[-1]
    freq_exponents = (2.0 / d) * torch.arange(d // 2, dtype=F32, device=x.device)
    timescale = theta**freq_exponents
    radians = positions.float()[:, None, None] / timescale[None, None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
