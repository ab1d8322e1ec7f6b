"""Random checkpoints: the CLI, the streaming writer, true sizes, and the three-format round trip."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch

from flash_rt.errors import ConfigError
from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER
from flash_rt.models.pi_checkpoint import load_pi_checkpoint
from flash_rt.models.pi_make_checkpoint import (
    add_make_checkpoint_parser,
    make_config,
    random_state_dict,
    write_random_checkpoint,
)
from flash_rt.models.pi_params import expected_tensors, num_parameters

HAS_ORBAX = importlib.util.find_spec("orbax") is not None and importlib.util.find_spec("jax") is not None


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="flashrt")
    add_make_checkpoint_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["make-checkpoint", "--config", "pi0", "--size", "tiny", "--format", "openpi-pytorch",
                              "--out", str(tmp_path / "ck"), "--seed", "11"])
    assert args.func(args) == 0
    assert "pi0" in capsys.readouterr().out
    ckpt = load_pi_checkpoint(tmp_path / "ck", "pi0")
    reference = random_state_dict(make_config("pi0", "tiny"), seed=11)
    for name, value in reference.items():
        torch.testing.assert_close(ckpt.state_dict[name], value, rtol=0, atol=0)
    assert (tmp_path / "ck" / "paligemma_tokenizer.model").read_bytes() == STANDIN_TOKENIZER.read_bytes()
    with pytest.raises(SystemExit):
        parser.parse_args(["make-checkpoint", "--format", "gguf", "--out", "x"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown checkpoint format"):
        write_random_checkpoint(tmp_path, "pi05", "tiny", "onnx")
    with pytest.raises(ConfigError, match="unknown size"):
        write_random_checkpoint(tmp_path, "pi05", "huge", "lerobot")
    with pytest.raises(ConfigError, match="unknown model type"):
        write_random_checkpoint(tmp_path, "pi1", "tiny", "lerobot")


def test_full_size_matches_the_true_models():
    # MODELS.md: Pi0 3.238 B and Pi0.5 3.353 B parameters (without the unused LM heads).
    assert num_parameters(make_config("pi05", "full")) == 3_353_433_872
    assert num_parameters(make_config("pi0", "full")) == 3_238_048_528
    names = [t.name for t in expected_tensors(make_config("pi05", "full"))]
    assert len(names) == 811 and len(set(names)) == 811


def test_full_lerobot_header_has_the_true_dtypes(tmp_path, monkeypatch):
    # The full-size writer's plan (names, shapes, dtypes) without 7 GB of writing: capture the entries.
    from flash_rt.executors import torch_weights
    from flash_rt.models import pi_make_checkpoint as mk

    captured = {}

    def fake_writer(path, tensors, *, metadata=None, layout=None):
        captured[path.name] = [(n, s, str(d).removeprefix("torch.")) for n, s, d in layout]

    monkeypatch.setattr(torch_weights, "write_safetensors", fake_writer)
    config = make_config("pi05", "full")
    mk._write_torch_weights(tmp_path, config, "lerobot", "full", 0)
    dtypes = {name: dtype for name, _, dtype in captured["model.safetensors"]}
    P = "model.paligemma_with_expert."
    assert dtypes[P + "paligemma.model.language_model.layers.3.mlp.gate_proj.weight"] == "bfloat16"
    assert dtypes[P + "paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc1.weight"] == "float32"
    assert dtypes[P + "gemma_expert.model.layers.17.input_layernorm.dense.weight"] == "float32"
    assert dtypes[P + "paligemma.lm_head.weight"] == "bfloat16" and len(dtypes) == 813
    mk._write_torch_weights(tmp_path, config, "openpi-pytorch", "full", 0)
    assert {d for _, _, d in captured["model.safetensors"]} == {"bfloat16"}


def test_pi05_adarms_weights_are_not_zero():
    sd = random_state_dict(make_config("pi05", "tiny"), seed=0)
    dense = [v for k, v in sd.items() if ".dense." in k]
    assert len(dense) == 2 * (2 * 2 + 1) and all(v.abs().sum() > 0 for v in dense)


def test_same_seed_same_weights_other_seed_differs():
    config = make_config("pi0", "tiny")
    a, b, c = random_state_dict(config, 1), random_state_dict(config, 1), random_state_dict(config, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["state_proj.weight"], c["state_proj.weight"])


@pytest.mark.parametrize("model_type", ["pi05", "pi0"])
def test_three_formats_load_to_identical_tensors(tmp_path, model_type):
    if not HAS_ORBAX:
        pytest.skip("openpi-jax needs the optional orbax-checkpoint package (pip install flashrt-core[jax])")
    loaded = {}
    for fmt in ("lerobot", "openpi-pytorch", "openpi-jax"):
        path = write_random_checkpoint(tmp_path / fmt, model_type, "tiny", fmt, seed=4)
        loaded[fmt] = load_pi_checkpoint(path, model_type)
    base = loaded["lerobot"]
    for fmt in ("openpi-pytorch", "openpi-jax"):
        other = loaded[fmt]
        assert other.config == base.config or other.config.paligemma == base.config.paligemma
        assert set(other.state_dict) == set(base.state_dict)
        for name, value in base.state_dict.items():
            torch.testing.assert_close(other.state_dict[name], value, rtol=0, atol=0, msg=f"{fmt}: {name}")
        x = np.random.default_rng(0).normal(size=8)
        np.testing.assert_allclose(other.norm_stats.normalize_state(x), base.norm_stats.normalize_state(x),
                                   rtol=1e-4, atol=1e-4)


def test_config_json_of_lerobot_tiny(tmp_path):
    path = write_random_checkpoint(tmp_path, "pi05", "tiny", "lerobot")
    config = json.loads((path / "config.json").read_text())
    assert config["type"] == "pi05" and config["paligemma_dims"]["width"] == 64
    assert config["output_features"]["action"]["shape"] == [7]
