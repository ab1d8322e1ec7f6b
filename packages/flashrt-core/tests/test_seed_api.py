"""Every symbol and signature of the stable API seed exists under the same path.

The seed text (tests/data/flashrt_stable_api.txt, a copy of shared/seed) is parsed here, so a
signature that drifts from it fails this test.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

SEED = (Path(__file__).parent / "data" / "flashrt_stable_api.txt").read_text()

# Names whose modules need the compiled kernels; checked only where those are installed.
NEEDS_KERNELS = {"flash_rt_kernels"}


def _block(start: str, end_pattern: str) -> str:
    i = SEED.index(start)
    m = re.compile(end_pattern, re.M).search(SEED, i)
    return SEED[i : m.end()]


def _seed_imports() -> list[tuple[str, str]]:
    """(module, name) for every `from flash_rt... import ...` statement in the seed."""
    pairs = []
    for m in re.finditer(r"^from (flash_rt[\w.]*) import (\([^)]*\)|[^\n]*)", SEED, re.M):
        module, names = m.group(1), m.group(2)
        names = re.sub(r"#[^\n]*", "", names).strip("() \n")
        for name in re.split(r"[,\s]+", names):
            if name:
                pairs.append((module, name))
    return pairs


SEED_IMPORTS = _seed_imports()


def test_seed_parses_all_import_groups():
    modules = {m for m, _ in SEED_IMPORTS}
    assert {"flash_rt.hardware", "flash_rt.hardware.backend", "flash_rt.core.cuda_buffer",
            "flash_rt.runtime.rtc", "flash_rt.executors.torch_weights",
            "flash_rt.executors.jax_weights"} <= modules
    assert len([n for m, n in SEED_IMPORTS if m == "flash_rt.executors.torch_weights"]) == 15
    assert len([n for m, n in SEED_IMPORTS if m == "flash_rt.executors.jax_weights"]) == 9


@pytest.mark.parametrize(("module", "name"), SEED_IMPORTS, ids=[f"{m}.{n}" for m, n in SEED_IMPORTS])
def test_seed_symbol_exists(module, name):
    if name in NEEDS_KERNELS:
        pytest.importorskip("flashrt_kernels", reason="flashrt-kernels not installed")
    if name == "flash_rt_fa2":
        pytest.importorskip("flashrt_kernels", reason="flashrt-kernels not installed")
        mod = importlib.import_module("flash_rt.flash_rt_fa2")
        assert callable(mod.fwd_bf16) and callable(mod.fwd_fp16)
        return
    mod = importlib.import_module(module)
    if not hasattr(mod, name):  # `from pkg import submodule` imports the submodule
        importlib.import_module(f"{module}.{name}")
    assert hasattr(mod, name), f"{module} lacks {name}"


def _params(fn_src: str) -> list[inspect.Parameter]:
    tree = ast.parse(fn_src.rstrip(": .") + ": ...\n" if not fn_src.rstrip().endswith("...") else fn_src)
    fn = tree.body[0]
    args = fn.args
    out = []
    if args.vararg is not None or args.kwarg is not None:
        # (*args, **kwargs) in the seed: the implementation must accept anything too
        out.append(("*args", "var", None))
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, "positional", None if default is None else ast.literal_eval(default)))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "keyword", None if default is None else ast.literal_eval(default)))
    return out


def _compare(seed_params, fn, *, skip_self=False, allow_extra_tail=True):
    actual = list(inspect.signature(fn).parameters.values())
    if skip_self:
        seed_params = [p for p in seed_params if p[0] != "self"]
        actual = [p for p in actual if p.name != "self"]
    if seed_params and seed_params[0][0] == "*args":
        kinds = {p.kind for p in actual}
        assert {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds, fn
        return
    names = [p.name for p in actual]
    assert names[: len(seed_params)] == [p[0] for p in seed_params], (names, seed_params)
    for (name, kind, default), param in zip(seed_params, actual):
        seed_has_default = default is not None or name in _NONE_DEFAULTS.get(fn.__qualname__, ())
        if seed_has_default:
            assert param.default == default, f"{fn.__qualname__}({name}) default {param.default!r} != seed {default!r}"
        if kind == "keyword":
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{name} must be keyword-only"
    extra = actual[len(seed_params):]
    assert allow_extra_tail or not extra
    for param in extra:  # FlashRT extensions are additive: optional, after the seed's
        assert param.default is not inspect.Parameter.empty or param.kind in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


_NONE_DEFAULTS = {
    "load_model": ("device", "embodiment_tag", "action_horizon", "fp4_layers", "use_awq",
                   "use_p1_split_gu", "num_steps", "vision_pool_factor", "vision_num_layers",
                   "cache_frames"),
    "VLAModel.predict": ("prompt", "state"),
}


def test_load_model_signature_matches_seed():
    import flash_rt

    src = _block("def load_model(", r"^\) -> VLAModel$").replace(") -> VLAModel", "): ...")
    _compare(_params(src), flash_rt.load_model)
    assert "tokenizer" in inspect.signature(flash_rt.load_model).parameters


def test_vlamodel_methods_match_seed():
    from flash_rt import VLAModel

    cls_src = _block("class VLAModel:", r"def prompt\(self\) -> str \| None: \.\.\.$")
    for m in re.finditer(r"    def (\w+)\((self[^)]*)\)", cls_src):
        name, args = m.group(1), m.group(2)
        member = inspect.getattr_static(VLAModel, name)
        if name in ("framework", "prompt"):
            assert isinstance(member, property), f"VLAModel.{name} must be a property"
            continue
        seed = _params(f"def {name}({args}): ...")
        _compare(seed, getattr(VLAModel, name), skip_self=True)


def test_sitespec_fields_match_seed():
    from flash_rt.hardware.backend import AttentionSpec, SiteSpec

    fields = {f.name: f for f in dataclasses.fields(SiteSpec)}
    expected = [("num_layers", None), ("num_q_heads", None), ("num_kv_heads", None),
                ("head_dim", None), ("max_q_seq", None), ("max_kv_seq", None),
                ("batch_axis", 1), ("sliding_window", None), ("causal", False)]
    assert list(fields)[: len(expected) + 1] == [n for n, _ in expected] + ["extra"]
    for name, default in expected[6:]:
        assert fields[name].default == default
    assert fields["max_kv_seq"].default is None
    assert fields["extra"].default_factory() == {}
    spec = AttentionSpec(sites={})
    assert spec.add_site("enc", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8,
                         max_q_seq=4) is spec
    assert spec.site("enc").num_q_heads == 2


def test_attention_backend_protocol_methods():
    from flash_rt.hardware.backend import AttentionBackend

    for name in ("sites", "get_slot_ptrs", "run", "head_dim", "num_q_heads", "num_kv_heads"):
        assert hasattr(AttentionBackend, name)
    run = inspect.signature(AttentionBackend.run).parameters
    assert list(run) == ["self", "site", "layer_idx", "q_seq", "kv_seq", "stream"]
    assert run["kv_seq"].kind is inspect.Parameter.KEYWORD_ONLY and run["stream"].default == 0


def test_fa2_signature_matches_seed():
    pytest.importorskip("flashrt_kernels", reason="flashrt-kernels not installed")
    fa2 = importlib.import_module("flash_rt.flash_rt_fa2")
    src = _block("flash_rt_fa2.fwd_fp16(", r"^\)$")
    src = "def fwd_fp16(" + src.split("(", 1)[1].rstrip(")") + "): ..."
    seed = _params(src)
    for fn in (fa2.fwd_fp16, fa2.fwd_bf16):
        _compare(seed, fn, allow_extra_tail=False)


def test_pipeline_map_is_plain_dict():
    from flash_rt.hardware import _PIPELINE_MAP

    assert type(_PIPELINE_MAP) is dict
