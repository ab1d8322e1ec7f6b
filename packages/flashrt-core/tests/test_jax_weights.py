"""Jax side of the loader on numpy param trees (jax itself not needed), FP8 bit encoding
checked against torch's float8_e4m3fn, and the CudaBuffer sinks against a host fake."""

import sys
import types

import numpy as np
import pytest

from flash_rt.errors import CheckpointError, ConfigError
from flash_rt.executors.jax_weights import (
    Astype,
    Contiguous,
    CudaBufferAttr,
    CudaBufferFlat,
    JaxQuant,
    NumpyAttr,
    NumpyConcat,
    NumpyList,
    NumpyReshape,
    OrbaxDictSource,
    Transpose,
    flat_pack,
    fp8_e4m3_bits,
    quantize_fp8_e4m3_numpy,
)
from flash_rt.executors.weight_loader import Item, LayerBlock, ModelWeightSpec, WeightLoader


class Target:
    pass


def rng(seed=0):
    return np.random.default_rng(seed)


def openpi_like_tree(n_layers=3, heads=2, width=8, head_dim=4, seed=0):
    r = rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "PaliGemma": {
            "llm": {
                "layers": {
                    "attn": {
                        "q_einsum": {"w": f(n_layers, heads, width, head_dim)},
                        "kv_einsum": {"w": f(n_layers, 2, 1, width, head_dim)},
                    },
                    "pre_attention_norm": {"scale": {"value": f(n_layers, width)}},  # nnx wrapper
                },
                "final_norm": {"scale": f(width)},
            }
        }
    }


def test_source_flattens_tree_and_unwraps_value():
    tree = openpi_like_tree()
    src = OrbaxDictSource(tree)
    assert sorted(src.keys()) == [
        "PaliGemma/llm/final_norm/scale",
        "PaliGemma/llm/layers/attn/kv_einsum/w",
        "PaliGemma/llm/layers/attn/q_einsum/w",
        "PaliGemma/llm/layers/pre_attention_norm/scale",
    ]
    m = src.meta("PaliGemma/llm/layers/attn/kv_einsum/w[1,0]")
    assert m.shape == (1, 8, 4) and m.dtype == "float32"
    stripped = OrbaxDictSource({"params": tree}, strip_prefix="params/")
    assert "PaliGemma/llm/final_norm/scale" in stripped
    with pytest.raises(CheckpointError, match="'a/b' is a str"):
        OrbaxDictSource({"a": {"b": "nope"}})


def test_openpi_style_spec_loads_stacked_layers_exactly():
    tree = openpi_like_tree()
    layers = tree["PaliGemma"]["llm"]["layers"]
    spec = ModelWeightSpec(
        [
            LayerBlock(
                "n",
                [
                    # q: (heads, width, hd) -> [width, heads*hd]; k, v: (1, width, hd) -> [width, hd]
                    Item(
                        [
                            "{L}/attn/q_einsum/w[{i}]",
                            "{L}/attn/kv_einsum/w[{i},0]",
                            "{L}/attn/kv_einsum/w[{i},1]",
                        ],
                        [
                            Transpose((1, 0, 2), on=(0,)),
                            Transpose((1, 0, 2), on=(1, 2)),
                            NumpyReshape(("width", -1)),
                            NumpyConcat(axis=1),
                            Astype("float16"),
                            Contiguous(),
                        ],
                        NumpyList("qkv"),
                        dtype="float32",
                    ),
                    Item("{L}/pre_attention_norm/scale[{i}]", [], NumpyAttr("norm_{i}"), shape=("width",)),
                ],
            ),
            Item("PaliGemma/llm/final_norm/scale", [], NumpyAttr("final_norm")),
        ],
        params={"n": 3, "L": "PaliGemma/llm/layers", "width": 8},
    )
    t = Target()
    loader = WeightLoader(OrbaxDictSource(tree), spec, t, unused="error")
    loader.run()
    for i in range(3):
        q = layers["attn"]["q_einsum"]["w"][i].transpose(1, 0, 2).reshape(8, -1)
        k = layers["attn"]["kv_einsum"]["w"][i, 0].transpose(1, 0, 2).reshape(8, -1)
        v = layers["attn"]["kv_einsum"]["w"][i, 1].transpose(1, 0, 2).reshape(8, -1)
        expect = np.concatenate([q, k, v], axis=1).astype(np.float16)
        assert t.qkv[i].dtype == np.float16 and t.qkv[i].flags.c_contiguous
        np.testing.assert_array_equal(t.qkv[i], expect)
        np.testing.assert_array_equal(
            getattr(t, f"norm_{i}"), layers["pre_attention_norm"]["scale"]["value"][i]
        )
    np.testing.assert_array_equal(t.final_norm, tree["PaliGemma"]["llm"]["final_norm"]["scale"])


def test_missing_stacked_key_and_too_many_layers():
    tree = openpi_like_tree(n_layers=2)
    spec = ModelWeightSpec(
        [LayerBlock(3, [Item("PaliGemma/llm/layers/attn/q_einsum/w[{i}]", [], NumpyList("q"))])]
    )
    with pytest.raises(CheckpointError, match=r"takes \[2\] of 'PaliGemma/llm/layers/attn/q_einsum/w'"):
        WeightLoader(OrbaxDictSource(tree), spec, Target(), unused="ignore").run()
    spec = ModelWeightSpec([Item("PaliGemma/llm/final_norm/scales", [], NumpyAttr("x"))])
    with pytest.raises(CheckpointError, match="closest present: 'PaliGemma/llm/final_norm/scale'"):
        WeightLoader(OrbaxDictSource(tree), spec, Target(), unused="ignore").run()


def test_transpose_default_and_astype_bf16():
    x = rng(1).standard_normal((3, 5)).astype(np.float32)
    t = Target()
    WeightLoader(
        OrbaxDictSource({"x": x}), ModelWeightSpec([Item("x", [Transpose()], NumpyAttr("y"))]), t
    ).run()
    np.testing.assert_array_equal(t.y, x.T)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    WeightLoader(
        OrbaxDictSource({"x": x}), ModelWeightSpec([Item("x", [Astype("bf16")], NumpyAttr("b"))]), t
    ).run()
    assert t.b.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(t.b, x.astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------------------------
# FP8


def fp8_test_values():
    r = rng(7)
    mags = [r.standard_normal(2000) * 10.0 ** r.uniform(-4, 2.6, 2000)]
    special = [0.0, -0.0, 448.0, -448.0, 2.0**-6, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 2.0**-7 * 1.0625, 1.0625, 1.1875,
               17.0, 19.0, 240.0, 232.0, 440.0, 447.9]  # fmt: skip
    v = np.concatenate(mags + [np.array(special)]).astype(np.float32)
    return np.clip(v, -448, 448)


def test_fp8_bits_match_torch_float8_e4m3fn():
    torch = pytest.importorskip("torch")
    v = fp8_test_values()
    ours = fp8_e4m3_bits(v)
    ref = torch.from_numpy(v).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    bad = np.nonzero(ours != ref)[0]
    assert bad.size == 0, [(float(v[j]), int(ours[j]), int(ref[j])) for j in bad[:5]]


def test_fp8_bits_decode_back_exactly_on_representable_values():
    # every finite E4M3 value encodes to its own bits
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)
    exp, man, sign = (codes >> 3) & 0xF, codes & 7, np.where(codes & 0x80, -1.0, 1.0)
    vals = sign * np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp.astype(float) - 7))
    np.testing.assert_array_equal(fp8_e4m3_bits(vals.astype(np.float32)), codes)


def test_jax_quant_matches_torch_quant():
    torch = pytest.importorskip("torch")
    from flash_rt.executors.torch_weights import quantize_fp8_e4m3

    for seed in range(3):
        x = (rng(seed).standard_normal((33, 17)) * (seed + 0.3)).astype(np.float32)
        bits, scale = quantize_fp8_e4m3_numpy(x)
        q_t, scale_t = quantize_fp8_e4m3(torch.from_numpy(x))
        assert scale == scale_t == float(np.abs(x).max()) / 448.0
        np.testing.assert_array_equal(bits, q_t.view(torch.uint8).numpy())


def test_jax_quant_records_scales():
    r = rng(3)
    stacked = (r.standard_normal((3, 8, 4)) * np.array([1.0, 5.0, 0.2])[:, None, None]).astype(np.float32)
    spec = ModelWeightSpec(
        [LayerBlock(3, [Item("w[{i}]", [JaxQuant("_w_scales", scale_attr="s{i}")], NumpyList("q"))])]
    )
    t = Target()
    WeightLoader(OrbaxDictSource({"w": stacked}), spec, t).run()
    for i in range(3):
        expect_scale = float(np.abs(stacked[i]).max()) / 448.0
        assert t._w_scales[i] == expect_scale == getattr(t, f"s{i}")
        assert t.q[i].dtype == np.uint8
        np.testing.assert_array_equal(
            t.q[i], fp8_e4m3_bits(np.clip(stacked[i] / np.float32(expect_scale), -448, 448))
        )
    with pytest.raises(ConfigError):
        JaxQuant()
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8_e4m3_numpy(np.array([np.inf], dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# CudaBuffer sinks


class FakeCudaBuffer:
    """Host stand-in with CudaBuffer.from_numpy's signature: records the upload (a copy)."""

    uploads = []

    def __init__(self, arr, dtype, device):
        self.host, self.dtype, self.device = arr.copy(), dtype, device

    @classmethod
    def from_numpy(cls, array, dtype=None, device=0):
        assert array.flags.c_contiguous
        cls.uploads.append((array.shape, dtype, device))
        return cls(array, dtype, device)


@pytest.fixture
def fake_cuda_buffer(monkeypatch):
    mod = types.ModuleType("flash_rt.core.cuda_buffer")
    mod.CudaBuffer = FakeCudaBuffer
    FakeCudaBuffer.uploads = []
    monkeypatch.setitem(sys.modules, "flash_rt.core.cuda_buffer", mod)
    return FakeCudaBuffer


def test_flat_pack_offsets_and_alignment():
    parts = [rng(i).standard_normal((i + 1, 3)).astype(np.float16) for i in range(3)]
    flat, offsets = flat_pack(parts, align=8)
    assert (
        offsets == [(0, (1, 3)), (8, (2, 3)), (16, (3, 3))]
        and flat.shape == (25,)
        and flat.dtype == np.float16
    )
    for (off, shape), p in zip(offsets, parts, strict=True):
        np.testing.assert_array_equal(flat[off : off + p.size].reshape(shape), p)


def test_cuda_buffer_sinks_with_host_fake(fake_cuda_buffer):
    r = rng(5)
    ck = {f"l{i}": r.standard_normal((4, i + 2)).astype(np.float32) for i in range(3)}
    spec = ModelWeightSpec(
        [
            Item("l0", [Transpose()], CudaBufferAttr("l0_dev")),
            Item("l1", [JaxQuant("_s")], CudaBufferAttr("l1_fp8", dtype="float8_e4m3", device=1)),
            LayerBlock(
                3, [Item("l{i}", [Astype("float16")], CudaBufferFlat("flat", offsets_attr="flat_offs"))]
            ),
        ]
    )
    t = Target()
    WeightLoader(OrbaxDictSource(ck), spec, t).run()
    np.testing.assert_array_equal(t.l0_dev.host, ck["l0"].T)
    np.testing.assert_array_equal(t.l1_fp8.host, quantize_fp8_e4m3_numpy(ck["l1"])[0])
    assert (t.l1_fp8.dtype, t.l1_fp8.device) == ("float8_e4m3", 1)
    # one upload each for the attrs, one for the whole flat buffer
    assert [u[0] for u in fake_cuda_buffer.uploads] == [(2, 4), (4, 3), (4 * 2 + 4 * 3 + 4 * 4,)]
    for (off, shape), i in zip(t.flat_offs, range(3), strict=True):
        part = t.flat.host[off : off + int(np.prod(shape))].reshape(shape)
        np.testing.assert_array_equal(part, ck[f"l{i}"].astype(np.float16))


def test_cuda_buffer_flat_rejects_mixed_dtypes(fake_cuda_buffer):
    ck = {"a": np.ones(2, np.float32) * 0.5, "b": np.ones(2, np.float16)}
    with pytest.raises(CheckpointError, match="cast first"):
        WeightLoader(
            OrbaxDictSource(ck), ModelWeightSpec([Item(["a", "b"], [], CudaBufferFlat("f"))]), Target()
        ).run()


def _real_cuda_buffer_or_skip():
    try:
        from flash_rt.core.cuda_buffer import CudaBuffer, cuda_device_count
    except ImportError:
        pytest.skip("flash_rt.core.cuda_buffer is not in this tree yet (written by the runtime helper)")
    try:
        if cuda_device_count() < 1:
            pytest.skip("needs a CUDA device")
    except Exception as e:  # no driver / no cuda-python
        pytest.skip(f"needs a CUDA device ({e})")
    return CudaBuffer


@pytest.mark.gpu
def test_cuda_buffer_sinks_upload_to_device():
    CudaBuffer = _real_cuda_buffer_or_skip()
    r = rng(9)
    ck = {
        "x": r.standard_normal((16, 8)).astype(np.float32),
        "y": r.standard_normal((5, 3)).astype(np.float32),
    }
    spec = ModelWeightSpec(
        [
            Item("x", [], CudaBufferAttr("x_dev")),
            Item("x", [JaxQuant("_s")], CudaBufferAttr("x_fp8", dtype="float8_e4m3")),
            Item(["x", "y"], [Astype("float16")], CudaBufferFlat("flat", align=8)),
        ]
    )
    t = Target()
    WeightLoader(OrbaxDictSource(ck), spec, t).run()
    assert isinstance(t.x_dev, CudaBuffer)
    np.testing.assert_array_equal(t.x_dev.to_numpy(), ck["x"])
    np.testing.assert_array_equal(t.x_fp8.to_numpy(raw=True), quantize_fp8_e4m3_numpy(ck["x"])[0])
    flat = t.flat.to_numpy()
    for (off, shape), key in zip(t.flat_offsets, ["x", "y"], strict=True):
        np.testing.assert_array_equal(
            flat[off : off + int(np.prod(shape))].reshape(shape), ck[key].astype(np.float16)
        )


def test_orbax_checkpoint_path_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = {"a": {"w": rng(2).standard_normal((3, 4)).astype(np.float32)}}
    ocp.PyTreeCheckpointer().save(tmp_path / "params", tree)
    src = OrbaxDictSource(tmp_path / "params")
    np.testing.assert_array_equal(src.read("a/w"), tree["a"]["w"])


def test_orbax_bad_path_is_a_clear_error(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="cannot restore as an orbax checkpoint"):
        OrbaxDictSource(tmp_path / "junk")


def test_orbax_path_without_orbax_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax", None)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ConfigError, match=r"flashrt-core\[jax\]"):
        OrbaxDictSource(tmp_path)
