"""Checkpoint reader: format detection, the lerobot and openpi-PyTorch layouts, every error."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flash_rt.errors import CheckpointError
from flash_rt.models.pi_checkpoint import detect_format, load_pi_checkpoint
from flash_rt.models.pi_make_checkpoint import make_config, random_state_dict, write_random_checkpoint
from flash_rt.models.pi_params import UNUSED_KEYS, expected_tensors

EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {(t, f): write_random_checkpoint(root / f"{t}_{f}", t, "tiny", f, seed=5)
            for t in ("pi05", "pi0") for f in ("lerobot", "openpi-pytorch")}


def copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / src.name)


@pytest.mark.parametrize("model_type", ["pi05", "pi0"])
@pytest.mark.parametrize("fmt", ["lerobot", "openpi-pytorch"])
def test_load_matches_the_generated_weights(written, model_type, fmt):
    path = written[(model_type, fmt)]
    assert detect_format(path) == fmt
    ckpt = load_pi_checkpoint(path, model_type)
    config = make_config(model_type, "tiny")
    reference = random_state_dict(config, seed=5)
    assert set(ckpt.state_dict) == set(reference) == {t.name for t in expected_tensors(config)}
    for name, value in reference.items():
        assert ckpt.state_dict[name].dtype == torch.float32
        torch.testing.assert_close(ckpt.state_dict[name], value, rtol=0, atol=0, msg=name)
    assert ckpt.format == fmt and ckpt.directory == path
    assert ckpt.config.paligemma == config.paligemma and ckpt.config.expert == config.expert
    assert ckpt.config.vision == config.vision and ckpt.config.action_horizon == 10
    assert (ckpt.config.state_dim, ckpt.config.robot_action_dim) == (8, 7)
    assert ckpt.norm_stats.mode == ("quantile" if model_type == "pi05" else "mean_std")
    assert ckpt.norm_stats.convention == ("lerobot" if fmt == "lerobot" else "openpi")
    if model_type == "pi05":  # adaRMS projections are random, not lerobot's zeros
        assert ckpt.state_dict["paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight"] \
            .abs().min() > 0


def test_dtype_argument(written):
    ckpt = load_pi_checkpoint(written[("pi05", "lerobot")], "pi05", dtype=torch.bfloat16)
    assert {v.dtype for v in ckpt.state_dict.values()} == {torch.bfloat16}


def test_lerobot_config_fields(written, tmp_path):
    path = copy(written[("pi05", "lerobot")], tmp_path)
    config = json.loads((path / "config.json").read_text())
    cams = {k: v for k, v in config["input_features"].items() if v["type"] == "VISUAL"}
    config["input_features"] = {"observation.images.wrist": cams["observation.images.left_wrist_0_rgb"],
                                "observation.state": {"type": "STATE", "shape": [5]},
                                "observation.images.top": cams["observation.images.base_0_rgb"]}
    config.update(chunk_size=10, n_action_steps=4, num_inference_steps=3, tokenizer_max_length=64)
    (path / "config.json").write_text(json.dumps(config))
    for f in path.glob("policy_*"):
        f.unlink()
    ckpt = load_pi_checkpoint(path, "pi05")
    assert ckpt.config.camera_keys == ("wrist", "top")  # the order lerobot feeds them
    assert (ckpt.config.state_dim, ckpt.config.num_steps, ckpt.config.max_token_len) == (5, 3, 64)
    assert ckpt.norm_stats is None


def test_wrong_model_type(written, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds a pi05 model, but config='pi0' was requested.*config='pi05'"):
        load_pi_checkpoint(written[("pi05", "openpi-pytorch")], "pi0")
    with pytest.raises(CheckpointError, match="holds a pi0 model"):
        load_pi_checkpoint(written[("pi0", "lerobot")], "pi05")
    path = copy(written[("pi05", "lerobot")], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["type"] = "act"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'act' is not a Pi0/Pi0.5 policy"):
        load_pi_checkpoint(path, "pi05")
    config["type"] = "pi0"  # config and weights disagree
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="type 'pi0' but the weights are a pi05 model"):
        load_pi_checkpoint(path, None)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi05"}))
    with pytest.raises(CheckpointError, match=r"no weights in .*model.safetensors.*found: config.json"):
        load_pi_checkpoint(tmp_path, "pi05")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pi_checkpoint(tmp_path / "missing", "pi05")
    with pytest.raises(CheckpointError, match="is a file"):
        load_pi_checkpoint(tmp_path / "config.json", "pi05")


def _rewrite(path, edit, prefix):
    weights = load_file(str(path / "model.safetensors"))
    edit(weights, prefix)
    save_file(weights, str(path / "model.safetensors"))


@pytest.mark.parametrize("fmt", ["lerobot", "openpi-pytorch"])
def test_missing_tensor(written, tmp_path, fmt):
    path = copy(written[("pi05", fmt)], tmp_path)
    name = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    _rewrite(path, lambda w, p: w.pop(p + name), "model." if fmt == "lerobot" else "")
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) missing, e.g. \['{name}'\]"):
        load_pi_checkpoint(path, "pi05")


def test_misshaped_tensor(written, tmp_path):
    path = copy(written[("pi0", "openpi-pytorch")], tmp_path)
    _rewrite(path, lambda w, p: w.__setitem__("state_proj.weight", torch.randn(32, 16)), "")
    with pytest.raises(CheckpointError, match=r"state_proj.weight has shape \(32, 16\), expected \(32, 32\)"):
        load_pi_checkpoint(path, "pi0")


def test_unknown_tensor(written, tmp_path):
    path = copy(written[("pi0", "openpi-pytorch")], tmp_path)
    _rewrite(path, lambda w, p: w.__setitem__("extra.weight", torch.randn(3)), "")
    with pytest.raises(CheckpointError, match=r"does not have, e.g. \['extra.weight'\]"):
        load_pi_checkpoint(path, "pi0")


def test_layer_count_must_match_declared_dims(written, tmp_path):
    path = copy(written[("pi05", "lerobot")], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["action_expert_dims"]["depth"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="declares 3 expert layers but the weights hold 2"):
        load_pi_checkpoint(path, "pi05")
    del config["paligemma_dims"]  # falls back to the named variant gemma_2b: 18 layers
    config["action_expert_dims"]["depth"] = 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="declares 18 paligemma layers but the weights hold 2"):
        load_pi_checkpoint(path, "pi05")


def test_bad_dims_entry(written, tmp_path):
    path = copy(written[("pi05", "openpi-pytorch")], tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["vision_dims"]["patch_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision_dims: missing \['patch_size'\]"):
        load_pi_checkpoint(path, "pi05")
    config = json.loads((written[("pi05", "openpi-pytorch")] / "config.json").read_text())
    del config["paligemma_dims"]
    config["paligemma_variant"] = "gemma_7b"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown paligemma_variant 'gemma_7b'"):
        load_pi_checkpoint(path, "pi05")


@pytest.mark.parametrize("cut", [4, 100, 5000])
def test_truncated_file(written, tmp_path, cut):
    path = copy(written[("pi05", "lerobot")], tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - cut] if cut != 4 else data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pi_checkpoint(path, "pi05")


def test_tied_embedding_saved_as_lm_head(written, tmp_path):
    # safetensors' save_model keeps one name of a tied pair (the LM head); the embedding is read from it.
    path = copy(written[("pi05", "openpi-pytorch")], tmp_path)
    _rewrite(path, lambda w, p: w.__setitem__(UNUSED_KEYS[0], w.pop(EMBED)), "")
    ckpt = load_pi_checkpoint(path, "pi05")
    reference = load_pi_checkpoint(written[("pi05", "openpi-pytorch")], "pi05")
    torch.testing.assert_close(ckpt.state_dict[EMBED], reference.state_dict[EMBED], rtol=0, atol=0)


def test_lm_heads_are_dropped(written, tmp_path):
    path = copy(written[("pi0", "lerobot")], tmp_path)

    def add_heads(w, p):
        w[p + UNUSED_KEYS[0]] = w[p + EMBED].clone()
        w[p + UNUSED_KEYS[1]] = torch.randn(8, 4)

    _rewrite(path, add_heads, "model.")
    ckpt = load_pi_checkpoint(path, "pi0")
    assert not set(UNUSED_KEYS) & set(ckpt.state_dict)


def test_detect_by_weight_prefix_without_config(written, tmp_path):
    path = copy(written[("pi05", "lerobot")], tmp_path)
    (path / "config.json").unlink()
    assert detect_format(path) == "lerobot"
    with pytest.raises(CheckpointError, match="without config.json"):
        load_pi_checkpoint(path, "pi05")


# -- openpi JAX ---------------------------------------------------------------------------------
HAS_ORBAX = all(importlib.util.find_spec(m) is not None for m in ("orbax", "jax"))
needs_orbax = pytest.mark.skipif(not HAS_ORBAX, reason="needs the optional orbax-checkpoint package "
                                                       "(pip install 'flashrt-core[jax]')")

# The openpi pi05 parameter tree (shared/checkpoint_keys/openpi_jax_param_trees.txt), paths only.
OPENPI_PI05_PATHS = """
PaliGemma/img/Transformer/encoder_norm/bias PaliGemma/img/Transformer/encoder_norm/scale
PaliGemma/img/Transformer/encoderblock/LayerNorm_0/bias PaliGemma/img/Transformer/encoderblock/LayerNorm_0/scale
PaliGemma/img/Transformer/encoderblock/LayerNorm_1/bias PaliGemma/img/Transformer/encoderblock/LayerNorm_1/scale
PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel
PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/bias
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/kernel
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/bias
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/bias
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/value/bias
PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/value/kernel
PaliGemma/img/embedding/bias PaliGemma/img/embedding/kernel PaliGemma/img/head/bias PaliGemma/img/head/kernel
PaliGemma/img/pos_embedding PaliGemma/llm/embedder/input_embedding PaliGemma/llm/final_norm/scale
PaliGemma/llm/final_norm_1/Dense_0/bias PaliGemma/llm/final_norm_1/Dense_0/kernel
PaliGemma/llm/layers/attn/attn_vec_einsum/w PaliGemma/llm/layers/attn/attn_vec_einsum_1/w
PaliGemma/llm/layers/attn/kv_einsum/w PaliGemma/llm/layers/attn/kv_einsum_1/w PaliGemma/llm/layers/attn/q_einsum/w
PaliGemma/llm/layers/attn/q_einsum_1/w PaliGemma/llm/layers/mlp/gating_einsum PaliGemma/llm/layers/mlp/linear
PaliGemma/llm/layers/mlp_1/gating_einsum PaliGemma/llm/layers/mlp_1/linear PaliGemma/llm/layers/pre_attention_norm/scale
PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/bias PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/kernel
PaliGemma/llm/layers/pre_ffw_norm/scale PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/bias
PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/kernel action_in_proj/bias action_in_proj/kernel action_out_proj/bias
action_out_proj/kernel time_mlp_in/bias time_mlp_in/kernel time_mlp_out/bias time_mlp_out/kernel
""".split()


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, path) if isinstance(v, dict) else {path: v})
    return out


def test_jax_layout_follows_openpi_formulas():
    # Independent of the key map's code: the MODELS.md conversion formulas, written out.
    from flash_rt.models.pi_jax import build_tree

    config = make_config("pi05", "tiny")
    sd = random_state_dict(config, seed=2)
    tree = _flat(build_tree(config, lambda t: sd[t.name].numpy()))
    assert sorted(tree) == sorted(OPENPI_PI05_PATHS)
    g, e, v = config.paligemma, config.expert, config.vision
    L, E, V = "paligemma_with_expert.paligemma.model.language_model.layers.", \
        "paligemma_with_expert.gemma_expert.model.layers.", \
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
    assert tree["PaliGemma/llm/layers/attn/q_einsum/w"].shape == (g.depth, g.num_heads, g.width, g.head_dim)
    assert tree["PaliGemma/llm/layers/attn/kv_einsum_1/w"].shape == (e.depth, 2, 1, e.width, e.head_dim)
    assert tree["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel"].shape == \
        (v.depth, v.num_heads, v.head_dim, v.width)
    assert tree["PaliGemma/img/pos_embedding"].shape == (1, v.num_patches, v.width)
    for i in range(2):
        q = tree["PaliGemma/llm/layers/attn/q_einsum/w"][i].transpose(0, 2, 1).reshape(-1, g.width)
        np.testing.assert_array_equal(q, sd[L + f"{i}.self_attn.q_proj.weight"].numpy())
        kv = tree["PaliGemma/llm/layers/attn/kv_einsum_1/w"]
        np.testing.assert_array_equal(kv[i, 0, 0].T, sd[E + f"{i}.self_attn.k_proj.weight"].numpy())
        np.testing.assert_array_equal(kv[i, 1, 0].T, sd[E + f"{i}.self_attn.v_proj.weight"].numpy())
        o = tree["PaliGemma/llm/layers/attn/attn_vec_einsum_1/w"][i].reshape(-1, e.width).T
        np.testing.assert_array_equal(o, sd[E + f"{i}.self_attn.o_proj.weight"].numpy())
        gating = tree["PaliGemma/llm/layers/mlp/gating_einsum"][i]
        np.testing.assert_array_equal(gating[0].T, sd[L + f"{i}.mlp.gate_proj.weight"].numpy())
        np.testing.assert_array_equal(gating[1].T, sd[L + f"{i}.mlp.up_proj.weight"].numpy())
        np.testing.assert_array_equal(tree["PaliGemma/llm/layers/mlp_1/linear"][i].T,
                                      sd[E + f"{i}.mlp.down_proj.weight"].numpy())
        np.testing.assert_array_equal(tree["PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/kernel"][i].T,
                                      sd[E + f"{i}.post_attention_layernorm.dense.weight"].numpy())
        query = tree["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"][i]
        np.testing.assert_array_equal(query.reshape(v.width, -1).T,
                                      sd[V + f"encoder.layers.{i}.self_attn.q_proj.weight"].numpy())
    np.testing.assert_array_equal(tree["PaliGemma/img/embedding/kernel"].transpose(3, 2, 0, 1),
                                  sd[V + "embeddings.patch_embedding.weight"].numpy())
    np.testing.assert_array_equal(tree["time_mlp_in/kernel"].T, sd["time_mlp_in.weight"].numpy())


@needs_orbax
@pytest.mark.parametrize("model_type", ["pi05", "pi0"])
def test_jax_checkpoint_without_config_infers_dims(tmp_path, model_type):
    path = write_random_checkpoint(tmp_path / "jax", model_type, "tiny", "openpi-jax", seed=1)
    assert detect_format(path) == "openpi-jax" and detect_format(path / "params") == "openpi-jax"
    (path / "config.json").unlink()
    ckpt = load_pi_checkpoint(path / "params", model_type)  # pointing at params/ works too
    config = make_config(model_type, "tiny")
    assert (ckpt.config.paligemma, ckpt.config.expert, ckpt.config.vision) == \
        (config.paligemma, config.expert, config.vision)
    assert ckpt.config.action_horizon == 50  # not in the weights: openpi's default
    assert ckpt.norm_stats is not None and ckpt.directory == path
    reference = random_state_dict(config, seed=1)
    for name, value in reference.items():
        torch.testing.assert_close(ckpt.state_dict[name], value, rtol=0, atol=0, msg=name)
    with pytest.raises(CheckpointError, match=f"holds a {model_type} model"):
        load_pi_checkpoint(path, "pi0" if model_type == "pi05" else "pi05")


@needs_orbax
def test_jax_nnx_value_suffix_and_damage(tmp_path):
    import orbax.checkpoint as ocp

    from flash_rt.models.pi_jax import build_tree

    config = make_config("pi0", "tiny")
    sd = random_state_dict(config, seed=3)
    tree = build_tree(config, lambda t: sd[t.name].numpy())

    def wrap(node):  # nnx.State leaves: {"value": array}
        return {k: wrap(v) for k, v in node.items()} if isinstance(node, dict) else {"value": node}

    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "ck" / "params").resolve(), {"params": wrap(tree)})
    ckpt = load_pi_checkpoint(tmp_path / "ck", "pi0")
    torch.testing.assert_close(ckpt.state_dict["state_proj.weight"], sd["state_proj.weight"], rtol=0, atol=0)
    assert ckpt.norm_stats is None
    for f in (tmp_path / "ck" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    with pytest.raises(CheckpointError, match="cannot read the orbax checkpoint"):
        load_pi_checkpoint(tmp_path / "ck", "pi0")


@needs_orbax
def test_jax_optional_config_overrides_only_what_it_states(tmp_path):
    path = write_random_checkpoint(tmp_path / "jax", "pi05", "tiny", "openpi-jax", seed=1)
    (path / "config.json").write_text(json.dumps({"action_horizon": 15}))
    ckpt = load_pi_checkpoint(path, "pi05")
    assert ckpt.config.action_horizon == 15
    assert ckpt.config.paligemma == make_config("pi05", "tiny").paligemma  # still read off the shapes
    (path / "config.json").write_text(json.dumps({"paligemma_variant": "gemma_2b"}))
    with pytest.raises(CheckpointError, match="declares 18 paligemma layers but the weights hold 2"):
        load_pi_checkpoint(path, "pi05")


def test_incomplete_jax_checkpoint(tmp_path):
    (tmp_path / "params" / "d").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no orbax checkpoint"):
        load_pi_checkpoint(tmp_path, "pi05")
