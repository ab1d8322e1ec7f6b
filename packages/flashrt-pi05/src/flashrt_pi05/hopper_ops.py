"""The ops the Hopper pipeline is built from, behind one small interface.

``TorchOps`` is plain PyTorch: cuBLAS GEMMs (``F.linear``), ``torch._scaled_mm`` for FP8 E4M3
with per-tensor scales, SDPA for attention, elementwise torch for norms / RoPE / GeGLU. The same
code runs on the CPU in fp32, which is how the pipeline's logic is tested against the reference
without a GPU. Swapping an op for a compiled kernel (``flashrt_kernels``) is one override in a
subclass; the pipeline never calls torch for compute except through an ``Ops`` object.

Conventions: the residual stream is fp32 (cheap: it is only read and written by norms and adds,
and it keeps 18 bf16 layers from drifting); GEMM inputs and outputs are ``act_dtype`` (bf16 on
the GPU, fp32 in CPU tests). An FP8 ``Linear`` quantises its input at a static per-tensor scale
held in a device tensor, so calibration updates the scale in place and a captured graph sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite float8_e4m3fn
RMS_EPS = 1e-6
LAYER_NORM_EPS = 1e-6


@dataclass
class Linear:
    """One prepared linear layer: weight (N, K) row-major, optional bias (N,).

    FP8: ``weight`` is float8_e4m3fn with ``weight_scale`` (fp32 scalar tensor) so that
    W ~= weight * weight_scale; ``act_scale`` / ``inv_act_scale`` are the static input scale,
    ``amax`` collects the input's absolute max while calibrating.
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    act_scale: torch.Tensor | None = None
    inv_act_scale: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    amax_history: list = field(default_factory=list)

    @property
    def fp8(self) -> bool:
        return self.weight_scale is not None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def make_linear(name, weight, bias, *, act_dtype, device, fp8: bool) -> Linear:
    """Cast (or quantise) a folded fp32 weight once, at load time."""
    weight = weight.to(device=device, dtype=torch.float32)
    n, k = weight.shape
    fp8 = fp8 and k % 16 == 0 and n % 16 == 0  # _scaled_mm's shape rule; small layers stay bf16
    if bias is not None:
        bias = bias.to(device=device, dtype=act_dtype).contiguous()
    if not fp8:
        return Linear(name, weight.to(act_dtype).contiguous(), bias)
    w_amax = weight.abs().amax().clamp_min(1e-12)
    w_scale = (w_amax / FP8_MAX).to(torch.float32)
    q = (weight / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
    one = torch.ones((), device=device, dtype=torch.float32)
    return Linear(
        name, q, bias, weight_scale=w_scale.reshape(()).contiguous(), act_scale=one.clone(),
        inv_act_scale=one.clone(), amax=torch.zeros((), device=device, dtype=torch.float32),
    )


class TorchOps:
    """Pure-torch implementations. ``calibrating`` switches FP8 linears to a dequantised
    bf16 path that records each input's amax (eager only, never captured)."""

    name = "torch"

    def __init__(self, act_dtype: torch.dtype):
        self.act_dtype = act_dtype
        self.calibrating = False

    # GEMMs -----------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        if not lin.fp8:
            return F.linear(x, lin.weight, lin.bias)
        if self.calibrating:
            lin.amax.copy_(torch.maximum(lin.amax, x.detach().abs().amax().float()))
            w = lin.weight.to(self.act_dtype) * lin.weight_scale.to(self.act_dtype)
            return F.linear(x, w, lin.bias)
        xq = self.quantize_fp8(x, lin.inv_act_scale)
        return torch._scaled_mm(
            xq, lin.weight.t(), scale_a=lin.act_scale, scale_b=lin.weight_scale, bias=lin.bias,
            out_dtype=self.act_dtype,
        )

    def quantize_fp8(self, x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
        return (x.float() * inv_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    # norms -------------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) in fp32; the (1 + w) weight is folded into the next GEMM."""
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(self.act_dtype)

    def ada_rms_norm(self, x: torch.Tensor, one_plus_scale: torch.Tensor, shift: torch.Tensor):
        x = x.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return torch.addcmul(shift, normed, one_plus_scale).to(self.act_dtype)

    def layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm without affine; SigLIP's gamma / beta are folded into the next GEMM."""
        return F.layer_norm(x.float(), (x.shape[-1],), eps=LAYER_NORM_EPS).to(self.act_dtype)

    # residuals -----------------------------------------------------------------------------------
    def add_residual(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x.add_(y)

    def add_gated_residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
        x.addcmul_(y, gate)

    # activations ---------------------------------------------------------------------------------
    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    def geglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(gate) * up for a fused [gate | up] GEMM output."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    # attention -----------------------------------------------------------------------------------
    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Split-half rotation of x (T, H, D) at the positions whose cos / sin (T, D/2) are given."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Unmasked attention of q (T, H, D) over k, v (S, Hkv, D); returns (T, H * D).

        With one KV head (Gemma's MQA) and no mask, every head attends to the same keys, so the
        H heads are just H * T queries of one head: no transposes, no GQA expansion."""
        t, h, d = q.shape
        s, hkv, _ = k.shape
        if hkv == 1:
            out = F.scaled_dot_product_attention(
                q.reshape(1, 1, t * h, d), k.reshape(1, 1, s, d), v.reshape(1, 1, s, d)
            )
            return out.reshape(t, h * d)
        qh, kh, vh = (a.transpose(0, 1).unsqueeze(0) for a in (q, k, v))
        if hkv != h:
            kh = kh.repeat_interleave(h // hkv, dim=1)
            vh = vh.repeat_interleave(h // hkv, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh)
        return out[0].transpose(0, 1).reshape(t, h * d)

    def batched_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SigLIP: independent images, (B, T, H, D) each; returns (B, T, H * D)."""
        b, t, h, d = q.shape
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, t, h * d)


def default_ops(device: torch.device, act_dtype: torch.dtype) -> TorchOps:
    """The ops the pipeline uses on ``device``. Compiled kernels plug in here when they land."""
    return TorchOps(act_dtype)
