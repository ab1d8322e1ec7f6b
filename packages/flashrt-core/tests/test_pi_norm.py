"""Normalisation stats: openpi and lerobot formulas against literal re-statements, file formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from flash_rt.errors import CheckpointError, InputError
from flash_rt.models import pi_norm
from flash_rt.models.pi_norm import FeatureStats, NormStats, random_feature_stats


def stats(seed: int, dim: int) -> FeatureStats:
    return random_feature_stats(np.random.default_rng(seed), dim)


def test_openpi_quantile_formulas():
    s, a = stats(0, 8), stats(1, 7)
    norm = NormStats(state=s, actions=a, state_mode="quantile", action_mode="quantile")
    x = np.random.default_rng(2).normal(size=8) * 2
    expected = np.array([(x[i] - s.q01[i]) / (s.q99[i] - s.q01[i] + 1e-6) * 2.0 - 1.0 for i in range(8)])
    np.testing.assert_allclose(norm.normalize_state(x), expected, rtol=1e-6, atol=1e-6)
    model_out = np.random.default_rng(3).uniform(-1.2, 1.2, size=(10, 32))
    expected_a = (model_out[:, :7] + 1.0) / 2.0 * (a.q99 - a.q01 + 1e-6) + a.q01
    got = norm.unnormalize_actions(model_out)
    assert got.shape == (10, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected_a, rtol=1e-5, atol=1e-5)


def test_openpi_mean_std_formulas_and_short_state():
    s, a = stats(4, 8), stats(5, 7)
    norm = NormStats(state=s, actions=a, state_mode="mean_std", action_mode="mean_std")
    x = np.random.default_rng(6).normal(size=6)  # openpi slices the stats to a shorter state
    np.testing.assert_allclose(norm.normalize_state(x), (x - s.mean[:6]) / (s.std[:6] + 1e-6), rtol=1e-6)
    y = np.random.default_rng(7).normal(size=(4, 9))
    np.testing.assert_allclose(norm.unnormalize_actions(y), y[:, :7] * (a.std + 1e-6) + a.mean, rtol=1e-5)


def test_lerobot_formulas_use_eps_only_where_needed():
    s = stats(8, 5)
    q99 = s.q99.copy()
    q99[2] = s.q01[2]  # a zero range: lerobot substitutes eps for it
    s = FeatureStats(mean=s.mean, std=s.std, q01=s.q01, q99=q99)
    norm = NormStats(state=s, actions=s, state_mode="quantile", action_mode="mean_std", convention="lerobot",
                     eps=1e-8)
    x = np.random.default_rng(9).normal(size=5)
    rng = np.where(q99 - s.q01 == 0, 1e-8, q99 - s.q01)
    np.testing.assert_allclose(norm.normalize_state(x), 2.0 * (x - s.q01) / rng - 1.0, rtol=1e-6)
    y = np.random.default_rng(10).normal(size=(3, 5))
    np.testing.assert_allclose(norm.unnormalize_actions(y), y * s.std + s.mean, rtol=1e-5)
    assert norm.mode == "quantile/mean_std"


def test_state_longer_than_stats_is_an_input_error():
    norm = NormStats(state=stats(0, 4), actions=stats(1, 4))
    with pytest.raises(InputError, match="5 dims"):
        norm.normalize_state(np.ones(5))


def test_missing_statistic_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="needs q01, q99"):
        NormStats(state=FeatureStats(mean=np.zeros(3), std=np.ones(3)), actions=None, state_mode="quantile",
                  action_mode="identity")


def test_openpi_json_round_trip_and_asset_choice(tmp_path, monkeypatch):
    s, a = stats(0, 8), stats(1, 7)
    pi_norm.write_openpi_norm_stats(tmp_path / "assets" / "droid" / "norm_stats.json", s, a)
    path = pi_norm.find_openpi_norm_stats(tmp_path / "assets")
    loaded = pi_norm.load_openpi_norm_stats(path, "pi05")
    assert loaded.mode == "quantile" and loaded.state_dim == 8 and loaded.action_dim == 7
    np.testing.assert_array_equal(loaded.state.q01, s.q01)
    assert pi_norm.load_openpi_norm_stats(path, "pi0").mode == "mean_std"
    pi_norm.write_openpi_norm_stats(tmp_path / "assets" / "libero" / "norm_stats.json", a, s)
    with pytest.raises(CheckpointError, match="several asset ids"):
        pi_norm.find_openpi_norm_stats(tmp_path / "assets")
    monkeypatch.setenv(pi_norm.ENV_ASSET_ID, "libero")
    assert pi_norm.find_openpi_norm_stats(tmp_path / "assets").parent.name == "libero"
    with pytest.raises(CheckpointError, match="no norm stats for asset id 'x'"):
        pi_norm.find_openpi_norm_stats(tmp_path / "assets", "x")


def test_corrupt_openpi_json(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read norm stats"):
        pi_norm.load_openpi_norm_stats(path, "pi05")
    path.write_text(json.dumps({"norm_stats": {"state": {"mean": [1, 2], "std": [1.0]}}}))
    with pytest.raises(CheckpointError, match="disagree on the dimension"):
        pi_norm.load_openpi_norm_stats(path, "pi0")


def test_lerobot_processor_files_as_lerobot_names_them(tmp_path):
    # Laid out by hand the way lerobot 0.6.1 saves processors: a pipeline JSON naming a
    # safetensors state file per stateful step, flat "<feature>.<stat>" keys.
    rng = np.random.default_rng(0)
    flat = {f"observation.state.{k}": rng.normal(size=6).astype(np.float32) for k in ("mean", "q01")}
    flat["observation.state.std"] = rng.uniform(0.5, 1, 6).astype(np.float32)
    flat["observation.state.q99"] = flat["observation.state.q01"] + 1.5
    flat.update({f"action.{k}": rng.normal(size=4).astype(np.float32) for k in ("mean", "q01", "min")})
    flat["action.std"] = rng.uniform(0.5, 1, 4).astype(np.float32)
    flat["action.q99"] = flat["action.q01"] + 2.0
    flat["action.max"] = flat["action.min"] + 3.0
    save_file(flat, str(tmp_path / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    save_file({k: v for k, v in flat.items() if k.startswith("action.")},
              str(tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    norm_map = {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "MIN_MAX"}
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "normalizer_processor", "config": {"eps": 1e-8, "norm_map": norm_map},
         "state_file": "policy_preprocessor_step_3_normalizer_processor.safetensors"}]}))
    (tmp_path / "policy_postprocessor.json").write_text(json.dumps({"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {"eps": 1e-8, "norm_map": norm_map},
         "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"}]}))
    norm = pi_norm.load_lerobot_norm_stats(tmp_path)
    assert (norm.state_mode, norm.action_mode, norm.convention) == ("quantile", "min_max", "lerobot")
    assert norm.state_dim == 6 and norm.action_dim == 4
    x = rng.normal(size=6)
    q01 = flat["observation.state.q01"].astype(np.float64)
    np.testing.assert_allclose(norm.normalize_state(x), 2 * (x - q01) / 1.5 - 1, rtol=1e-5)
    y = rng.uniform(-1, 1, size=(5, 32))
    lo = flat["action.min"].astype(np.float64)
    np.testing.assert_allclose(norm.unnormalize_actions(y), (y[:, :4] + 1) / 2 * 3.0 + lo, rtol=1e-5)


def test_lerobot_write_then_load(tmp_path):
    s, a = stats(2, 8), stats(3, 7)
    pi_norm.write_lerobot_processors(tmp_path, s, a, "quantile", "quantile", (8,), (7,))
    norm = pi_norm.load_lerobot_norm_stats(tmp_path)
    assert norm.mode == "quantile" and norm.convention == "lerobot"
    np.testing.assert_allclose(norm.actions.q99, a.q99, rtol=1e-6)
    assert pi_norm.load_lerobot_norm_stats(tmp_path / "nothing") is None


def test_lerobot_stats_file_missing(tmp_path):
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps({"steps": [
        {"registry_name": "normalizer_processor", "config": {}, "state_file": "gone.safetensors"}]}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        pi_norm.load_lerobot_norm_stats(tmp_path)
