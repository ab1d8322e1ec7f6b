"""The declarative loader itself: templates, checks before reads, errors, leftovers, progress."""

import subprocess
import sys
import time
import warnings

import pytest

torch = pytest.importorskip("torch")

from flash_rt.errors import CheckpointError, ConfigError  # noqa: E402
from flash_rt.executors.torch_weights import Attr, DictSource, TensorList, ToFp32, tT  # noqa: E402
from flash_rt.executors.weight_loader import (  # noqa: E402
    ElementwiseTransform,
    Item,
    LayerBlock,
    ModelWeightSpec,
    WeightLoader,
    canonical_dtype,
)


class Target:
    pass


def rand(*shape, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 10_000)
    return torch.randn(*shape, generator=g).to(dtype)


def toy_checkpoint(n_layers=3, hidden=8):
    ck = {"embed.weight": rand(16, hidden, seed=1), "final_norm.weight": rand(hidden, seed=2)}
    for i in range(n_layers):
        ck[f"layers.{i}.q.weight"] = rand(hidden, hidden, seed=10 + i)
        ck[f"layers.{i}.norm.weight"] = rand(hidden, seed=20 + i)
    return ck


def toy_spec(n_layers=3):
    return ModelWeightSpec(
        [
            Item("embed.weight", [], Attr("embed"), shape=(16, "hidden"), dtype="float32"),
            LayerBlock(
                "num_layers",
                [
                    Item("{layer}.q.weight", [tT()], TensorList("q_w")),
                    Item("{layer}.norm.weight", [], Attr("norm_{i}")),
                ],
                params={"layer": "layers.{i}"},
            ),
            Item("final_norm.weight", [], Attr("final_norm")),
        ],
        params={"num_layers": n_layers, "hidden": 8},
        name="toy",
    )


def test_plan_resolves_templates_nested_blocks_and_params():
    spec = ModelWeightSpec(
        [
            LayerBlock(
                2,
                [LayerBlock("experts", [Item("{blk}.e{j}.w", [], Attr("x"))], var="j")],
                start=1,
                params={"blk": "{root}.b{i}"},
            )
        ],
        params={"root": "m", "experts": 2},
    )
    assert spec.source_keys() == ["m.b1.e0.w", "m.b1.e1.w", "m.b2.e0.w", "m.b2.e1.w"]
    # loader params override spec params
    assert spec.source_keys({"root": "z", "experts": 1}) == ["z.b1.e0.w", "z.b2.e0.w"]


def test_unknown_template_parameter_is_a_config_error_listing_known_ones():
    spec = ModelWeightSpec([Item("{prefx}.w", [], Attr("w"))], params={"prefix": "m"})
    with pytest.raises(ConfigError, match=r"\{prefx\}.*prefix"):
        spec.plan()


def test_item_needs_a_sink_and_real_transforms():
    with pytest.raises(ConfigError, match="sink"):
        Item("a", [])
    with pytest.raises(ConfigError, match="not a transform"):
        Item("a", [lambda x: x], Attr("a"))


def test_load_stores_exact_tensors_on_target():
    ck = toy_checkpoint()
    t = Target()
    report = WeightLoader(DictSource(ck), toy_spec(), t, unused="error").run()
    assert torch.equal(t.embed, ck["embed.weight"])
    assert len(t.q_w) == 3
    for i in range(3):
        expect = ck[f"layers.{i}.q.weight"].t()
        assert torch.equal(t.q_w[i], expect) and t.q_w[i].is_contiguous()
        assert torch.equal(getattr(t, f"norm_{i}"), ck[f"layers.{i}.norm.weight"])
    assert torch.equal(t.final_norm, ck["final_norm.weight"])
    assert report.items_loaded == 8 and report.tensors_read == 8 and report.unused_keys == []


class CountingSource(DictSource):
    def __init__(self, d):
        super().__init__(d)
        self.reads = []

    def _read(self, name, index):
        self.reads.append(name)
        return super()._read(name, index)


def test_missing_key_names_key_and_closest_present_and_reads_nothing():
    ck = toy_checkpoint()
    ck["layers.2.q_proj.weight"] = ck.pop("layers.2.q.weight")
    src = CountingSource(ck)
    with pytest.raises(CheckpointError) as ei:
        WeightLoader(src, toy_spec(), Target()).run()
    msg = str(ei.value)
    assert "'layers.2.q.weight'" in msg and "closest present" in msg and "layers.2.q_proj.weight" in msg
    assert src.reads == []  # checked before any data was read


def test_shape_mismatch_names_key_expected_and_found():
    ck = toy_checkpoint()
    ck["embed.weight"] = rand(16, 9)
    with pytest.raises(CheckpointError) as ei:
        WeightLoader(DictSource(ck), toy_spec(), Target()).run()
    msg = str(ei.value)
    assert "'embed.weight'" in msg and "expected shape (16, 8)" in msg and "found (16, 9)" in msg


def test_dtype_mismatch_names_key_expected_and_found():
    ck = toy_checkpoint()
    ck["embed.weight"] = ck["embed.weight"].bfloat16()
    with pytest.raises(CheckpointError, match=r"'embed.weight'.*expected dtype float32, found bfloat16"):
        WeightLoader(DictSource(ck), toy_spec(), Target()).run()


def test_wildcard_shape_and_per_key_shapes():
    ck = {"a": rand(3, 5), "b": rand(4)}
    spec = ModelWeightSpec([Item(["a", "b"], [], TensorList("ab"), shape=[(None, 5), (4,)])])
    t = Target()
    WeightLoader(DictSource(ck), spec, t).run()
    assert torch.equal(t.ab[0], ck["a"]) and torch.equal(t.ab[1], ck["b"])
    # a 2-D wildcard for one key is a shape, not two per-key shapes
    WeightLoader(
        DictSource(ck), ModelWeightSpec([Item("a", [], Attr("a"), shape=(None, None))]), t, unused="ignore"
    ).run()
    with pytest.raises(CheckpointError, match=r"'b': expected shape \(\*, \*\), found \(4,\)"):
        WeightLoader(DictSource(ck), ModelWeightSpec([Item("b", [], Attr("b"), shape=(None, None))]), t).run()
    bad = ModelWeightSpec([Item(["a", "b"], [], TensorList("ab"), shape=[(None, 6), (4,)])])
    with pytest.raises(CheckpointError, match=r"expected shape \(\*, 6\), found \(3, 5\)"):
        WeightLoader(DictSource(ck), bad, Target()).run()


def test_optional_item_is_skipped_when_absent_and_loaded_when_present():
    spec = ModelWeightSpec([Item("a", [], Attr("a")), Item("bias", [], Attr("bias"), optional=True)])
    t = Target()
    rep = WeightLoader(DictSource({"a": rand(2)}), spec, t).run()
    assert rep.skipped_optional == ["bias"] and not hasattr(t, "bias")
    ck = {"a": rand(2), "bias": rand(3)}
    rep = WeightLoader(DictSource(ck), spec, t).run()
    assert rep.skipped_optional == [] and torch.equal(t.bias, ck["bias"])


def test_unused_keys_policies():
    ck = toy_checkpoint()
    ck["lm_head.weight"] = rand(2, 2)
    ck["extra.thing"] = rand(2)
    loader = WeightLoader(DictSource(ck), toy_spec(), Target())
    with pytest.warns(UserWarning, match="2 checkpoint key"):
        rep = loader.run()
    assert loader.unused_keys() == ["extra.thing", "lm_head.weight"] == rep.unused_keys

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WeightLoader(DictSource(ck), toy_spec(), Target(), unused="ignore").run()

    with pytest.raises(CheckpointError, match="extra.thing"):
        WeightLoader(DictSource(ck), toy_spec(), Target(), unused="error").run()

    spec = toy_spec()
    spec.ignore_unused = ("lm_head.*",)
    loader = WeightLoader(DictSource(ck), spec, Target(), unused="ignore")
    loader.run()
    assert loader.unused_keys() == ["extra.thing"]


def test_transform_failure_is_a_checkpoint_error_with_key_and_layer():
    class Explode(ElementwiseTransform):
        def one(self, x, ctx):
            if ctx.scope["i"] == 1:
                raise RuntimeError("boom")
            return x

    spec = ModelWeightSpec([LayerBlock(3, [Item("layers.{i}.q.weight", [Explode()], TensorList("q"))])])
    with pytest.raises(CheckpointError, match=r"layers\.1\.q\.weight \(layer 1\).*Explode.*boom"):
        WeightLoader(DictSource(toy_checkpoint()), spec, Target(), unused="ignore").run()


def test_multi_index_keys():
    kv = rand(3, 2, 4, 5)
    spec = ModelWeightSpec(
        [LayerBlock(3, [Item(["kv[{i},0]", "kv[{i}, 1]"], [], TensorList("kv"), shape=(4, 5))])]
    )
    t = Target()
    WeightLoader(DictSource({"kv": kv}), spec, t).run()
    assert all(torch.equal(t.kv[2 * i + j], kv[i, j]) for i in range(3) for j in range(2))
    with pytest.raises(CheckpointError, match=r"takes \[0, 2\] of 'kv'"):
        WeightLoader(DictSource({"kv": kv}), ModelWeightSpec([Item("kv[0,2]", [], Attr("x"))]), t).run()


def test_stacked_index_keys_take_one_row():
    stacked = rand(4, 3, 2)
    spec = ModelWeightSpec([LayerBlock(4, [Item("blk/kernel[{i}]", [ToFp32()], TensorList("k"))])])
    t = Target()
    loader = WeightLoader(DictSource({"blk/kernel": stacked}), spec, t)
    loader.run()
    assert len(t.k) == 4 and all(torch.equal(t.k[i], stacked[i]) for i in range(4))
    assert loader.unused_keys() == []
    spec5 = ModelWeightSpec([LayerBlock(5, [Item("blk/kernel[{i}]", [], TensorList("k"))])])
    with pytest.raises(CheckpointError, match=r"takes \[4\] of 'blk/kernel'.*\(4, 3, 2\)"):
        WeightLoader(DictSource({"blk/kernel": stacked}), spec5, Target()).run()


class Slow(ElementwiseTransform):
    def one(self, x, ctx):
        time.sleep(0.05)
        return x


def test_progress_bar_only_for_slow_loads(capsys, monkeypatch):
    monkeypatch.setattr(WeightLoader, "PROGRESS_DELAY_S", 0.1)
    spec = ModelWeightSpec([LayerBlock(3, [Item("layers.{i}.q.weight", [], TensorList("q"))])], name="toy")
    WeightLoader(DictSource(toy_checkpoint()), spec, Target(), unused="ignore").run()
    assert "loading toy" not in capsys.readouterr().err  # fast: no bar

    slow = ModelWeightSpec(
        [LayerBlock(3, [Item("layers.{i}.q.weight", [Slow()], TensorList("q"))])], name="toy"
    )
    WeightLoader(DictSource(toy_checkpoint()), slow, Target(), unused="ignore").run()
    assert "loading toy" in capsys.readouterr().err

    WeightLoader(DictSource(toy_checkpoint()), slow, Target(), unused="ignore", progress=False).run()
    assert "loading toy" not in capsys.readouterr().err


def test_bad_loader_options():
    with pytest.raises(ConfigError, match="unused"):
        WeightLoader(DictSource({}), toy_spec(), Target(), unused="shout")
    with pytest.raises(ConfigError, match="progress"):
        WeightLoader(DictSource({}), toy_spec(), Target(), progress="yes")


@pytest.mark.parametrize(
    "spelling, name",
    [
        ("bf16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("F32", "float32"),
        ("half", "float16"),
        ("e4m3", "float8_e4m3fn"),
    ],
)
def test_canonical_dtype(spelling, name):
    assert canonical_dtype(spelling) == name


def test_canonical_dtype_of_framework_types():
    import numpy as np

    assert canonical_dtype(torch.bfloat16) == "bfloat16"
    assert canonical_dtype(np.float32) == "float32"
    assert canonical_dtype(np.dtype("float16")) == "float16"


def test_importing_loader_modules_imports_no_torch_or_jax():
    code = (
        "import sys; import flash_rt.executors.weight_loader, flash_rt.executors.torch_weights, "
        "flash_rt.executors.jax_weights, flash_rt.core.quant.calibrator; "
        "bad = [m for m in ('torch', 'jax', 'orbax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dict_target_and_load_returns_it():
    ck = toy_checkpoint()
    weights = WeightLoader(DictSource(ck), toy_spec()).load()
    assert isinstance(weights, dict)
    assert torch.equal(weights["embed"], ck["embed.weight"]) and len(weights["q_w"]) == 3
    assert torch.equal(weights["norm_2"], ck["layers.2.norm.weight"])
    mine = {"q_w": []}
    assert WeightLoader(DictSource(ck), toy_spec(), mine).load() is mine and len(mine["q_w"]) == 3


def test_loading_twice_does_not_double_lists_or_scales():
    from flash_rt.executors.torch_weights import Quant

    ck = toy_checkpoint()
    spec = ModelWeightSpec(
        [LayerBlock(3, [Item("layers.{i}.q.weight", [Quant("_scales")], TensorList("q"))])]
    )
    t = Target()
    loader = WeightLoader(DictSource(ck), spec, t, unused="ignore")
    loader.run()
    first = list(t._scales)
    loader.run()
    WeightLoader(DictSource(ck), spec, t, unused="ignore").run()
    assert len(t.q) == 3 and t._scales == first


def test_closest_keys_prefix_typo_and_unrelated():
    from flash_rt.executors.weight_loader import closest_keys

    names = [
        f"pwe.paligemma.model.language_model.layers.{i}.{m}.weight"
        for i in range(18)
        for m in ("mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")
    ]
    # a prefix added or dropped
    assert closest_keys("model." + names[7], names) == [names[7]]
    assert closest_keys(names[7].removeprefix("pwe."), names) == [names[7]]
    # a renamed module keeps the layer
    got = closest_keys("pwe.paligemma.model.language_model.layers.6.ffn.up_proj.weight", names)
    assert got[0] == "pwe.paligemma.model.language_model.layers.6.mlp.up_proj.weight"
    assert closest_keys("something.else", names) == []
