"""FP8 accuracy of the Hopper pipeline on the CPU, at the TRUE widths with 2 layers per stack
(the prefix MLP cut to 4096 to keep CI fast).

The pipeline's W8A8 path runs on the CPU (its FP8 GEMM widens the E4M3 operands to fp32 there:
the products and the fp32 sum of ``_scaled_mm``), so it is measured here against the fp32
reference on the same random weights (the generator ``flashrt bench`` uses). E4M3's error is set
by its 3 mantissa bits, not by the widths, but the error sums over layers: at 2 layers it is a
fraction of the true-size one, so these bars are tighter than the GPU test's 0.999 and sit between
the all-FP8 result and the one with each model's bf16 keep list (``fp8_keep_bf16``,
docs/calibration.md "Which GEMMs run FP8"). A regression of the list (a group going back to FP8,
a fold that inflates a weight range) shows here without a GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flash_rt.errors import ConfigError
from flash_rt.models.pi_config import GEMMA_VARIANTS, SIGLIP_SO400M_14, PiConfig
from flash_rt.models.pi_random_weights import random_state_dict

_spec = importlib.util.spec_from_file_location("hopper_testing", Path(__file__).with_name("hopper_testing.py"))
ht = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ht)

DEPTH = 2
PROMPT_LEN = 20
# Bars for the keep lists on this config (1 view, 5 steps). Measured, keep list / all FP8:
#   pi05 actions 0.999990 / 0.999983, pi0 actions 0.999814 / 0.998675, prefix K min 0.99944 / 0.99732.
# Pi0.5's actions barely move at 2 layers (its gated expert damps FP8 error), so its list is
# checked where it acts: the prefix K/V cache.
BAR_ACTIONS = {"pi05": 0.99995, "pi0": 0.9995}
BAR_PREFIX_K = 0.999


def true_width_config(model_type: str) -> PiConfig:
    return PiConfig(
        model_type=model_type, vocab_size=1024, max_token_len=32, num_steps=5,
        paligemma=replace(GEMMA_VARIANTS["gemma_2b"], depth=DEPTH, mlp_dim=4096),  # 16384: 2x the time, same numbers
        expert=replace(GEMMA_VARIANTS["gemma_300m"], depth=DEPTH),
        vision=replace(SIGLIP_SO400M_14, depth=DEPTH),
    )


@pytest.fixture(scope="module", params=["pi05", "pi0"])
def true_width(request):
    config = true_width_config(request.param)
    state_dict = random_state_dict(config, seed=0)
    ref = ht.make_reference(config, state_dict)
    inputs = ht.random_inputs(config, 1, PROMPT_LEN, seed=1)
    want = ht.run_reference(ref, config, inputs)
    del ref
    return config, state_dict, inputs, want


def _fp8_run(config, state_dict, inputs, want, **kwargs):
    """(pipeline, actions cosine, min over layers of the prefix K cosine) vs the fp32 reference."""
    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=1, use_fp8=True, **kwargs)
    # static scales from ANOTHER observation, as in deployment and in the GPU test
    ht.load_pipeline_inputs(pipe, config, ht.random_inputs(config, 1, PROMPT_LEN, seed=101))
    pipe.calibrate_current()
    ht.load_pipeline_inputs(pipe, config, inputs)
    pipe.actions_host.fill_(float("nan"))
    actions = torch.from_numpy(pipe.infer())
    assert torch.isfinite(actions).all()
    k_cos = []
    for layer in range(config.paligemma.depth):
        k_ref, _ = ht.prefix_kv_of_reference(want["kv"], layer, pipe.num_image_tokens, PROMPT_LEN)
        k_cos.append(ht.cosine(pipe.k_layers[layer][: k_ref.shape[0]], k_ref))
    return pipe, ht.cosine(actions, want["actions"]), min(k_cos)


def test_fp8_keep_list_holds_the_accuracy_bar(true_width):
    config, state_dict, inputs, want = true_width
    pipe, cos_kept, k_kept = _fp8_run(config, state_dict, inputs, want)
    fp8_names = {lin.name for lin in pipe.fp8_linears()}
    assert not any(pipe.keeps_bf16(n) for n in fp8_names)
    # where the time is stays FP8 whatever the list: the prefix MLP and the expert's down_proj
    hot = {f"{stack}.{i}.{gemm}" for i in range(DEPTH) for stack, gemm in
           (("llm", "gate_up"), ("llm", "down"), ("expert", "down"))}
    hot.discard(f"llm.{DEPTH - 1}.gate_up")  # the last prefix layer runs only its qkv
    hot.discard(f"llm.{DEPTH - 1}.down")
    assert hot <= fp8_names
    del pipe
    _, cos_all, k_all = _fp8_run(config, state_dict, inputs, want, fp8_keep_bf16=())
    print(f"\n[fp8-cpu] {config.model_type}: actions keep list {cos_kept:.6f} / all FP8 {cos_all:.6f}; "
          f"prefix K min {k_kept:.6f} / {k_all:.6f}")
    assert cos_kept >= BAR_ACTIONS[config.model_type]
    assert k_kept >= BAR_PREFIX_K
    assert 1.0 - k_kept < 0.5 * (1.0 - k_all), "the keep list should at least halve the prefix K error"
    if not config.is_pi05:
        assert 1.0 - cos_kept < 0.5 * (1.0 - cos_all), "the keep list should at least halve the action error"


def test_fp8_keep_list_patterns_are_checked(true_width):
    config, state_dict, _, _ = true_width
    cls = ht.pipeline_class(config.model_type)
    with pytest.raises(ConfigError, match="match no GEMM"):
        cls(state_dict, config, num_views=1, use_fp8=True, fp8_keep_bf16=("visoin.*",))
