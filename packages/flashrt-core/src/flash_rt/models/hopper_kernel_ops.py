"""``KernelOps``: the Hopper pipeline's ops on the compiled ``flashrt_kernels``.

Same interface and semantics as ``TorchOps`` (hopper_ops.py), with the fusions the kernels offer:
residual add + (ada)RMSNorm / LayerNorm + FP8 quantisation in one pass, RoPE + QKV split + KV-cache
write in one pass, GeGLU with FP8 out, cuBLASLt GEMMs (bf16 / FP8, GELU epilogue, plan cache,
autotune) and the weight-streaming skinny GEMM for the expert's 50 rows, FA2-style attention with
split-KV for the suffix's few queries against the cached prefix. The residual stream is bf16 (the
kernels round it to bf16, as openpi's bf16 models do).

Everything the kernels do not cover (fp32 heads, odd sizes such as SigLIP's 588-wide patch GEMM,
the calibration pass) falls back to the torch implementation. ``kernels_available`` imports the
module, checks it was built for this GPU, and runs a self-check of every op against torch on
random data once per process: the pipeline uses the kernels only if all of that passes, so a
broken build costs speed, never correctness.
"""

from __future__ import annotations

import os
import time

import torch

from flash_rt.models.hopper_ops import TorchOps

WORKSPACE_BYTES = 32 << 20
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
SKINNY_MAX_M = 64
_CHECK: dict = {}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class KernelOps(TorchOps):
    name = "kernels"
    residual_dtype = torch.bfloat16
    fused_epilogues = True  # the pipeline orders the expert's qkv / gate_up rows for the fused GEMMs

    def __init__(self, act_dtype: torch.dtype, device: torch.device, autotune: int = 0):
        if act_dtype != torch.bfloat16:
            raise ValueError(f"KernelOps computes in bf16; got act_dtype {act_dtype}")
        super().__init__(act_dtype)
        import flashrt_kernels  # noqa: PLC0415

        self.fk = flashrt_kernels
        self.device = device
        self.autotune = autotune
        self.sdpa_allowed = os.environ.get("FLASHRT_ATTN_SDPA", "1") != "0"  # prefix / SigLIP may take torch SDPA
        # the decode attention copies its first cached-prefix K/V tiles before waiting for the QKV GEMM
        self.attn_prefetch = os.environ.get("FLASHRT_ATTN_PREFETCH", "1") != "0"
        raw = torch.empty(WORKSPACE_BYTES + 256, dtype=torch.uint8, device=device)
        self.workspace = raw[(-raw.data_ptr()) % 256 :][:WORKSPACE_BYTES]  # cuBLASLt wants 256-byte alignment
        lse, acc = flashrt_kernels.attention_splitkv_sizes(1, SKINNY_MAX_M, 16, 256)
        self.lse_accum = torch.empty(lse, dtype=torch.float32, device=device)
        self.o_accum = torch.empty(acc, dtype=torch.float32, device=device)
        self._choice: dict[tuple, bool] = {}  # _first_is_faster's measured choices
        self.gemm_choices: dict[tuple, dict[str, float]] = {}  # measured shapes, for the bench report

    @staticmethod
    def _stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    # formats -------------------------------------------------------------------------------------
    def to_input_of(self, h, lin):
        if self.calibrating or lin is None or not lin.fp8 or h.dtype != torch.bfloat16 or not h.is_contiguous():
            return super().to_input_of(h, lin)
        out = torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device)
        self.fk.quantize_fp8(h.data_ptr(), out.data_ptr(), h.numel(), lin.act_scale.data_ptr(), stream=self._stream())
        return out

    # GEMMs -----------------------------------------------------------------------------------
    def linear(self, h, lin, *, act=None, out_for=None, out=None, accumulate=False):
        if self._small_fp32_ok(h, lin, act, out_for, out):
            # the fp32 GEMMs beside the action state: one kernel, written (or added) in place
            m, n, k = h.shape[0], *lin.weight.shape
            if out is None:
                out = torch.empty((m, n), dtype=torch.float32, device=h.device)
            self.fk.small_linear(h.data_ptr(), lin.weight.data_ptr(), out.data_ptr(), m, n, k, bias=_ptr(lin.bias),
                                 x_dtype=_DTYPE_NAMES[h.dtype], out_dtype=_DTYPE_NAMES[out.dtype],
                                 accumulate=accumulate, stream=self._stream())
            return out
        return super().linear(h, lin, act=act, out_for=out_for, out=out, accumulate=accumulate)

    def _small_fp32_ok(self, h, lin, act, out_for, out) -> bool:
        return (not self.calibrating and lin.weight.dtype == torch.float32 and act is None and out_for is None
                and h.dim() == 2 and h.shape[0] <= SKINNY_MAX_M and h.is_contiguous() and h.dtype in _DTYPE_NAMES
                and (lin.bias is None or lin.bias.dtype == torch.float32)
                and (out is None or (out.is_contiguous() and out.dtype in _DTYPE_NAMES
                                     and out.shape == (h.shape[0], lin.weight.shape[0]))))

    def _kernel_gemm_ok(self, h, lin) -> bool:
        """Whether a compiled GEMM (cuBLASLt or skinny) takes h @ lin: not while calibrating, not
        for the fp32 GEMMs, 2-D inputs, and the sizes the E4M3 / bf16 kernels need."""
        n, k = lin.weight.shape
        mult = 16 if lin.fp8 else 8
        return not (self.calibrating or lin.weight.dtype == torch.float32 or h.dim() != 2 or k % mult or n % mult)

    def _linear(self, h, lin, *, act=None, out_for=None):
        if not self._kernel_gemm_ok(h, lin):
            return super()._linear(h, lin, act=act, out_for=out_for)
        h = self._operand(h, lin)
        m, (n, k) = h.shape[0], lin.weight.shape
        out = torch.empty((m, n), dtype=torch.bfloat16, device=h.device)

        def skinny():
            self.fk.skinny_gemm(h.data_ptr(), lin.weight.data_ptr(), out.data_ptr(), m, n, k, **self._operands(lin))

        def cublaslt():
            self._gemm_lt(h, lin, out, act=act)

        if m <= SKINNY_MAX_M and act is None and self._first_is_faster((m, n, k, _dtype(lin)), skinny, cublaslt):
            skinny()
        else:
            cublaslt()
        return out if out_for is None else self.to_input_of(out, out_for)

    def _gemm_lt(self, h, lin, out, act=None):
        m, (n, k) = h.shape[0], lin.weight.shape
        self.fk.gemm(h.data_ptr(), lin.weight.data_ptr(), out.data_ptr(), m, n, k, workspace=self.workspace.data_ptr(),
                     workspace_size=WORKSPACE_BYTES, epilogue="gelu_tanh" if act == "gelu_tanh" else "none",
                     autotune=self.autotune, **self._operands(lin))

    def _skinny_ready(self, h, lin) -> torch.Tensor | None:
        """h as the skinny GEMM's operand for ``lin`` (quantised for FP8), or None where that
        kernel does not apply (calibration, shapes, M > 64)."""
        if not self._kernel_gemm_ok(h, lin) or h.shape[0] > SKINNY_MAX_M:
            return None
        return self._operand(h, lin)

    def _operand(self, h, lin):
        """h in the format ``lin``'s GEMM reads (E4M3 at its act scale, or bf16), contiguous."""
        if lin.fp8 and h.dtype != torch.float8_e4m3fn:
            h = self.to_input_of(h, lin)
        elif not lin.fp8 and h.dtype != torch.bfloat16:
            h = h.to(torch.bfloat16)
        return h.contiguous()

    def _operands(self, lin):
        scales = dict(x_scale=_ptr(lin.act_scale), w_scale=_ptr(lin.weight_scale)) if lin.fp8 else {}
        return dict(bias=_ptr(lin.bias), dtype=_dtype(lin), stream=self._stream(), **scales)

    def linear_geglu(self, h, lin, *, out_for=None):
        """GEMM + GeGLU in one kernel where the weight rows are interleaved for it (expert layers)."""
        x = self._skinny_ready(h, lin) if lin.row_order == "geglu" else None
        if x is None:
            return super().linear_geglu(h, lin, out_for=out_for)
        (m, k), n = x.shape, lin.weight.shape[0]
        fp8_out = out_for is not None and out_for.fp8
        out = torch.empty((m, n // 2), dtype=torch.float8_e4m3fn if fp8_out else torch.bfloat16, device=x.device)
        out_scale = out_for.act_scale.data_ptr() if fp8_out else 0

        def fused():
            self.fk.skinny_gemm_geglu(x.data_ptr(), lin.weight.data_ptr(), out.data_ptr(), m, n, k,
                                      out_scale=out_scale, **self._operands(lin))

        def two_kernels():  # cuBLASLt on the same (interleaved) rows, then the interleaved GeGLU pass
            gate_up = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
            self._gemm_lt(x, lin, gate_up)
            self.fk.geglu(gate_up.data_ptr(), out.data_ptr(), m, n // 2, out_scale=out_scale, interleaved=True,
                          stream=self._stream())

        if self._first_is_faster((m, n, k, _dtype(lin), "geglu"), fused, two_kernels):
            fused()
        else:
            two_kernels()
        return out

    def linear_rope_qkv(self, h, lin, *, num_heads, k_cache, v_cache, start, cos, sin):
        """QKV GEMM + RoPE + KV-cache write in one kernel where the weight rows are ordered for it."""
        x = self._skinny_ready(h, lin) if lin.row_order == "rope" else None
        if x is None or k_cache.dtype != torch.bfloat16 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return super().linear_rope_qkv(h, lin, num_heads=num_heads, k_cache=k_cache, v_cache=v_cache, start=start,
                                           cos=cos, sin=sin)
        m, k = x.shape
        hkv, hd = k_cache.shape[1], k_cache.shape[2]
        q = torch.empty((m, num_heads, hd), dtype=torch.bfloat16, device=x.device)
        # positions 0: token t sits at position start + t, as the cos / sin rows of the torch path say
        self.fk.skinny_gemm_rope_qkv(x.data_ptr(), lin.weight.data_ptr(), 0, q.data_ptr(),
                                     k_cache.data_ptr(), v_cache.data_ptr(), m, k, num_heads, hkv, hd,
                                     cache_offset=start, **self._operands(lin))
        return q

    def _first_is_faster(self, shape, first, second, default=True, labels=("skinny_us", "cublaslt_us")) -> bool:
        """Whether ``first`` beats ``second`` at a shape: the skinny GEMM against cuBLASLt (for
        gate/up: the skinny GEMM with its GeGLU epilogue against cuBLASLt + the GeGLU pass), torch's
        SDPA against our prefix attention. Measured once per shape (autotune >= 3) on the real
        operands, outside graph capture; neither wins on every shape and card (H100, FP8: cuBLASLt
        won most expert shapes), so neither is assumed. Unmeasured (autotune < 3): ``default``;
        first met inside a capture: the second."""
        choice = self._choice.get(shape)
        if choice is not None:
            return choice
        if self.autotune < 3 or torch.cuda.is_current_stream_capturing():
            return self._choice.setdefault(shape, default and self.autotune < 3)
        times = [_median_us(fn) for fn in (first, second)]
        self._choice[shape] = times[0] <= times[1]
        self.gemm_choices[shape] = dict(zip(labels, times))  # for the bench / profile reports
        return self._choice[shape]

    # norms -------------------------------------------------------------------------------------
    def _norm_out(self, x, lin):
        fp8 = lin is not None and lin.fp8
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=x.device)
        return out, (lin.act_scale.data_ptr() if fp8 else 0)

    def _kernel_norm_ok(self, x, y):
        return (not self.calibrating and x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[-1] % 8 == 0
                and (y is None or (y.dtype == torch.bfloat16 and y.is_contiguous())))

    def rms_norm(self, x, *, lin, y=None, gate=None, mod=None):
        if not self._kernel_norm_ok(x, y):
            return super().rms_norm(x, lin=lin, y=y, gate=gate, mod=mod)
        out, out_scale = self._norm_out(x, lin)
        rows, hidden = x.shape
        common = dict(weight_offset=0.0, out_scale=out_scale, mod_scale=_ptr(mod.scale_bf16) if mod else 0,
                      mod_shift=_ptr(mod.shift_bf16) if mod else 0, stream=self._stream())
        if y is None:
            self.fk.rms_norm(x.data_ptr(), 0, out.data_ptr(), rows, hidden, **common)
        else:
            self.fk.add_rms_norm(y.data_ptr(), x.data_ptr(), 0, out.data_ptr(), rows, hidden,
                                 gate=_ptr(gate.bf16) if gate is not None else 0, **common)
        return out  # bf16 for an fp32 GEMM too: the fp32 small linear reads bf16 directly

    def layer_norm(self, x, *, lin, y=None):
        if not self._kernel_norm_ok(x, y):
            return super().layer_norm(x, lin=lin, y=y)
        out, out_scale = self._norm_out(x, lin)
        rows, hidden = x.shape
        if y is None:
            self.fk.layer_norm(x.data_ptr(), 0, 0, out.data_ptr(), rows, hidden, out_scale=out_scale,
                               stream=self._stream())
        else:
            self.fk.layer_norm(y.data_ptr(), 0, 0, out.data_ptr(), rows, hidden, out_scale=out_scale,
                               residual=x.data_ptr(), stream=self._stream())
        return out

    # activations ---------------------------------------------------------------------------------
    def geglu(self, gate_up, *, out_for=None):  # natural [gate | up] layout
        inter = gate_up.shape[-1] // 2
        if self.calibrating or gate_up.dtype != torch.bfloat16 or not gate_up.is_contiguous() or inter % 8:
            return super().geglu(gate_up, out_for=out_for)
        rows = gate_up.shape[0]
        fp8 = out_for is not None and out_for.fp8
        out = torch.empty((rows, inter), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=gate_up.device)
        self.fk.geglu(gate_up.data_ptr(), out.data_ptr(), rows, inter,
                      out_scale=out_for.act_scale.data_ptr() if fp8 else 0, stream=self._stream())
        return out

    # attention -----------------------------------------------------------------------------------
    def rope_qkv(self, qkv, *, num_heads, k_cache, v_cache, start, cos, sin):
        if self.calibrating or qkv.dtype != torch.bfloat16 or not qkv.is_contiguous():
            return super().rope_qkv(qkv, num_heads=num_heads, k_cache=k_cache, v_cache=v_cache, start=start,
                                    cos=cos, sin=sin)
        t = qkv.shape[0]
        hkv, hd = k_cache.shape[1], k_cache.shape[2]
        q = torch.empty((t, num_heads, hd), dtype=torch.bfloat16, device=qkv.device)
        self.fk.rope_qkv(qkv.data_ptr(), 0, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         t, num_heads, hkv, hd, cache_offset=start, stream=self._stream())
        return q

    def attention(self, q, k, v, *, out_for=None, static_keys=0):
        if self.calibrating or q.dtype != torch.bfloat16 or q.shape[-1] not in (64, 72, 128, 256):
            return super().attention(q, k, v, out_for=out_for)
        t, h, d = q.shape
        s, hkv, _ = k.shape
        fp8_out = out_for is not None and out_for.fp8  # written as the FP8 GEMM's input: no quantise pass
        out_shape = (t, h * d)
        split = t <= SKINNY_MAX_M and h <= 16  # few queries against a long cache: split the keys
        folded = hkv == 1 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        if folded:
            # MQA: every query head reads the same K/V, so fold the heads into rows ([t, h, d] is
            # [t * h, 1, d] in memory). One pass over K/V serves all heads instead of one per head.
            t, h = t * h, 1

        def ours():
            out = torch.empty(out_shape, dtype=torch.float8_e4m3fn if fp8_out else torch.bfloat16, device=q.device)
            self.fk.attention(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch=1, seqlen_q=t, seqlen_k=s,
                num_heads_q=h, num_heads_kv=hkv, head_dim=d, q_strides=(t * h * d, h * d, d),
                k_strides=(s * hkv * d, hkv * d, d), v_strides=(s * hkv * d, hkv * d, d),
                o_strides=(t * h * d, h * d, d), softmax_scale=d**-0.5, dtype="bf16",
                lse_accum=self.lse_accum.data_ptr() if split else 0, o_accum=self.o_accum.data_ptr() if split else 0,
                num_splits=0 if split else 1, out_scale=out_for.act_scale.data_ptr() if fp8_out else 0,
                static_keys=static_keys if self.attn_prefetch else 0, stream=self._stream(),
            )
            return out

        def sdpa():  # the folded layout is one head of t * h queries: no transposes, no K/V expansion
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

            # cuDNN first: on the H100 it beats torch's flash kernel ~2x at head_dim 256 (BENCH.md)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
                o = torch.nn.functional.scaled_dot_product_attention(
                    q.view(1, 1, t, d), k.view(1, 1, s, d), v.view(1, 1, s, d))
            return o.view(out_shape)

        # The prefix (hundreds of queries, bf16 out): torch's SDPA where it measures faster than our
        # kernel at this shape (autotune >= 3; FLASHRT_ATTN_SDPA=0: never). On the H100 cuDNN beats
        # our mma.sync kernel there (docs/kernels.md), so the pipeline takes the faster of the two.
        if (folded and not split and not fp8_out and self.sdpa_allowed
                and self._first_is_faster(("attention", t, s, d), sdpa, ours, default=False,
                                          labels=("sdpa_us", "flashrt_us"))):
            return sdpa()
        return ours()

    def vision_attention(self, qkv, batch, tokens, heads):
        width = qkv.shape[-1] // 3
        hd = width // heads
        if self.calibrating or qkv.dtype != torch.bfloat16 or not qkv.is_contiguous() or hd % 8:
            return super().vision_attention(qkv, batch, tokens, heads)

        def ours():
            out = torch.empty((batch * tokens, width), dtype=torch.bfloat16, device=qkv.device)
            base, esize = qkv.data_ptr(), qkv.element_size()
            strides = (tokens * 3 * width, 3 * width, hd)
            self.fk.attention(
                base, base + width * esize, base + 2 * width * esize, out.data_ptr(), batch=batch, seqlen_q=tokens,
                seqlen_k=tokens, num_heads_q=heads, num_heads_kv=heads, head_dim=hd, q_strides=strides,
                k_strides=strides, v_strides=strides, o_strides=(tokens * width, width, hd), softmax_scale=hd**-0.5,
                dtype="bf16", num_splits=1, stream=self._stream(),
            )
            return out

        def sdpa():
            return super(KernelOps, self).vision_attention(qkv, batch, tokens, heads)

        # SigLIP's 256-token images (head_dim 72): torch's SDPA (cuDNN) where it measures faster, as
        # for the prefix.
        if self.sdpa_allowed and self._first_is_faster(("vision_attention", batch, tokens, heads, hd), sdpa, ours,
                                                       default=False, labels=("sdpa_us", "flashrt_us")):
            return sdpa()
        return ours()


def _dtype(lin) -> str:
    return "fp8" if lin.fp8 else "bf16"


def _median_us(fn, reps: int = 9, calls: int = 20) -> float:
    """Median GPU time of one call, over reps of ``calls`` back-to-back calls. The calls are
    captured into one CUDA graph and the graph is timed, so they run as the pipeline's replay runs
    them and the host's cost per call (10-20 us from Python, 30-270 us for torch's SDPA) is not in
    the time; the stream also sleeps on the GPU while the host launches the graph. Timing calls
    enqueued from Python behind such a sleep was not enough: in the first process on a fresh H100
    every prefix-attention choice measured SDPA at 59-68 us against its usual 21 and went to our
    slower kernel (0.2 ms per predict). Where the calls cannot be captured, they are enqueued from
    Python behind a sleep of twice their enqueue time."""
    for _ in range(3):
        fn()  # lazy setup (plans, cuDNN graphs, GEMM tuning) outside the capture and the timing
    run = _graphed(fn, calls)
    if run is None:
        def run():
            for _ in range(calls):
                fn()
    run()
    t0 = time.perf_counter()
    run()
    enqueue_ms = (time.perf_counter() - t0) * 1e3
    sleep_cycles = int(max(1.0, 2.0 * enqueue_ms) * _sleep_cycles_per_ms())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda._sleep(sleep_cycles)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[reps // 2]


def _graphed(fn, calls: int):
    """``calls`` calls of fn captured into a CUDA graph: its replay, or None where fn cannot be
    captured (the caller then times it eagerly). torch.cuda.graph synchronises before capturing."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:
        return None
    return graph.replay


_SLEEP_RATE: dict[int, float] = {}  # torch.cuda._sleep cycles per ms, per device


def _sleep_cycles_per_ms() -> float:
    device = torch.cuda.current_device()
    if device not in _SLEEP_RATE:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(4_000_000)
        end.record()
        end.synchronize()
        _SLEEP_RATE[device] = 4_000_000 / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_RATE[device]


def kernels_available(device) -> tuple[bool, str]:
    """(usable, why): flashrt_kernels imports, was built for this GPU, and every op the pipeline
    uses matches torch on random data. Checked once per process and device."""
    key = str(device)
    if key not in _CHECK:
        _CHECK[key] = _check(torch.device(device))
    return _CHECK[key]


def _check(device) -> tuple[bool, str]:
    try:
        import flashrt_kernels  # noqa: PLC0415
    except Exception as exc:  # not installed, or a broken build: torch ops then
        return False, f"flashrt_kernels does not import ({type(exc).__name__}: {exc})"
    major, minor = torch.cuda.get_device_capability(device)
    built = [str(a) for a in flashrt_kernels.built_archs()]
    if not any(a.rstrip("af") == f"{major}{minor}" for a in built):
        return False, f"flashrt_kernels was built for {built}, this GPU is sm_{major}{minor}"
    try:
        worst = self_check(device)
    except Exception as exc:
        return False, f"self-check raised {type(exc).__name__}: {exc}"
    bad = self_check_failures(worst)
    if bad:
        return False, f"self-check mismatches against torch (cosine): {bad}"
    return True, "ok"


def self_check_failures(cosines: dict[str, float]) -> dict[str, float]:
    """The self-check's entries below their bar (0.99 for FP8 ones, 0.999 otherwise). NaN fails too:
    a kernel that left a poisoned output unwritten gives a NaN cosine, and NaN < bar is False."""
    return {k: v for k, v in cosines.items() if not v >= (0.99 if "fp8" in k else 0.999)}


@torch.no_grad()
def self_check(device) -> dict[str, float]:
    """Cosine of every KernelOps op against TorchOps on random data at Pi0.5-like shapes."""
    from flash_rt.models.hopper_ops import (  # noqa: PLC0415
        FP8_MAX,
        Gate,
        Modulation,
        geglu_row_order,
        make_linear,
        reorder_rows,
        rope_row_order,
    )

    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16

    def rnd(*shape, dtype=bf, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)

    def cos(a, b):
        a, b = a.double().flatten(), b.double().flatten()
        return float(a @ b / (a.norm() * b.norm()))

    def static_scale(lin, amax):  # as set_act_amax sets a calibrated FP8 input scale
        lin.act_scale.fill_(amax / FP8_MAX)
        lin.inv_act_scale.fill_(FP8_MAX / amax)

    kern, ref = KernelOps(bf, device), TorchOps(bf)
    out = {}
    width, heads, hd = 1024, 8, 256
    for fp8 in (False, True):
        tag = "fp8" if fp8 else "bf16"
        for m in (50, 300):  # skinny and cuBLASLt
            lin = make_linear("check", rnd(4096, width, dtype=torch.float32, scale=width**-0.5), None,
                              act_dtype=bf, device=device, fp8=fp8)
            if fp8:
                static_scale(lin, 4.0)
            x = rnd(m, width)
            out[f"linear_{tag}_m{m}"] = cos(kern.linear(x, lin).float(), ref.linear(x, lin).float())
        down = make_linear("down", rnd(width, 2048, dtype=torch.float32, scale=2048**-0.5), None, act_dtype=bf,
                           device=device, fp8=fp8)
        if fp8:
            static_scale(down, 8.0)
        gu = rnd(50, 4096)
        out[f"geglu_{tag}"] = cos(kern.linear(kern.geglu(gu, out_for=down), down).float(),
                                  ref.linear(ref.geglu(gu, out_for=down), down).float())
        lin_in = down if fp8 else None
        mod = Modulation(1.0 + rnd(width * 2, dtype=torch.float32, scale=0.2), rnd(width * 2, dtype=torch.float32, scale=0.2),
                         None, None)
        mod.scale_bf16, mod.shift_bf16 = (mod.one_plus_scale - 1.0).to(bf), mod.shift.to(bf)
        gate_f = rnd(width * 2, dtype=torch.float32, scale=0.5)
        gate = Gate(gate_f.to(bf).float(), gate_f.to(bf))
        x = rnd(50, width * 2)
        y = rnd(50, width * 2)
        xk, xr = x.clone(), x.clone()
        hk = kern.rms_norm(xk, lin=lin_in, y=y, gate=gate, mod=mod)
        hr = ref.rms_norm(xr, lin=lin_in, y=y, gate=gate, mod=mod)
        if fp8:
            hk, hr = hk.float() * down.act_scale, hr.float() * down.act_scale
        out[f"add_ada_rms_norm_{tag}"] = cos(hk.float(), hr.float())
        out[f"residual_{tag}"] = cos(xk.float(), xr.float())
        v = rnd(256, 1152)
        yv = rnd(256, 1152)
        vk, vr = v.clone(), v.clone()
        out[f"layer_norm_{tag}"] = cos(kern.layer_norm(vk, lin=None, y=yv).float(), ref.layer_norm(vr, lin=None, y=yv).float())
        # GEMM + GeGLU in one kernel (gate / up rows interleaved), FP8 or bf16 out
        gate_up = rnd(2 * 1024, width, dtype=torch.float32, scale=width**-0.5)
        order = geglu_row_order(1024)
        w, _ = reorder_rows(gate_up, None, order)
        fused = make_linear("gate_up", w, None, act_dtype=bf, device=device, fp8=fp8)
        fused.row_order, fused.inverse_order = "geglu", torch.argsort(order).to(device)
        down_in = make_linear("down_in", rnd(width, 1024, dtype=torch.float32), None, act_dtype=bf, device=device,
                              fp8=fp8)
        if fp8:
            for lin in (fused, down_in):
                static_scale(lin, 4.0)
        x = rnd(50, width)
        gk, gr = kern.linear_geglu(x, fused, out_for=down_in), ref.linear_geglu(x, fused, out_for=down_in)
        if fp8:
            gk, gr = gk.float() * down_in.act_scale, gr.float() * down_in.act_scale
        out[f"linear_geglu_{tag}"] = cos(gk.float(), gr.float())
    # fp32 small linear, written in place and accumulated
    small = make_linear("small", rnd(32, width, dtype=torch.float32, scale=width**-0.5),
                        rnd(32, dtype=torch.float32), act_dtype=torch.float32, device=device, fp8=False)
    h, acc = rnd(50, width), rnd(50, 32, dtype=torch.float32)
    acc_k, acc_r = acc.clone(), acc.clone()
    kern.linear(h, small, out=acc_k, accumulate=True)
    ref.linear(h, small, out=acc_r, accumulate=True)
    out["small_linear_accumulate"] = cos(acc_k, acc_r)
    # RoPE + cache write, MQA attention over the cache (prefix-like and suffix-like), SigLIP attention
    from flash_rt.models.paligemma_hopper import rope_tables  # noqa: PLC0415

    cos_t, sin_t = rope_tables(1024, hd, device)
    kc = [torch.zeros((1024, 1, hd), dtype=bf, device=device) for _ in range(2)]
    vc = [torch.zeros((1024, 1, hd), dtype=bf, device=device) for _ in range(2)]
    for start, t in ((0, 700), (700, 50)):
        qkv = rnd(t, (heads + 2) * hd)
        args = dict(num_heads=heads, start=start, cos=cos_t[start : start + t], sin=sin_t[start : start + t])
        qk = kern.rope_qkv(qkv, k_cache=kc[0], v_cache=vc[0], **args)
        qr = ref.rope_qkv(qkv, k_cache=kc[1], v_cache=vc[1], **args)
        out[f"rope_q_t{t}"] = cos(qk.float(), qr.float())
        out[f"rope_k_t{t}"] = cos(kc[0][start : start + t].float(), kc[1][start : start + t].float())
        end = start + t
        # the suffix-like call declares the cache below it static, as the pipeline does (rope_qkv
        # just wrote rows [start, end)): the path that loads those tiles before the PDL wait
        out[f"attention_t{t}"] = cos(kern.attention(qk, kc[0][:end], vc[0][:end], static_keys=start).float(),
                                     ref.attention(qr, kc[1][:end], vc[1][:end]).float())
    # the same through the fused QKV GEMM + RoPE (rows ordered for it), and attention with FP8 out
    qkv_w = rnd((heads + 2) * hd, width, dtype=torch.float32, scale=width**-0.5)
    order = rope_row_order(heads, 1, hd)
    w, _ = reorder_rows(qkv_w, None, order)
    fused = make_linear("qkv", w, None, act_dtype=bf, device=device, fp8=False)
    fused.row_order, fused.inverse_order = "rope", torch.argsort(order).to(device)
    x = rnd(50, width)
    start = 700
    args = dict(num_heads=heads, start=start, cos=cos_t[start : start + 50], sin=sin_t[start : start + 50])
    qk = kern.linear_rope_qkv(x, fused, k_cache=kc[0], v_cache=vc[0], **args)
    qr = ref.linear_rope_qkv(x, fused, k_cache=kc[1], v_cache=vc[1], **args)
    out["linear_rope_q"] = cos(qk.float(), qr.float())
    out["linear_rope_k"] = cos(kc[0][start : start + 50].float(), kc[1][start : start + 50].float())
    out["linear_rope_v"] = cos(vc[0][start : start + 50].float(), vc[1][start : start + 50].float())
    o_lin = make_linear("o", rnd(width, heads * hd, dtype=torch.float32), None, act_dtype=bf, device=device, fp8=True)
    static_scale(o_lin, 2.0)
    a8 = kern.attention(qk, kc[0][: start + 50], vc[0][: start + 50], out_for=o_lin, static_keys=start)
    out["attention_fp8_out"] = cos(a8.float() * o_lin.act_scale, ref.attention(qr, kc[1][: start + 50],
                                                                                vc[1][: start + 50]).float())
    qkv = rnd(2 * 256, 3 * 1152)
    out["vision_attention"] = cos(kern.vision_attention(qkv, 2, 256, 16).float(), ref.vision_attention(qkv, 2, 256, 16).float())
    torch.cuda.synchronize(device)
    return out
