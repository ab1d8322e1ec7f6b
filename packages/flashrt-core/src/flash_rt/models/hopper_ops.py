"""The ops the Hopper pipeline is built from, behind one small interface.

The interface is shaped by the fusions a GPU wants, not by torch: a norm also adds the pending
residual (``y``, optionally gated) and emits its output in the format the next GEMM reads (FP8 at
that GEMM's static activation scale, or the activation dtype); RoPE splits a fused QKV row, rotates
q and k and writes k / v straight into the KV cache; a GEMM may apply GELU and quantise for the GEMM
after it; ``linear_rope_qkv`` / ``linear_geglu`` are a GEMM and the op that reads its output, which
the compiled kernels run as one kernel (the expert's weight rows are then ordered for it, see
``Linear.row_order``). Two implementations:

* ``TorchOps`` - plain PyTorch: cuBLAS (``F.linear``), ``torch._scaled_mm`` for FP8 E4M3 with
  per-tensor scales, SDPA, elementwise torch for the rest. Its residual stream is fp32. The same
  code runs on the CPU in fp32, which is how the pipeline's logic is tested against the reference;
  there an FP8 GEMM multiplies the E4M3 values widened to fp32 (every product and the fp32 sum as
  ``_scaled_mm`` forms them: torch 2.13's CPU ``_scaled_mm`` ran at 0.04 GFLOP/s on a Xeon with
  AVX512-FP16, which kept a 1-minute CPU test running for over half an hour).
* ``KernelOps`` (hopper_kernel_ops.py) - the compiled ``flashrt_kernels`` (fused norms with
  FP8 out, RoPE + KV write, skinny GEMM for M <= 64, FA2-style attention); bf16 residual stream.

``default_ops`` picks one; the pipeline never calls torch for compute except through an ops object.
An FP8 ``Linear`` keeps its static input scale in a device tensor, so calibration updates it in place
and every captured graph sees the new value.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    ``row_order`` (None: natural): the weight's rows were permuted for a fused GEMM epilogue
    (``"geglu"``: gate / up interleaved; ``"rope"``: RoPE pairs adjacent in q / k heads); its output
    columns come out in that order and ``inverse_order`` restores the natural one.
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    act_scale: torch.Tensor | None = None
    inv_act_scale: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    row_order: str | None = None
    inverse_order: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.weight_scale is not None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class Modulation:
    """adaRMS of one norm at one denoise step: y = rms(x) * (1 + scale) + shift, residual gate.
    fp32 for TorchOps, bf16 copies for the kernels (views into precomputed tables)."""

    one_plus_scale: torch.Tensor
    shift: torch.Tensor
    scale_bf16: torch.Tensor
    shift_bf16: torch.Tensor


@dataclass
class Gate:
    """The gate of a gated residual (x += y * gate), fp32 and bf16."""

    f32: torch.Tensor
    bf16: torch.Tensor


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


def geglu_row_order(inter: int) -> torch.Tensor:
    """Rows of a fused [gate; up] weight (2 * inter rows) interleaved: gate_0, up_0, gate_1, ..."""
    return torch.stack([torch.arange(inter), torch.arange(inter) + inter], dim=1).reshape(-1)


def rope_row_order(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a fused [q; k; v] weight with each q and k head's RoPE pairs (i, i + D/2) adjacent;
    v heads unchanged."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    heads = [h * head_dim + within for h in range(num_heads + num_kv_heads)]
    first_v = (num_heads + num_kv_heads) * head_dim
    return torch.cat([*heads, torch.arange(first_v, first_v + num_kv_heads * head_dim)])


def reorder_rows(weight, bias, order: torch.Tensor):
    """A fp32 weight (N, K) and bias with rows in ``order`` (new row r = old row order[r])."""
    order = order.to(weight.device)
    return weight[order].contiguous(), (None if bias is None else bias[order].contiguous())


def _rms(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps), in x's dtype (fp32 here); torch's fused op where it has one."""
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


class TorchOps:
    """Pure-torch implementations. ``calibrating`` switches FP8 linears to a dequantised path
    that records each GEMM input's amax (eager only, never captured)."""

    name = "torch"
    residual_dtype = torch.float32
    fallback_reason = None  # why the compiled kernels are not in use, when they were wanted
    autotune = 0
    fused_epilogues = False  # True: the pipeline orders the expert's rows for fused GEMM epilogues

    def __init__(self, act_dtype: torch.dtype):
        self.act_dtype = act_dtype
        self.calibrating = False

    # formats -------------------------------------------------------------------------------------
    def to_input_of(self, h: torch.Tensor, lin: Linear | None) -> torch.Tensor:
        """h (any float dtype) in the format ``lin`` reads: E4M3 at its act scale, else act_dtype."""
        if lin is not None and lin.fp8:
            if self.calibrating:
                h = h.to(self.act_dtype)
                lin.amax.copy_(torch.maximum(lin.amax, h.detach().abs().amax().float()))
                return h
            return (h.float() * lin.inv_act_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return h.to(self.act_dtype) if lin is None or lin.weight.dtype != torch.float32 else h.float()

    # GEMMs -----------------------------------------------------------------------------------
    def linear(self, h: torch.Tensor, lin: Linear, *, act: str | None = None, out_for: Linear | None = None,
               out: torch.Tensor | None = None, accumulate: bool = False):
        """h @ W^T + b (h in any format; quantised here when lin is FP8 and h is not), then
        optionally GELU-tanh, returned in the format ``out_for`` reads (default act_dtype).
        ``out``: written there (``accumulate``: added to it) and returned."""
        result = self._linear(h, lin, act=act, out_for=out_for)
        if out is None:
            return result
        if accumulate:
            out.add_(result)
        else:
            out.copy_(result)
        return out

    def _linear(self, h, lin, *, act=None, out_for=None):
        if lin.fp8 and h.dtype != torch.float8_e4m3fn:
            h = self.to_input_of(h, lin)
        elif not lin.fp8 and h.dtype != lin.weight.dtype:
            h = h.to(lin.weight.dtype)
        if not lin.fp8:
            out = F.linear(h, lin.weight, lin.bias)
        elif self.calibrating:
            w = lin.weight.to(self.act_dtype) * lin.weight_scale.to(self.act_dtype)
            out = F.linear(h, w, lin.bias)
        elif h.device.type == "cpu":
            out = F.linear(h.float(), lin.weight.float()) * (lin.act_scale * lin.weight_scale)
            out = (out if lin.bias is None else out + lin.bias.float()).to(self.act_dtype)
        else:
            out = torch._scaled_mm(
                h, lin.weight.t(), scale_a=lin.act_scale, scale_b=lin.weight_scale, bias=lin.bias,
                out_dtype=self.act_dtype,
            )
        if act == "gelu_tanh":
            out = F.gelu(out, approximate="tanh")
        return out if out_for is None else self.to_input_of(out, out_for)

    def natural_columns(self, out: torch.Tensor, lin: Linear) -> torch.Tensor:
        """``out`` of ``lin`` with its columns back in the natural order (see Linear.row_order)."""
        return out if lin.row_order is None else out.index_select(-1, lin.inverse_order)

    def linear_geglu(self, h, lin: Linear, *, out_for: Linear | None = None):
        """geglu(h @ W^T) for a fused [gate | up] ``lin`` (any row order), in ``out_for``'s format."""
        return self.geglu(self.natural_columns(self.linear(h, lin), lin), out_for=out_for)

    def linear_rope_qkv(self, h, lin: Linear, **rope):
        """rope_qkv(h @ W^T) for a fused q|k|v ``lin`` (any row order); returns q (T, H, D)."""
        return self.rope_qkv(self.natural_columns(self.linear(h, lin), lin), **rope)

    # norms -------------------------------------------------------------------------------------
    def _residual(self, x, y, gate):
        if y is not None:
            if gate is None:
                x.add_(y)
            else:
                x.addcmul_(y, gate.f32)

    def rms_norm(self, x, *, lin, y=None, gate=None, mod: Modulation | None = None):
        """x += y (* gate) in place; rms(x) [* (1 + s) + t] in the format ``lin`` reads. The Gemma
        (1 + w) weight is folded into lin's weights; adaRMS has none."""
        self._residual(x, y, gate)
        normed = _rms(x.float())
        if mod is not None:
            normed = torch.addcmul(mod.shift, normed, mod.one_plus_scale)
        return self.to_input_of(normed, lin)

    def layer_norm(self, x, *, lin, y=None):
        """x += y; LayerNorm without affine (SigLIP's gamma / beta are folded into lin)."""
        self._residual(x, y, None)
        return self.to_input_of(F.layer_norm(x.float(), (x.shape[-1],), eps=LAYER_NORM_EPS), lin)

    # activations ---------------------------------------------------------------------------------
    def geglu(self, gate_up: torch.Tensor, *, out_for: Linear | None = None) -> torch.Tensor:
        """gelu_tanh(gate) * up for a fused [gate | up] GEMM output."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.to_input_of(F.gelu(gate, approximate="tanh") * up, out_for)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    # attention -----------------------------------------------------------------------------------
    def rope_qkv(self, qkv, *, num_heads, k_cache, v_cache, start, cos, sin):
        """Split a fused q|k|v (T, (H + 2 Hkv) D), rotate q and k (split-half RoPE), write k / v into
        the caches (rows, Hkv, D) at rows [start, start + T); returns q (T, H, D). Token t sits at
        position start + t: cos / sin (T, D/2) are rows [start, start + T) of the RoPE tables."""
        t = qkv.shape[0]
        hkv, hd = k_cache.shape[1], k_cache.shape[2]
        # q and k heads rotate together: one pass over (T, H + Hkv, D) instead of two
        qk = self._rope(qkv[:, : (num_heads + hkv) * hd].view(t, num_heads + hkv, hd), cos, sin)
        k_cache[start : start + t].copy_(qk[:, num_heads:])
        v_cache[start : start + t].copy_(qkv[:, (num_heads + hkv) * hd :].view(t, hkv, hd))
        return qk[:, :num_heads]

    def _rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out_for: Linear | None = None,
                  static_keys: int = 0):
        """Unmasked attention of q (T, H, D) over k, v (S, Hkv, D); returns (T, H * D) (``out_for``:
        the GEMM that reads it; the kernels may return its input format, here act_dtype).
        ``static_keys``: keys [0, static_keys) were written before the previous op (a scheduling
        hint for the kernels; no effect on the result).

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

    def vision_attention(self, qkv: torch.Tensor, batch: int, tokens: int, heads: int) -> torch.Tensor:
        """SigLIP: independent images; qkv (B * T, 3 W) -> (B * T, W)."""
        width = qkv.shape[-1] // 3
        hd = width // heads
        q, k, v = qkv.view(batch, tokens, 3, heads, hd).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(batch * tokens, width)


def default_ops(device: torch.device, act_dtype: torch.dtype, which: str = "auto"):
    """The ops the pipeline uses on ``device``: "torch", "kernels", or "auto" (the compiled kernels
    on a CUDA device where ``flashrt_kernels`` imports and passes its self-check, else torch)."""
    import os  # noqa: PLC0415

    which = os.environ.get("FLASHRT_HOPPER_OPS", which) if which == "auto" else which
    if which not in ("auto", "torch", "kernels"):
        from flash_rt.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"ops must be 'auto', 'torch' or 'kernels' (env FLASHRT_HOPPER_OPS); got {which!r}")
    if which == "torch" or device.type != "cuda":
        return TorchOps(act_dtype)
    from flash_rt.models.hopper_kernel_ops import KernelOps, kernels_available  # noqa: PLC0415

    if which == "kernels":
        return KernelOps(act_dtype, device)
    ok, why = kernels_available(device)
    if ok:
        return KernelOps(act_dtype, device)
    ops = TorchOps(act_dtype)
    ops.fallback_reason = why  # reported by `flashrt bench` and the frontend
    return ops
