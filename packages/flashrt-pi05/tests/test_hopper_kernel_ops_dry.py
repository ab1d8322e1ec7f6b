"""KernelOps through flashrt_kernels' real Python layer with a stub extension (no GPU needed).

Every call the pipeline makes into the compiled kernels passes through ``flashrt_kernels.ops``,
which checks argument names, sizes, multiples, alignment and strides before anything reaches CUDA.
Here the extension module ``_C`` is replaced by a stub that only counts calls, so the pipeline's
whole call sequence (vision, prefix, Pi0 state token, denoise steps; BF16 and FP8) runs on the CPU
through those checks. What the kernels compute is tested on the GPU (test_hopper_gpu.py and the
KernelOps self-check against torch).
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

KERNELS_SRC = Path(__file__).resolve().parents[2] / "flashrt-kernels" / "src"


class _StubExtension(types.ModuleType):
    VERSION = "stub"

    def __init__(self):
        super().__init__("flashrt_kernels._C")
        self.calls = Counter()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            return {"built_archs": ["90a"], "attention_max_splits": 16, "attention_num_splits": (0, 4),
                    "error_string": "stub"}.get(name, 0)

        return call


@pytest.fixture
def stub_kernels(monkeypatch):
    if not (KERNELS_SRC / "flashrt_kernels" / "ops.py").is_file():
        pytest.skip("flashrt-kernels sources not in this tree")
    stub = _StubExtension()
    for name in [m for m in sys.modules if m == "flashrt_kernels" or m.startswith("flashrt_kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flashrt_kernels._C", stub)
    monkeypatch.syspath_prepend(str(KERNELS_SRC))
    import flash_rt.models.hopper_kernel_ops as hko

    monkeypatch.setattr(hko.KernelOps, "_stream", staticmethod(lambda: 0))
    yield hko, stub
    for name in [m for m in sys.modules if m == "flashrt_kernels" or m.startswith("flashrt_kernels.")]:
        sys.modules.pop(name, None)


def _config(model_type):
    from flash_rt.models.pi_config import GemmaDims, PiConfig, VisionDims

    # kernel-sized heads (64 / 72), 112x112 images: 128 image tokens, so both GEMM paths run
    llm = GemmaDims(width=256, depth=2, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=64)
    exp = GemmaDims(width=128, depth=2, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=64)
    vis = VisionDims(width=144, depth=2, mlp_dim=288, num_heads=2, patch_size=14, image_size=112)
    return PiConfig(model_type=model_type, paligemma=llm, expert=exp, vision=vis, vocab_size=500,
                    action_horizon=10, max_token_len=24)


@pytest.mark.parametrize("precision", ["bf16", "fp8", "fp8-all"])  # fp8: the model's bf16 keep list; fp8-all: none
@pytest.mark.parametrize("model_type", ["pi05", "pi0"])
def test_pipeline_calls_pass_the_kernels_argument_checks(stub_kernels, model_type, precision):
    from flash_rt.models.pi_random_weights import random_state_dict

    hko, stub = stub_kernels
    if model_type == "pi05":
        from flashrt_pi05.pipeline_hopper import Pi05HopperPipeline as cls
    else:
        from flashrt_pi0.pipeline_hopper import Pi0HopperPipeline as cls
    config = _config(model_type)
    ops = hko.KernelOps(torch.bfloat16, torch.device("cpu"))
    keep = () if precision == "fp8-all" else None
    pipe = cls(random_state_dict(config, seed=0), config, num_views=2, use_fp8=precision != "bf16",
               act_dtype=torch.bfloat16, ops=ops, fp8_keep_bf16=keep)
    assert bool(pipe.fp8_linears()) == (precision != "bf16")
    attention_keys = []  # (seqlen_k, static_keys) of every attention call

    def attention(*args):
        stub.calls["attention"] += 1
        attention_keys.append((args[11], args[24]))
        return 0

    stub.attention = attention
    bucket = pipe.set_prompt_tokens(list(range(2, 12)))
    pipe.load_inputs(torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8), torch.randn(10, 32),
                     None if model_type == "pi05" else torch.randn(32))
    if precision != "bf16":
        pipe.calibrate_current()  # the calibration pass runs the torch path: no kernel calls
        assert not any(k in stub.calls for k in ("gemm", "skinny_gemm", "norm"))
    pipe.run_all(bucket)
    calls = stub.calls
    depth, steps = config.expert.depth, pipe.num_steps
    # per denoise step and expert layer: 2 norms, QKV GEMM + RoPE, attention, o GEMM, gate/up GEMM +
    # GeGLU, down GEMM; the fp32 action projections as one small-linear kernel each, no cuBLAS
    # Pi0: + its action_time_out per step; its state token rides in the first step's GEMMs (51 rows)
    # with an attention call of its own per layer
    pi0 = model_type == "pi0"
    assert calls["skinny_gemm"] == 2 * depth * steps + pi0 * steps  # o, down
    assert calls["skinny_gemm_rope_qkv"] == depth * steps
    assert calls["skinny_gemm_geglu"] == depth * steps
    assert calls["small_linear"] >= 2 * steps
    assert calls["gemm"] >= 4 * config.vision.depth  # the 256-row SigLIP GEMMs
    assert calls["rope_qkv"] == config.paligemma.depth  # the prefix's (its GEMMs are cuBLASLt)
    assert calls["geglu"] == config.paligemma.depth - 1
    assert calls["attention"] >= config.vision.depth + config.paligemma.depth - 1 + depth * steps + pi0 * depth
    assert calls["norm"] >= 2 * config.vision.depth + 2 * depth * steps
    # the denoise calls declare the cache below their own rows as written before them (the kernel
    # loads it before waiting for the QKV GEMM); the prefix and SigLIP calls declare nothing
    decode = [(sk, static) for sk, static in attention_keys if static]
    assert len(decode) == depth * steps + pi0 * depth
    assert all(0 < sk - static <= config.action_horizon + pi0 for sk, static in decode)
    # a standalone quantisation runs only where an FP8 GEMM's input comes from no fused producer
    # (Pi0's action tokens, with everything FP8)
    if precision != "fp8":
        assert (calls["quantize_fp8"] > 0) == (precision == "fp8-all")


def test_self_check_calls_pass_the_argument_checks(stub_kernels, monkeypatch):
    hko, stub = stub_kernels
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    cos = hko.self_check(torch.device("cpu"))  # stub outputs are garbage: only the calls are checked
    assert {"linear_fp8_m50", "linear_bf16_m300", "attention_t50", "vision_attention", "rope_k_t700"} <= set(cos)
    assert stub.calls["skinny_gemm"] and stub.calls["gemm"] and stub.calls["attention"] >= 3


def test_runtime_failure_falls_back_to_torch_ops(stub_kernels):
    """Kernels that pass their self-check but fail in the pipeline: the pipeline keeps serving
    with the torch ops (residual streams re-typed), giving the torch pipeline's exact result."""
    from flash_rt.models.pi_random_weights import random_state_dict
    from flashrt_pi05.pipeline_hopper import Pi05HopperPipeline

    hko, _ = stub_kernels
    config = _config("pi05")
    sd = random_state_dict(config, seed=0)
    images, noise = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8), torch.randn(10, 32)
    pipe = Pi05HopperPipeline(sd, config, num_views=2, use_fp8=False, act_dtype=torch.bfloat16,
                              ops=hko.KernelOps(torch.bfloat16, torch.device("cpu")))
    assert pipe.prefix_x.dtype == torch.bfloat16
    with pytest.warns(RuntimeWarning, match="continuing with the torch ops"):
        pipe._fall_back_to_torch_ops(RuntimeError("boom"))
    assert pipe.ops.name == "torch" and "boom" in pipe.ops.fallback_reason
    assert pipe.prefix_x.dtype == torch.float32
    torch_pipe = Pi05HopperPipeline(sd, config, num_views=2, use_fp8=False, act_dtype=torch.bfloat16, ops="torch")
    results = []
    for p in (pipe, torch_pipe):
        p.set_prompt_tokens(list(range(2, 12)))
        p.load_inputs(images, noise)
        results.append(p.infer())
    assert (results[0] == results[1]).all()


def test_self_check_fails_nan_and_low_cosines():
    from flash_rt.models.hopper_kernel_ops import self_check_failures

    cosines = {"linear_bf16_m50": 0.9995, "linear_fp8_m50": 0.995, "rope_q_t50": float("nan"),
               "geglu_bf16": 0.998, "attention_fp8_out": 0.98}
    assert set(self_check_failures(cosines)) == {"rope_q_t50", "geglu_bf16", "attention_fp8_out"}
