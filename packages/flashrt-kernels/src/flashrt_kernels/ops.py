"""Checked entry points over the compiled kernels.

Every tensor argument is a device address (an int, e.g. ``tensor.data_ptr()``); ``stream`` is a
``cudaStream_t`` as an int (0 = the legacy default stream). Sizes are in elements. Arguments are
checked here (sizes, divisibility, 16-byte alignment) and a failed launch raises ``CudaError``
carrying CUDA's own message. Nothing here allocates device memory or synchronises.

Dtypes: bf16 everywhere unless said otherwise; FP8 outputs are E4M3 bytes, written as
``saturate(x / scale)`` where ``scale`` points at one fp32 on the device (a static per-tensor scale
that a captured CUDA graph re-reads on every replay).
"""

from __future__ import annotations

from collections.abc import Sequence

from flashrt_kernels import _C

ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}
GEMM_DTYPES = {"bf16": 0, "fp8": 1, "fp8_e4m3": 1}
GEMM_EPILOGUES = {"none": 0, "gelu_tanh": 1}
ATTN_DTYPES = {"bf16": 0, "fp16": 1}
ATTN_HEAD_DIMS = (16, 32, 48, 64, 72, 96, 128, 256)
SKINNY_MAX_M = 64
# cuBLASLt workspace that lets it pick its fastest Hopper kernels.
GEMM_WORKSPACE_BYTES = 32 * 1024 * 1024

_NO_DEVICE_CODES = {35, 100, 34, 3}  # insufficient driver, no device, stub library, not initialised


class CudaError(RuntimeError):
    """A kernel launch or CUDA call failed; ``code`` is the cudaError_t (or cuBLASLt status)."""

    def __init__(self, op: str, code: int):
        self.op, self.code = op, code
        text = _C.error_string(code)
        hint = ""
        archs = "sm_" + ", sm_".join(built_archs())
        if code in _NO_DEVICE_CODES:
            hint = (" No usable CUDA device: flashrt_kernels ops need an NVIDIA GPU and a driver for"
                    f" CUDA 13 (this build targets {archs}).")
        elif code in (98, 209):  # invalid device function / no kernel image for this device
            hint = (f" This build targets {archs}; rebuild for this GPU, e.g. CUDAARCHS=<compute capability,"
                    " like 90a or 120> pip install ./packages/flashrt-kernels.")
        super().__init__(f"flashrt_kernels.{op} failed: CUDA error {code}: {text}.{hint}")


class NoDeviceError(CudaError):
    """Raised instead of CudaError when there is no GPU / driver to run on."""


def _raise_if(rc: int, op: str) -> None:
    if rc:
        raise (NoDeviceError if rc in _NO_DEVICE_CODES else CudaError)(op, rc)


def built_archs() -> list[str]:
    """The GPU architectures compiled into this build, e.g. ``['90a']``."""
    return [a for a in str(_C.BUILT_ARCHS).split(",") if a]


def device_count() -> int:
    """Number of CUDA devices the runtime sees (0 on a machine without a GPU or driver)."""
    rc, n = _C.device_count()
    return int(n) if rc == 0 else 0


def error_string(code: int) -> str:
    return str(_C.error_string(int(code)))


# ------------------------------------------------------------------------------------------------
# argument checks


def _need_ptr(name: str, value: int, align: int = 16, optional: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a device address as int (tensor.data_ptr()), got "
                        f"{type(value).__name__}")
    if value == 0:
        if optional:
            return 0
        raise ValueError(f"{name}: expected a device address, got 0 (null)")
    if value < 0 or value % align:
        raise ValueError(f"{name}: address {value:#x} is not {align}-byte aligned; pass a contiguous "
                         "tensor that starts on a 16-byte boundary (a fresh allocation does)")
    return value


def _need_size(name: str, value: int, minimum: int = 1, multiple: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    if value % multiple:
        raise ValueError(f"{name}: expected a multiple of {multiple}, got {value}")
    return value


def _choice(name: str, value: str, table: dict[str, int]) -> int:
    if value not in table:
        raise ValueError(f"{name}: expected one of {sorted(table)}, got {value!r}")
    return table[value]


def _stream(stream: int) -> int:
    if not isinstance(stream, int) or stream < 0:
        raise TypeError(f"stream: expected a cudaStream_t as int (torch: stream.cuda_stream), got {stream!r}")
    return stream


# ------------------------------------------------------------------------------------------------
# norms


def rms_norm(x: int, weight: int, out: int, rows: int, hidden: int, *, eps: float = 1e-6,
             weight_offset: float = 1.0, out_scale: int = 0, mod_scale: int = 0, mod_shift: int = 0,
             static_params: bool = True, stream: int = 0) -> None:
    """out = x * rsqrt(mean(x^2) + eps) * (weight_offset + weight) [* (1 + mod_scale) + mod_shift].

    weight_offset=1 is Gemma's ``(1 + w)``; weight=0 skips the weight (folded into the next GEMM).
    mod_scale / mod_shift ([hidden] bf16) give adaRMS. out_scale != 0: ``out`` is E4M3.
    static_params (sm_90): the weight / bias / gate / modulation vectors are read before the
    previous kernel of the stream has finished (as ``skinny_gemm`` reads its weight); pass False
    when a kernel just before this call, in the same stream, writes them.
    """
    _norm("rms_norm", x, 0, 0, weight, weight_offset, 0, mod_scale, mod_shift, out, out_scale, rows, hidden,
          eps, False, static_params, stream)


def add_rms_norm(x: int, residual: int, weight: int, out: int, rows: int, hidden: int, *, eps: float = 1e-6,
                 weight_offset: float = 1.0, gate: int = 0, out_scale: int = 0, mod_scale: int = 0,
                 mod_shift: int = 0, static_params: bool = True, stream: int = 0) -> None:
    """residual += x (* gate); out = rms_norm(residual) as in ``rms_norm``. residual is updated in place.

    gate ([hidden] bf16) is the gated residual of adaRMS blocks: residual += x * gate.
    """
    _need_ptr("residual", residual)
    _norm("add_rms_norm", x, residual, gate, weight, weight_offset, 0, mod_scale, mod_shift, out, out_scale,
          rows, hidden, eps, False, static_params, stream)


def layer_norm(x: int, weight: int, bias: int, out: int, rows: int, hidden: int, *, eps: float = 1e-6,
               out_scale: int = 0, residual: int = 0, static_params: bool = True, stream: int = 0) -> None:
    """out = (x - mean) * rsqrt(var + eps) * weight + bias (SigLIP; eps 1e-6). weight/bias may be 0.

    residual != 0: residual += x first and the norm is taken of the new residual (pre-LN blocks).
    static_params as in ``rms_norm``.
    """
    _norm("layer_norm", x, residual, 0, weight, 0.0, bias, 0, 0, out, out_scale, rows, hidden, eps, True,
          static_params, stream)


def _norm(op, x, residual, gate, weight, weight_offset, bias, mod_scale, mod_shift, out, out_scale, rows,
          hidden, eps, layernorm, static_params, stream):
    _need_size("rows", rows, minimum=0)
    _need_size("hidden", hidden, multiple=8)
    if hidden > 32768:
        raise ValueError(f"{op}: hidden must be <= 32768, got {hidden}")
    rc = _C.norm(_need_ptr("x", x), _need_ptr("residual", residual, optional=True),
                 _need_ptr("gate", gate, optional=True), _need_ptr("weight", weight, optional=True),
                 float(weight_offset), _need_ptr("bias", bias, optional=True),
                 _need_ptr("mod_scale", mod_scale, optional=True), _need_ptr("mod_shift", mod_shift, optional=True),
                 _need_ptr("out", out, align=8 if out_scale else 16), _need_ptr("out_scale", out_scale, 4, True),
                 rows, hidden, float(eps), bool(layernorm), bool(static_params), _stream(stream))
    _raise_if(rc, op)


# ------------------------------------------------------------------------------------------------
# activations and quantisation


def bias_act(x: int, bias: int, out: int, rows: int, cols: int, *, activation: str = "gelu_tanh",
             out_scale: int = 0, stream: int = 0) -> None:
    """out = act(x + bias) elementwise; bias ([cols]) may be 0. activation: none|gelu_tanh|silu|relu."""
    act = _choice("activation", activation, ACTIVATIONS)
    _need_size("rows", rows, minimum=0)
    _need_size("cols", cols, multiple=8)
    rc = _C.bias_act(_need_ptr("x", x), _need_ptr("bias", bias, optional=True),
                     _need_ptr("out", out, align=8 if out_scale else 16), rows, cols, act,
                     _need_ptr("out_scale", out_scale, 4, True), _stream(stream))
    _raise_if(rc, "bias_act")


def gelu_tanh(x: int, out: int, n: int, *, out_scale: int = 0, stream: int = 0) -> None:
    """out = gelu_tanh(x) over n elements (n % 8 == 0)."""
    _need_size("n", n, minimum=0, multiple=8)
    if n:
        bias_act(x, 0, out, 1, n, activation="gelu_tanh", out_scale=out_scale, stream=stream)


def geglu(gate_up: int, out: int, rows: int, inter: int, *, out_scale: int = 0, interleaved: bool = False,
          stream: int = 0) -> None:
    """out[r, j] = gelu_tanh(gate_up[r, j]) * gate_up[r, inter + j]; gate_up is [rows, 2 * inter].
    interleaved: gate_up rows are (gate_0, up_0, gate_1, up_1, ...) (``geglu_row_order``)."""
    _need_size("rows", rows, minimum=0)
    _need_size("inter", inter, multiple=8)
    rc = _C.geglu(_need_ptr("gate_up", gate_up), _need_ptr("out", out, align=8 if out_scale else 16), rows,
                  inter, _need_ptr("out_scale", out_scale, 4, True), bool(interleaved), _stream(stream))
    _raise_if(rc, "geglu")


def quantize_fp8(x: int, out: int, n: int, scale: int, *, stream: int = 0) -> None:
    """out (E4M3 bytes) = saturate(x / scale[0]) over n elements."""
    _need_size("n", n, minimum=0)
    rc = _C.quantize_fp8(_need_ptr("x", x), _need_ptr("out", out, align=8), n, _need_ptr("scale", scale, 4),
                         _stream(stream))
    _raise_if(rc, "quantize_fp8")


def amax(x: int, n: int, out: int, *, accumulate: bool = False, stream: int = 0) -> None:
    """out[0] (fp32) = max |x| over n elements; accumulate=True keeps the running max already in out."""
    _need_size("n", n, minimum=0)
    rc = _C.amax(_need_ptr("x", x), n, _need_ptr("out", out, 4), bool(accumulate), _stream(stream))
    _raise_if(rc, "amax")


# ------------------------------------------------------------------------------------------------
# GEMM


def gemm(x: int, w: int, out: int, m: int, n: int, k: int, *, workspace: int, workspace_size: int,
         dtype: str = "bf16", bias: int = 0, residual: int = 0, alpha: float = 1.0, beta: float = 1.0,
         x_scale: int = 0, w_scale: int = 0, epilogue: str = "none", autotune: int = 0,
         stream: int = 0) -> None:
    """out[m, n] = alpha * x_scale * w_scale * (x[m, k] @ w[n, k]^T) + bias[n] + beta * residual[m, n].

    cuBLASLt. x and w: bf16, or both E4M3 (dtype="fp8"; then x_scale / w_scale point at their fp32
    per-tensor scales, 0 = 1.0). out, bias, residual: bf16; residual may be ``out`` (in place).
    epilogue="gelu_tanh" applies cuBLASLt's GELU to (product + bias); not combinable with residual
    (cuBLASLt would add the residual before the GELU). autotune 0 / 3 / 5: heuristic / time 8 / time
    32 candidates, once per shape (not while the stream is capturing a graph: tune before capture).
    FLASHRT_GEMM_TUNE_LOG=1 prints each tuned shape's best and first candidate's time to stderr.
    """
    dt = _choice("dtype", dtype, GEMM_DTYPES)
    epi = _choice("epilogue", epilogue, GEMM_EPILOGUES)
    if epi and residual:
        raise ValueError("gemm: epilogue='gelu_tanh' cannot be combined with residual (the residual would be "
                         "added before the GELU); add the residual in a separate pass")
    for name, v in (("m", m), ("n", n), ("k", k)):
        _need_size(name, v)
    _need_size("k", k, multiple=16 if dt == 1 else 8)
    _need_size("n", n, multiple=16 if dt == 1 else 8)
    if autotune not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"autotune: expected 0..5 (0 heuristic, 3 quick, 5 thorough), got {autotune!r}")
    _need_size("workspace_size", workspace_size, minimum=0)
    rc = _C.gemm(_need_ptr("x", x), _need_ptr("w", w), _need_ptr("out", out),
                 _need_ptr("residual", residual, optional=True), _need_ptr("bias", bias, optional=True),
                 _need_ptr("x_scale", x_scale, 4, True), _need_ptr("w_scale", w_scale, 4, True), m, n, k, dt, epi,
                 float(alpha), float(beta), _need_ptr("workspace", workspace, 256, optional=workspace_size == 0),
                 workspace_size, int(autotune), _stream(stream))
    _raise_if(rc, "gemm")


def gemm_cache_clear() -> None:
    """Forget every cached cuBLASLt plan (the next call per shape chooses / tunes again)."""
    _C.gemm_cache_clear()


def gemm_cache_size() -> int:
    return int(_C.gemm_cache_size())


def skinny_gemm(x: int, w: int, out: int, m: int, n: int, k: int, *, bias: int = 0, residual: int = 0,
                alpha: float = 1.0, dtype: str = "bf16", x_scale: int = 0, w_scale: int = 0, split: int = 0,
                pdl: bool = True, stream: int = 0) -> None:
    """out[m, n] = alpha * sx * sw * x[m, k] @ w[n, k]^T (+ bias[n]) (+ residual[m, n]) for m <= 64.

    Streams w once (tensor cores, cluster split-K on sm_90; measured speed in docs/kernels.md).
    x, w: bf16, or both E4M3 (dtype="fp8", sm_89+, k % 16 == 0) with x_scale / w_scale pointing at
    fp32 scales (0 = 1.0).
    out, bias, residual: bf16; residual may be ``out``. split: 0 chooses; else a power of two <= 16.
    pdl (sm_90): launch as a programmatic dependent of the previous kernel in the stream, so the
    weight stream starts while that kernel finishes (x, residual and out are touched only after it).
    """
    dt = _skinny_checks(m, n, k, dtype, split)
    rc = _C.skinny_gemm(_need_ptr("x", x), _need_ptr("w", w), _need_ptr("out", out, 2),
                        _need_ptr("bias", bias, 2, True), _need_ptr("residual", residual, 2, True), float(alpha),
                        m, n, k, split, bool(dt), _need_ptr("x_scale", x_scale, 4, True),
                        _need_ptr("w_scale", w_scale, 4, True), bool(pdl), _stream(stream))
    _raise_if(rc, "skinny_gemm")


def skinny_gemm_geglu(x: int, w: int, out: int, m: int, n: int, k: int, *, bias: int = 0, dtype: str = "bf16",
                      x_scale: int = 0, w_scale: int = 0, out_scale: int = 0, split: int = 0, pdl: bool = True,
                      stream: int = 0) -> None:
    """out[m, n / 2] = gelu_tanh(g) * u of the skinny GEMM x @ w^T (+ bias) whose n output columns
    are gate / up interleaved column by column (w's rows ordered gate_0, up_0, gate_1, up_1, ...;
    ``geglu_row_order`` gives that order). out: bf16, or E4M3 at the device fp32 ``out_scale``
    (value / scale, saturated). One kernel instead of a GEMM and a GeGLU pass. Other arguments as
    ``skinny_gemm``; n % 4 == 0."""
    dt = _skinny_checks(m, n, k, dtype, split)
    _need_size("n", n, multiple=4)
    rc = _C.skinny_gemm_geglu(_need_ptr("x", x), _need_ptr("w", w), _need_ptr("out", out, 4),
                              _need_ptr("bias", bias, 2, True), m, n, k, split, bool(dt),
                              _need_ptr("x_scale", x_scale, 4, True), _need_ptr("w_scale", w_scale, 4, True),
                              _need_ptr("out_scale", out_scale, 4, True), bool(pdl), _stream(stream))
    _raise_if(rc, "skinny_gemm_geglu")


def skinny_gemm_rope_qkv(x: int, w: int, positions: int, q_out: int, k_cache: int, v_cache: int, m: int, k: int,
                         num_heads_q: int, num_heads_kv: int, head_dim: int, *, bias: int = 0,
                         cache_offset: int = 0, theta: float = 10000.0, dtype: str = "bf16", x_scale: int = 0,
                         w_scale: int = 0, split: int = 0, pdl: bool = True, stream: int = 0) -> None:
    """The fused QKV projection x @ w^T (+ bias) with ``rope_qkv`` applied in its epilogue: q_out
    [m, Hq, D] rotated, k (rotated) / v into the caches [rows, Hkv, D] at rows cache_offset + i.
    w's q and k head rows are in ``rope_row_order`` (pairs (i, i + D/2) adjacent), v rows natural.
    positions: int32 [m], or 0 for row i at position cache_offset + i (saves a load per output).
    One kernel instead of a GEMM and a RoPE pass. Other arguments as ``skinny_gemm``."""
    _need_size("num_heads_q", num_heads_q)
    _need_size("num_heads_kv", num_heads_kv)
    _need_size("head_dim", head_dim, minimum=4, multiple=4)
    _need_size("cache_offset", cache_offset, minimum=0)
    n = (num_heads_q + 2 * num_heads_kv) * head_dim
    dt = _skinny_checks(m, n, k, dtype, split)
    rc = _C.skinny_gemm_rope_qkv(_need_ptr("x", x), _need_ptr("w", w), _need_ptr("bias", bias, 2, True),
                                 _need_ptr("positions", positions, 4, True), _need_ptr("q_out", q_out, 4),
                                 _need_ptr("k_cache", k_cache, 4), _need_ptr("v_cache", v_cache, 8), m, k,
                                 num_heads_q, num_heads_kv, head_dim, int(cache_offset), float(theta), split,
                                 bool(dt), _need_ptr("x_scale", x_scale, 4, True),
                                 _need_ptr("w_scale", w_scale, 4, True), bool(pdl), _stream(stream))
    _raise_if(rc, "skinny_gemm_rope_qkv")


def _skinny_checks(m, n, k, dtype, split) -> int:
    dt = _choice("dtype", dtype, GEMM_DTYPES)
    _need_size("m", m)
    if m > SKINNY_MAX_M:
        raise ValueError(f"skinny_gemm: m must be <= {SKINNY_MAX_M}, got {m}; use gemm() for larger m")
    _need_size("n", n)
    _need_size("k", k, multiple=16 if dt else 8)
    if split not in (0, 1, 2, 4, 8, 16):
        raise ValueError(f"split: expected 0 (auto) or a power of two <= 16, got {split!r}")
    return dt


def small_linear(x: int, w: int, out: int, m: int, n: int, k: int, *, bias: int = 0, x_dtype: str = "fp32",
                 out_dtype: str = "fp32", accumulate: bool = False, stream: int = 0) -> None:
    """out[m, n] (= or, with accumulate, +=) x[m, k] . w[n, k] + bias[n]: w and bias fp32, x and
    out "fp32" or "bf16". One kernel (a thread per output column for k <= 64, else a warp; the w
    rows held in registers before the wait on the previous kernel) for the tiny fp32 GEMMs beside a
    flow policy's action state, where cuBLAS runs split-K SGEMMs of several kernels."""
    dtypes = {"fp32": 0, "bf16": 1}
    x_bf16 = bool(_choice("x_dtype", x_dtype, dtypes))
    out_bf16 = bool(_choice("out_dtype", out_dtype, dtypes))
    _need_size("m", m)
    _need_size("n", n)
    _need_size("k", k)
    rc = _C.small_linear(_need_ptr("x", x, 2 if x_bf16 else 4), _need_ptr("w", w, 4),
                         _need_ptr("bias", bias, 4, True), _need_ptr("out", out, 2 if out_bf16 else 4), m, n, k,
                         x_bf16, out_bf16, bool(accumulate), _stream(stream))
    _raise_if(rc, "small_linear")


def geglu_row_order(inter: int) -> list[int]:
    """Row order of a fused [gate; up] weight (2 * inter rows) for ``skinny_gemm_geglu``:
    gate_0, up_0, gate_1, up_1, ... (new row r takes old row order[r])."""
    return [i // 2 + (i % 2) * inter for i in range(2 * inter)]


def rope_row_order(num_heads_q: int, num_heads_kv: int, head_dim: int) -> list[int]:
    """Row order of a fused [q; k; v] weight for ``skinny_gemm_rope_qkv``: within each q and k head
    (0, D/2, 1, D/2 + 1, ...), v heads unchanged (new row r takes old row order[r])."""
    half = head_dim // 2
    order = []
    for h in range(num_heads_q + 2 * num_heads_kv):
        base = h * head_dim
        if h < num_heads_q + num_heads_kv:
            order += [base + i // 2 + (i % 2) * half for i in range(head_dim)]
        else:
            order += list(range(base, base + head_dim))
    return order


# ------------------------------------------------------------------------------------------------
# RoPE + KV cache


def rope_qkv(qkv: int, positions: int, q_out: int, k_cache: int, v_cache: int, tokens: int,
             num_heads_q: int, num_heads_kv: int, head_dim: int, *, cache_offset: int = 0,
             theta: float = 10000.0, q_scale: float = 1.0, q_row_stride: int = 0, stream: int = 0) -> None:
    """Split a fused QKV row [T, (Hq + 2 Hkv) * D], rotate q and k (split-half RoPE at int32
    ``positions[T]``; 0: token t at position cache_offset + t), write q_out [T, Hq, D] (times
    q_scale), and k / v into the caches [rows, Hkv, D] at rows cache_offset .. cache_offset + T - 1.

    q_row_stride: elements between q_out rows (0 = Hq * D). With q_out = qkv and
    q_row_stride = (Hq + 2 Hkv) * D, q is rotated in place inside the fused buffer."""
    _need_size("tokens", tokens, minimum=0)
    _need_size("num_heads_q", num_heads_q)
    _need_size("num_heads_kv", num_heads_kv)
    _need_size("head_dim", head_dim, minimum=4, multiple=4)
    _need_size("cache_offset", cache_offset, minimum=0)
    _need_size("q_row_stride", q_row_stride, minimum=0, multiple=8 if head_dim % 16 == 0 else 2)
    if q_row_stride and q_row_stride < num_heads_q * head_dim:
        raise ValueError(f"q_row_stride: expected 0 or >= num_heads_q * head_dim = {num_heads_q * head_dim}, "
                         f"got {q_row_stride}")
    align = 16 if head_dim % 16 == 0 else 4
    rc = _C.rope_qkv(_need_ptr("qkv", qkv, align), _need_ptr("positions", positions, 4, True),
                     _need_ptr("q_out", q_out, align), _need_ptr("k_cache", k_cache, align),
                     _need_ptr("v_cache", v_cache, align), tokens, num_heads_q, num_heads_kv, head_dim,
                     cache_offset, float(theta), float(q_scale), int(q_row_stride), _stream(stream))
    _raise_if(rc, "rope_qkv")


# ------------------------------------------------------------------------------------------------
# attention


def attention_max_splits() -> int:
    return int(_C.attention_max_splits())


def attention_splitkv_sizes(batch: int, seqlen_q: int, num_heads_q: int, head_dim: int) -> tuple[int, int]:
    """Elements (fp32) of the split-KV scratch buffers (lse_accum, o_accum) for the largest split count."""
    s = attention_max_splits()
    rows = batch * num_heads_q * seqlen_q
    return s * rows, s * rows * head_dim


def attention_num_splits(batch: int, seqlen_q: int, seqlen_k: int, num_heads_q: int, num_heads_kv: int,
                         head_dim: int, num_sms: int = 0) -> int:
    """The split-KV count ``attention(num_splits=0)`` would request (num_sms=0: ask the device). The
    kernel rounds the keys per split to whole key tiles per warp group, so the launched count can
    differ by a few (never above ``attention_max_splits()``)."""
    rc, s = _C.attention_num_splits(batch, seqlen_q, seqlen_k, num_heads_q, num_heads_kv, head_dim, num_sms)
    _raise_if(rc, "attention_num_splits")
    return int(s)


def _strides(name: str, value: Sequence[int]) -> list[int]:
    vals = list(value)
    if len(vals) != 3 or not all(isinstance(v, int) and v >= 0 for v in vals):
        raise ValueError(f"{name}: expected 3 non-negative element strides (batch, row, head), got {value!r}")
    if any(v % 8 for v in vals):
        raise ValueError(f"{name}: every stride must be a multiple of 8 elements (16 bytes), got {vals}")
    return vals


def attention(q: int, k: int, v: int, o: int, *, batch: int, seqlen_q: int, seqlen_k: int, num_heads_q: int,
              num_heads_kv: int, head_dim: int, q_strides: Sequence[int], k_strides: Sequence[int],
              v_strides: Sequence[int], o_strides: Sequence[int], softmax_scale: float, dtype: str = "bf16",
              mask: int = 0, mask_strides: Sequence[int] = (0, 0), softmax_lse: int = 0, lse_accum: int = 0,
              o_accum: int = 0, num_splits: int = 1, num_sms: int = 0, out_scale: int = 0, static_keys: int = 0,
              stream: int = 0) -> int:
    """Attention forward: O = softmax(scale * Q K^T, masked) V with Hq / Hkv query heads per KV head.

    Tensors [batch, seq, heads, head_dim] with any (batch, row, head) element strides and a contiguous
    last dim. mask: uint8/bool, attend where != 0, element (b, i, j) at b * mask_strides[0] +
    i * mask_strides[1] + j (row stride 0 = a key-padding mask). softmax_lse: fp32 [B, Hq, Sq] or 0.
    Split-KV (decode-style): num_splits > 1, or 0 = choose from the grid; needs lse_accum / o_accum
    scratch sized by ``attention_splitkv_sizes``. out_scale: 0, or a device fp32 scale: O is then written
    as E4M3 (O / scale, saturated; same element strides), the input of an FP8 GEMM. static_keys: keys
    [0, static_keys) were written before the previous kernel of the stream (a decode step's cached
    prefix), so their first tiles are loaded before the kernel waits for that kernel (programmatic
    dependent launch); 0 (default) for keys the previous kernel may write. Returns the split count
    requested (see ``attention_num_splits``).
    """
    dt = _choice("dtype", dtype, ATTN_DTYPES)
    if head_dim not in ATTN_HEAD_DIMS:
        raise ValueError(f"attention: head_dim must be one of {ATTN_HEAD_DIMS}, got {head_dim}")
    _need_size("batch", batch, minimum=0)
    _need_size("seqlen_q", seqlen_q, minimum=0)
    _need_size("seqlen_k", seqlen_k, minimum=0)
    _need_size("num_heads_kv", num_heads_kv)
    _need_size("num_heads_q", num_heads_q, multiple=num_heads_kv)
    if len(tuple(mask_strides)) != 2 or any((not isinstance(s, int)) or s < 0 for s in mask_strides):
        raise ValueError(f"mask_strides: expected (batch_stride, row_stride) >= 0, got {mask_strides!r}")
    _need_size("static_keys", static_keys, minimum=0)
    if not isinstance(num_splits, int) or not 0 <= num_splits <= attention_max_splits():
        raise ValueError(f"num_splits: expected 0 (auto) .. {attention_max_splits()}, got {num_splits!r}")
    has_scratch = bool(lse_accum) and bool(o_accum)
    if num_splits == 0:
        num_splits = (attention_num_splits(batch, seqlen_q, seqlen_k, num_heads_q, num_heads_kv, head_dim,
                                           num_sms) if has_scratch else 1)
    if num_splits > 1 and not has_scratch:
        raise ValueError("attention: num_splits > 1 needs lse_accum and o_accum scratch buffers "
                         "(sizes from attention_splitkv_sizes)")
    rc = _C.attention(dt, _need_ptr("q", q), _need_ptr("k", k), _need_ptr("v", v), _need_ptr("o", o),
                      _strides("q_strides", q_strides), _strides("k_strides", k_strides),
                      _strides("v_strides", v_strides), _strides("o_strides", o_strides), batch, seqlen_q,
                      seqlen_k, num_heads_q, num_heads_kv, head_dim, float(softmax_scale),
                      _need_ptr("mask", mask, 1, True), int(mask_strides[0]), int(mask_strides[1]),
                      _need_ptr("softmax_lse", softmax_lse, 4, True), _need_ptr("lse_accum", lse_accum, 16, True),
                      _need_ptr("o_accum", o_accum, 16, True), num_splits,
                      _need_ptr("out_scale", out_scale, 4, True), int(static_keys), _stream(stream))
    _raise_if(rc, "attention")
    return num_splits
