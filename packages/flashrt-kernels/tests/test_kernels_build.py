"""CPU checks of the built extension: it imports, says what it was built for, reaches flash_rt's
shims, checks arguments before touching CUDA, and fails clearly when there is no GPU."""

import re

import pytest

fk = pytest.importorskip(
    "flashrt_kernels",
    reason="flashrt_kernels is not installed (pip install ./packages/flashrt-kernels, CUDAARCHS=90a for a fast build)",
)


def test_reports_version_and_built_archs():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", fk.__version__)
    archs = fk.built_archs()
    assert archs, "the build recorded no CUDA architectures"
    for arch in archs:
        assert re.fullmatch(r"\d{2,3}[af]?", arch), arch


def test_flash_rt_shims_give_the_compiled_module():
    import flash_rt.flash_rt_kernels as via_import
    from flash_rt import flash_rt_kernels

    assert flash_rt_kernels is fk and via_import is fk
    from flash_rt import flash_rt_fa2

    assert callable(flash_rt_fa2.fwd_bf16) and callable(flash_rt_fa2.fwd_fp16)


def test_fa2_signature_matches_the_seed():
    import inspect

    from flash_rt import flash_rt_fa2

    for fn in (flash_rt_fa2.fwd_fp16, flash_rt_fa2.fwd_bf16):
        params = inspect.signature(fn).parameters
        assert list(params)[:7] == ["Q", "K", "V", "O", "softmax_lse", "softmax_lse_accum", "o_accum"]
        assert params["softmax_lse_accum"].default == 0 and params["o_accum"].default == 0
        kw = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert kw == ["batch", "seqlen_q", "seqlen_k", "num_heads_q", "num_heads_kv", "head_dim", "q_strides",
                      "k_strides", "v_strides", "o_strides", "softmax_scale", "num_sms", "stream"]
        assert params["softmax_scale"].default == 1.0 and params["num_sms"].default == 0
        assert params["stream"].default == 0


def test_arguments_are_checked_before_any_cuda_call():
    with pytest.raises(ValueError, match="16-byte aligned"):
        fk.rms_norm(0x1004, 0, 0x2000, 4, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        fk.rms_norm(0x1000, 0, 0x2000, 4, 60)
    with pytest.raises(ValueError, match="m must be <= 64"):
        fk.skinny_gemm(0x1000, 0x2000, 0x3000, 65, 128, 128)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        fk.attention(0x1000, 0x1000, 0x1000, 0x1000, batch=1, seqlen_q=4, seqlen_k=4, num_heads_q=1,
                     num_heads_kv=1, head_dim=40, q_strides=(0, 40, 40), k_strides=(0, 40, 40),
                     v_strides=(0, 40, 40), o_strides=(0, 40, 40), softmax_scale=1.0)
    with pytest.raises(ValueError, match="static_keys: expected >= 0"):
        fk.attention(0x1000, 0x1000, 0x1000, 0x1000, batch=1, seqlen_q=4, seqlen_k=4, num_heads_q=1,
                     num_heads_kv=1, head_dim=64, q_strides=(0, 64, 64), k_strides=(0, 64, 64),
                     v_strides=(0, 64, 64), o_strides=(0, 64, 64), softmax_scale=1.0, static_keys=-1)
    with pytest.raises(ValueError, match="activation"):
        fk.bias_act(0x1000, 0, 0x2000, 1, 8, activation="gelu_erf")
    with pytest.raises(TypeError, match="device address"):
        fk.amax(1.5, 8, 0x1000)


def test_binding_reports_invalid_values_as_cuda_codes():
    # The raw binding returns cudaErrorInvalidValue (1) for a hidden size the kernel cannot take,
    # without launching anything; the Python layer turns such codes into CudaError.
    from flashrt_kernels import _C

    assert _C.norm(0x1000, 0, 0, 0, 0.0, 0, 0, 0, 0x2000, 0, 4, 12, 1e-6, False, True, 0) == 1
    assert "invalid argument" in fk.error_string(1)


def test_calling_an_op_without_a_device_raises_a_clear_error():
    if fk.device_count() > 0:
        pytest.skip("a CUDA device is present; this checks the no-GPU path")
    with pytest.raises(fk.NoDeviceError, match="No usable CUDA device"):
        fk.rms_norm(0x1000, 0, 0x2000, 4, 64)
    with pytest.raises(fk.NoDeviceError):
        fk.gemm(0x1000, 0x2000, 0x3000, 4, 64, 64, workspace=0, workspace_size=0)
    with pytest.raises(fk.NoDeviceError):
        fk.skinny_gemm(0x1000, 0x2000, 0x3000, 4, 64, 64)
