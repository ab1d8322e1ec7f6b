"""AttentionSpec / AttentionBackend contract, the SDPA reference backend and the plugin checker."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flash_rt.errors import ConfigError, HardwareError, InputError
from flash_rt.hardware.backend import AttentionBackend, AttentionBackendBase, AttentionSpec, SiteSpec
from flash_rt.hardware.sdpa_backend import TorchSdpaBackend
from flash_rt.testing import check_attention_backend, reference_attention

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_spec() -> AttentionSpec:
    """Every shape feature: MQA self-attention, GQA cross-attention, MHA causal, odd sizes."""
    return (
        AttentionSpec()
        .add_site("prefix", num_layers=2, num_q_heads=4, num_kv_heads=1, head_dim=32, max_q_seq=19)
        .add_site("suffix", num_layers=3, num_q_heads=8, num_kv_heads=2, head_dim=16, max_q_seq=7, max_kv_seq=26)
        .add_site("decoder", num_layers=1, num_q_heads=2, num_kv_heads=2, head_dim=8, max_q_seq=5, max_kv_seq=13,
                  causal=True)
    )


# -- spec --------------------------------------------------------------------------------------


def test_site_spec_defaults_match_seed():
    site = SiteSpec(num_layers=1, num_q_heads=8, num_kv_heads=1, head_dim=256, max_q_seq=800)
    assert (site.max_kv_seq, site.batch_axis, site.sliding_window, site.causal, site.extra) == (
        None, 1, None, False, {})
    assert site.kv_capacity == 800
    assert site.softmax_scale == pytest.approx(1 / 16)
    assert SiteSpec(1, 2, 2, 64, 4, extra={"softmax_scale": 0.5}).softmax_scale == 0.5


def test_add_site_chains_and_site_lookup():
    spec = AttentionSpec()
    assert spec.add_site("a", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=4, max_q_seq=3) is spec
    assert spec.site("a").head_dim == 4
    with pytest.raises(ConfigError, match=r"unknown attention site 'b'.*defines: a"):
        spec.site("b")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=1, num_q_heads=6, num_kv_heads=4, head_dim=8, max_q_seq=3), "multiple of num_kv_heads"),
        (dict(num_layers=0, num_q_heads=2, num_kv_heads=1, head_dim=8, max_q_seq=3), "num_layers must be"),
        (dict(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, max_q_seq=3, heads=2), "unknown field"),
        (dict(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8), "max_q_seq"),
    ],
)
def test_add_site_rejects_bad_sites(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AttentionSpec().add_site("x", **kwargs)


def test_duplicate_site_rejected():
    spec = AttentionSpec().add_site("a", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=4, max_q_seq=3)
    with pytest.raises(ConfigError, match="already defined"):
        spec.add_site("a", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=4, max_q_seq=3)


# -- protocol and base --------------------------------------------------------------------------


def test_reference_backend_satisfies_protocol_and_accessors():
    spec = small_spec()
    backend = TorchSdpaBackend(spec)
    assert isinstance(backend, AttentionBackend)
    assert isinstance(backend, AttentionBackendBase)
    assert backend.sites() == ("prefix", "suffix", "decoder")
    assert (backend.head_dim("suffix"), backend.num_q_heads("suffix"), backend.num_kv_heads("suffix")) == (16, 8, 2)
    assert not isinstance(object(), AttentionBackend)


def test_slot_pointers_distinct_per_layer_and_shaped_as_documented():
    backend = TorchSdpaBackend(small_spec())
    p0, p1 = backend.get_slot_ptrs("suffix", 0), backend.get_slot_ptrs("suffix", 1)
    assert set(p0) == {"Q", "K", "V", "O"}
    assert p0["K"] != p1["K"] and p0["V"] != p1["V"]
    slots = backend.slot_tensors("suffix", 2)
    assert slots["Q"].shape == slots["O"].shape == (7, 8, 16)
    assert slots["K"].shape == slots["V"].shape == (26, 2, 16)
    assert all(t.is_contiguous() for t in slots.values())


def test_run_validates_arguments():
    backend = TorchSdpaBackend(small_spec())
    with pytest.raises(ConfigError, match="unknown attention site"):
        backend.run("nope", 0, 3)
    with pytest.raises(InputError, match="layer_idx 2 out of range"):
        backend.run("prefix", 2, 3)
    with pytest.raises(InputError, match="q_seq 20"):
        backend.run("prefix", 0, 20)
    with pytest.raises(InputError, match="kv_seq 27"):
        backend.run("suffix", 0, 3, kv_seq=27)
    with pytest.raises(InputError, match="causal"):
        backend.run("decoder", 0, 5, kv_seq=4)


def test_bad_construction():
    with pytest.raises(ConfigError, match="no sites"):
        TorchSdpaBackend(AttentionSpec())
    with pytest.raises(ConfigError, match="dtype"):
        TorchSdpaBackend(small_spec(), dtype="int8")
    spec = AttentionSpec().add_site("s", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=4, max_q_seq=3,
                                    sliding_window=2)
    with pytest.raises(ConfigError, match="sliding_window"):
        TorchSdpaBackend(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_backend_without_gpu_is_hardware_error():
    with pytest.raises(HardwareError, match="no CUDA device"):
        TorchSdpaBackend(small_spec(), device="cuda")


# -- reference math -----------------------------------------------------------------------------


def test_reference_attention_matches_naive_loop():
    """The checker's fp32 reference against a per-head loop written independently (float64)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(s, generator=g) for s in [(5, 6, 4), (9, 2, 4), (9, 2, 4)])
    out = reference_attention(q, k, v, scale=0.3, causal=True)
    expected = torch.empty(5, 6, 4, dtype=torch.float64)
    for h in range(6):
        kh, vh = k[:, h // 3].double(), v[:, h // 3].double()
        for i in range(5):
            visible = i + 9 - 5 + 1
            w = torch.softmax((kh[:visible] @ q[i, h].double()) * 0.3, dim=0)
            expected[i, h] = w @ vh[:visible]
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)


# -- the checker --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_backend_passes_checker(dtype):
    spec = small_spec()
    report = check_attention_backend(TorchSdpaBackend(spec, dtype=dtype), spec, dtype=dtype, device="cpu")
    assert report.ok
    # 2 + 3 + 1 layers, two (q_seq, kv_seq) cases each.
    assert len(report.cases) == 12
    assert all(case.max_abs_err <= report.atol + report.rtol * case.max_ref for case in report.cases)
    assert {(c.q_seq, c.kv_seq) for c in report.cases if c.site == "suffix"} == {(7, 26), (4, 19)}


class WrongScaleBackend(TorchSdpaBackend):
    def run(self, site, layer_idx, q_seq, *, kv_seq=None, stream=0):
        spec, kv_seq = self._resolve_seqs(site, layer_idx, q_seq, kv_seq)
        q, k, v = (t.float() for t in (self._q[site][:q_seq], self._k[site][layer_idx, :kv_seq],
                                       self._v[site][layer_idx, :kv_seq]))
        out = reference_attention(q, k, v, scale=1.0 / spec.head_dim, causal=spec.causal)  # 1/d, not 1/sqrt(d)
        self._o[site][:q_seq].copy_(out)
        return 0


class InterleavedGqaBackend(TorchSdpaBackend):
    """Maps query head h to K/V head h % Hkv instead of h // group: wrong whenever 1 < Hkv < Hq."""

    def run(self, site, layer_idx, q_seq, *, kv_seq=None, stream=0):
        spec, kv_seq = self._resolve_seqs(site, layer_idx, q_seq, kv_seq)
        group = spec.num_q_heads // spec.num_kv_heads
        k = self._k[site][layer_idx, :kv_seq].float().repeat(1, group, 1)
        v = self._v[site][layer_idx, :kv_seq].float().repeat(1, group, 1)
        q = self._q[site][:q_seq].float()
        self._o[site][:q_seq].copy_(reference_attention(q, k, v, scale=spec.softmax_scale, causal=spec.causal))
        return 0


class IgnoresKvSeqBackend(TorchSdpaBackend):
    def run(self, site, layer_idx, q_seq, *, kv_seq=None, stream=0):
        return super().run(site, layer_idx, q_seq, kv_seq=None, stream=stream)


class SharedKvBackend(TorchSdpaBackend):
    """Every layer reads layer 0's K/V."""

    def run(self, site, layer_idx, q_seq, *, kv_seq=None, stream=0):
        return super().run(site, 0, q_seq, kv_seq=kv_seq, stream=stream)


class SkipsOutputBackend(TorchSdpaBackend):
    def run(self, site, layer_idx, q_seq, *, kv_seq=None, stream=0):
        return 0


@pytest.mark.parametrize(
    "broken, expect",
    [
        (WrongScaleBackend, "FAIL site='prefix' layer=0"),
        (InterleavedGqaBackend, "FAIL site='suffix' layer=0"),
        (IgnoresKvSeqBackend, "FAIL site='suffix' layer=0 q_seq=4 kv_seq=19"),
        (SharedKvBackend, "FAIL site='suffix' layer=1"),
        (SkipsOutputBackend, "non-finite output from row 0"),
    ],
)
def test_checker_catches_broken_backends(broken, expect):
    spec = small_spec()
    with pytest.raises(AssertionError) as info:
        check_attention_backend(broken(spec), spec, dtype=torch.float32, device="cpu")
    assert expect in str(info.value)
    assert "cases within tolerance" in str(info.value)


def test_interleaved_gqa_only_differs_where_groups_matter():
    """Sanity of the broken backend itself: with MQA (Hkv=1) the two mappings coincide, so the
    checker must pass it there - the failure above is about GQA, not a bug in the test double."""
    spec = AttentionSpec().add_site("mqa", num_layers=1, num_q_heads=4, num_kv_heads=1, head_dim=8, max_q_seq=6)
    check_attention_backend(InterleavedGqaBackend(spec), spec, dtype=torch.float32, device="cpu")


def test_checker_reports_accessor_mismatch():
    spec = small_spec()

    class LiesAboutHeads(TorchSdpaBackend):
        def num_kv_heads(self, site):
            return 1

    with pytest.raises(AssertionError, match=r"num_kv_heads\('suffix'\) = 1, spec says 2"):
        check_attention_backend(LiesAboutHeads(spec), spec, device="cpu")


def test_checker_rejects_non_backend():
    with pytest.raises(AssertionError, match="missing sites, get_slot_ptrs, run"):
        check_attention_backend(object(), small_spec(), device="cpu")


def test_importing_backend_modules_is_light():
    code = (
        "import sys; import flash_rt.hardware.backend, flash_rt.hardware.sdpa_backend, flash_rt.testing, "
        "flash_rt.hardware.rtx.attn_backend, flash_rt.hardware.rtx.attn_backend_groot; "
        "bad = [m for m in ('torch', 'jax', 'cuda.bindings.runtime') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_backend_on_cuda(dtype):
    spec = small_spec()
    check_attention_backend(TorchSdpaBackend(spec, device="cuda", dtype=dtype), spec, dtype=dtype)


@gpu
@pytest.mark.gpu
def test_reference_backend_on_side_stream():
    spec = small_spec()
    backend = TorchSdpaBackend(spec, device="cuda", dtype=torch.bfloat16)
    slots = backend.slot_tensors("prefix", 0)
    for key in "QKV":
        slots[key].copy_(torch.randn(slots[key].shape, device="cuda"))
    backend.run("prefix", 0, 19)
    expected = slots["O"].clone()
    slots["O"].fill_(float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    backend.run("prefix", 0, 19, stream=side.cuda_stream)
    side.synchronize()
    torch.testing.assert_close(slots["O"], expected)


def test_checker_rejects_dtype_mismatch():
    spec = small_spec()
    with pytest.raises(AssertionError, match="slots are torch.float32"):
        check_attention_backend(TorchSdpaBackend(spec, dtype=torch.float32), spec, dtype="bf16", device="cpu")


# -- RTX FA2 backend, with host memory and a fake flash_rt_fa2 (the real one is tested on GPU) -------


class HostSlot:
    """Stands in for a CudaBuffer: a CPU tensor with .ptr / .free()."""

    def __init__(self, shape, dtype):
        self.tensor = torch.zeros(shape, dtype=dtype)
        self.ptr = self.tensor.data_ptr()

    def free(self):
        self.tensor = None


class FakeFa2:
    """The seed's fwd_bf16/fwd_fp16 contract on host pointers, computed with torch."""

    def __init__(self):
        self.calls = []

    def _fwd(self, dtype, Q, K, V, O, softmax_lse,  # noqa: E741 (the seed's names)
             softmax_lse_accum=0, o_accum=0, *, batch, seqlen_q, seqlen_k,
             num_heads_q, num_heads_kv, head_dim, q_strides, k_strides, v_strides, o_strides, softmax_scale=1.0,
             num_sms=0, stream=0):
        from flash_rt.testing import _tensor_at

        self.calls.append(dict(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, q_strides=q_strides,
                               k_strides=k_strides, softmax_scale=softmax_scale, stream=stream, lse=softmax_lse))
        cpu = torch.device("cpu")

        def rows(ptr, strides, seq, heads):
            flat = _tensor_at(ptr, (strides[0] * batch,), dtype, cpu)
            return flat.as_strided((batch, seq, heads, head_dim), (strides[0], strides[1], strides[2], 1))

        q = rows(Q, q_strides, seqlen_q, num_heads_q)
        k = rows(K, k_strides, seqlen_k, num_heads_kv)
        v = rows(V, v_strides, seqlen_k, num_heads_kv)
        o = rows(O, o_strides, seqlen_q, num_heads_q)
        for b in range(batch):
            o[b].copy_(reference_attention(q[b], k[b], v[b], scale=softmax_scale, causal=False))
        return 0

    def fwd_bf16(self, *args, **kwargs):
        return self._fwd(torch.bfloat16, *args, **kwargs)

    def fwd_fp16(self, *args, **kwargs):
        return self._fwd(torch.float16, *args, **kwargs)


def host_rtx(cls, spec, dtype="bf16"):
    class HostRtx(cls):
        def _allocate(self, site):
            dt = torch.bfloat16 if self.dtype_name == "bfloat16" else torch.float16
            q_shape = (site.max_q_seq, site.num_q_heads, site.head_dim)
            kv_shape = (site.num_layers, site.kv_capacity, site.num_kv_heads, site.head_dim)
            return {"Q": HostSlot(q_shape, dt), "O": HostSlot(q_shape, dt), "K": HostSlot(kv_shape, dt),
                    "V": HostSlot(kv_shape, dt), "lse": HostSlot((site.num_q_heads, site.max_q_seq), torch.float32)}

    backend = HostRtx(spec, dtype=dtype)
    backend._fa2 = FakeFa2()
    return backend


def non_causal_spec():
    return (
        AttentionSpec()
        .add_site("prefix", num_layers=2, num_q_heads=4, num_kv_heads=1, head_dim=32, max_q_seq=19)
        .add_site("suffix", num_layers=3, num_q_heads=8, num_kv_heads=2, head_dim=16, max_q_seq=7, max_kv_seq=26)
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rtx_backend_plumbing_passes_checker_with_fake_fa2(dtype, monkeypatch):
    """Pointers, per-layer offsets, strides, lengths and scale reach FA2 as the seed describes."""
    from flash_rt.hardware.rtx.attn_backend import RtxFlashAttnBackend

    monkeypatch.delenv("FVK_RTX_FA2", raising=False)
    spec = non_causal_spec()
    backend = host_rtx(RtxFlashAttnBackend, spec, dtype)
    assert isinstance(backend, AttentionBackend)
    check_attention_backend(backend, spec, device="cpu")
    call = backend._fa2.calls[-1]
    assert call["batch"] == 1 and call["q_strides"] == (7 * 8 * 16, 8 * 16, 16)
    assert call["k_strides"] == (26 * 2 * 16, 2 * 16, 16)
    assert call["softmax_scale"] == pytest.approx(16**-0.5)


def test_rtx_groot_backend_sites_and_dit_mapping():
    from flash_rt.hardware.rtx.attn_backend_groot import RtxFlashAttnBackendGroot, groot_attention_spec

    spec = groot_attention_spec(vision_layers=2, vision_tokens=8, llm_layers=2, max_vl_tokens=12, dit_layers=4,
                                max_action_tokens=5)
    backend = host_rtx(RtxFlashAttnBackendGroot, spec)
    assert backend.sites() == ("vision", "llm", "dit_cross", "dit_self")
    assert [RtxFlashAttnBackendGroot.dit_site(b) for b in range(4)] == [
        ("dit_cross", 0), ("dit_self", 0), ("dit_cross", 1), ("dit_self", 1)]
    assert (backend.num_q_heads("llm"), backend.num_kv_heads("llm"), backend.head_dim("vision")) == (16, 8, 72)
    check_attention_backend(backend, spec, device="cpu")
    with pytest.raises(ConfigError, match="dit_layers must be even"):
        groot_attention_spec(dit_layers=3)


def test_rtx_backend_refuses_what_fa2_cannot_do():
    from flash_rt.hardware.rtx.attn_backend import RtxFlashAttnBackend

    with pytest.raises(ConfigError, match="causal"):
        RtxFlashAttnBackend(small_spec())
    with pytest.raises(ConfigError, match="bf16 or fp16"):
        RtxFlashAttnBackend(non_causal_spec(), dtype="fp32")
    odd = AttentionSpec().add_site("s", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=12, max_q_seq=3)
    with pytest.raises(ConfigError, match="multiple of 8"):
        RtxFlashAttnBackend(odd)


def test_rtx_backend_missing_kernels_is_a_clear_error(monkeypatch):
    from flash_rt.hardware.rtx.attn_backend import RtxFlashAttnBackend

    monkeypatch.delenv("FVK_RTX_FA2", raising=False)
    backend = host_rtx(RtxFlashAttnBackend, non_causal_spec())
    backend._fa2 = None
    monkeypatch.setitem(sys.modules, "flash_rt.flash_rt_fa2", None)  # import fails like a missing build
    with pytest.raises(HardwareError, match="flashrt-kernels"):
        backend.run("prefix", 0, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_rtx_backend_without_gpu_is_hardware_error():
    from flash_rt.hardware.rtx.attn_backend import RtxFlashAttnBackend

    with pytest.raises(HardwareError, match="no usable CUDA device"):
        RtxFlashAttnBackend(non_causal_spec())


def test_deprecated_aliases_warn_and_resolve():
    from flash_rt.hardware.rtx import attn_backend, attn_backend_groot

    with pytest.warns(DeprecationWarning, match="RtxFlashAttnBackend"):
        assert attn_backend.TorchFlashAttnBackend is attn_backend.RtxFlashAttnBackend
    with pytest.warns(DeprecationWarning, match="RtxFlashAttnBackendGroot"):
        assert attn_backend_groot.TorchFlashAttnBackendGroot is attn_backend_groot.RtxFlashAttnBackendGroot


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rtx_backend_on_gpu_with_real_kernels(dtype):
    pytest.importorskip("flash_rt.flash_rt_fa2", reason="flashrt-kernels with flash_rt_fa2 not installed")
    from flash_rt.hardware.rtx.attn_backend import RtxFlashAttnBackend

    # Pi0.5-like shapes: SigLIP (16 x 72), prefix MQA (8 x 256), suffix over prefix + own block.
    spec = (
        AttentionSpec()
        .add_site("vision", num_layers=2, num_q_heads=16, num_kv_heads=16, head_dim=72, max_q_seq=256)
        .add_site("prefix", num_layers=2, num_q_heads=8, num_kv_heads=1, head_dim=256, max_q_seq=97)
        .add_site("suffix", num_layers=2, num_q_heads=8, num_kv_heads=1, head_dim=256, max_q_seq=51,
                  max_kv_seq=148)
    )
    report = check_attention_backend(RtxFlashAttnBackend(spec, dtype=dtype), spec, device="cuda")
    print(report.summary())
