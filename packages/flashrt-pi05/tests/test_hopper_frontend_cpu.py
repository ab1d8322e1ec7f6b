"""The Hopper frontends end to end on a tiny random checkpoint, on the CPU (fp32, eager).

Through ``load_model(..., hardware="hopper")`` against the reference frontends (arch "cpu") on the
same checkpoint, images, state and noise: checks the IO glue (resize, norm stats, prompt format,
exact-length buckets, robot action dims), the options, the FP8 calibration cache and cache_frames.
"""

from __future__ import annotations

import numpy as np
import pytest

from flash_rt import load_model
from flash_rt.errors import ConfigError, InputError
from flash_rt.models.pi_make_checkpoint import write_random_checkpoint

MODELS = ["pi05", "pi0"]


@pytest.fixture(scope="module", params=MODELS)
def checkpoint(request, tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param), request.param, size="tiny", fmt="lerobot", seed=3)
    return request.param, path


def _observation(seed: int, num_views: int = 2):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (rng.integers(150, 300), rng.integers(150, 300), 3), dtype=np.uint8)
              for _ in range(num_views)]
    state = rng.uniform(-1, 1, 8).astype(np.float32)
    return images, state


def _noise(config_horizon: int, seed: int):
    return np.random.default_rng(seed).standard_normal((config_horizon, 32)).astype(np.float32)


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_hopper_frontend_matches_reference_frontend(checkpoint):
    model_type, path = checkpoint
    fast = load_model(str(path), config=model_type, hardware="hopper", num_views=2, use_fp8=False)
    ref = load_model(str(path), config=model_type, hardware="cpu", num_views=2)
    horizon = fast.frontend.config.action_horizon
    for seed in (1, 2):
        images, state = _observation(seed)
        noise = _noise(horizon, seed)
        got = fast.predict(images, "pick up the cup", state=state, noise=noise)
        want = ref.predict(images, "pick up the cup", state=state, noise=noise)
        assert got.shape == want.shape == (horizon, 7)  # the robot's 7 action dims, in robot units
        assert _cos(got, want) >= 0.9999
        assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) < 1e-4


def test_fp4_options_are_config_errors(checkpoint):
    model_type, path = checkpoint
    for option in ({"use_fp4": True}, {"use_awq": True}, {"fp4_layers": (1, 2)}):
        with pytest.raises(ConfigError, match="FP4"):
            load_model(str(path), config=model_type, hardware="hopper", **option)


def test_state_prompt_buckets_are_warmed_and_prompt_restored(checkpoint):
    model_type, path = checkpoint
    if model_type != "pi05":
        model = load_model(str(path), config=model_type, hardware="hopper", use_fp8=False)
        with pytest.raises(ConfigError, match="no prompt-length buckets"):
            model.warm_state_prompt_buckets(_observation(0)[0], "go", [np.zeros(8)])
        return
    model = load_model(str(path), config="pi05", hardware="hopper", use_fp8=False)
    images, state = _observation(4)
    noise = _noise(model.frontend.config.action_horizon, 4)
    before = model.predict(images, "stack the blocks", state=state, noise=noise)
    states = [np.full(8, v, np.float32) for v in (-0.99, -0.5, 0.0, 0.31, 0.77)]
    lengths = model.warm_state_prompt_buckets(images, "stack the blocks", states)
    assert lengths == sorted(lengths) and len(lengths) >= 1
    pipe = model.frontend.pipeline
    assert set(lengths) <= set(pipe.buckets)
    # the prompt/state of before the warm-up is back: predict() with it gives the same actions
    after = model.predict(images, "stack the blocks", state=state, noise=noise)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_missing_state_and_bad_noise_are_input_errors(checkpoint):
    model_type, path = checkpoint
    model = load_model(str(path), config=model_type, hardware="hopper", use_fp8=False)
    images, state = _observation(5)
    with pytest.raises(InputError, match="state"):
        model.predict(images, "go")
    with pytest.raises(InputError, match="noise"):
        model.predict(images, "go", state=state, noise=np.ones((3, 3), np.float32))


def test_fp8_calibration_is_cached_and_recalibrate_clears_it(checkpoint, tmp_path, monkeypatch):
    model_type, path = checkpoint
    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path / "cache"))
    first = load_model(str(path), config=model_type, hardware="hopper", use_fp8=True)
    assert not first.frontend.pipeline.calibrated
    images, state = _observation(6)
    noise = _noise(first.frontend.config.action_horizon, 6)
    a = first.predict(images, "open the drawer", state=state, noise=noise)
    cache = first.frontend._calibration_path()
    assert cache is not None and cache.is_file()
    second = load_model(str(path), config=model_type, hardware="hopper", use_fp8=True)
    assert second.frontend.pipeline.calibrated  # scales came from the cache file
    assert second.frontend.pipeline.act_amax() == pytest.approx(first.frontend.pipeline.act_amax(), rel=1e-6)
    b = second.predict(images, "open the drawer", state=state, noise=noise)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    second.recalibrate()
    assert not cache.exists() and not second.frontend.pipeline.calibrated
    c = second.predict(images, "open the drawer", state=state, noise=noise)
    assert cache.is_file() and _cos(c, a) >= 0.9999


def test_explicit_calibration_over_observations(checkpoint, tmp_path, monkeypatch):
    model_type, path = checkpoint
    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model(str(path), config=model_type, hardware="hopper", use_fp8=True)
    observations = [_observation(s) for s in (7, 8, 9)]
    model.frontend.calibrate(observations, percentile=99.0, prompt="wipe the table")
    assert model.frontend.pipeline.calibrated
    assert all(v > 0 for v in model.frontend.pipeline.act_amax().values())


def test_cache_frames_reuses_the_prefix_between_encodes(checkpoint):
    model_type, path = checkpoint
    model = load_model(str(path), config=model_type, hardware="hopper", use_fp8=False, cache_frames=3)
    images, state = _observation(10)
    other_images, _ = _observation(11)
    noise = _noise(model.frontend.config.action_horizon, 10)
    encoded = model.predict(images, "fold the towel", state=state, noise=noise)
    # calls 2 and 3 reuse the cached prefix: new images change nothing until the next encode
    cached = model.predict(other_images, "fold the towel", state=state, noise=noise)
    np.testing.assert_allclose(cached, encoded, rtol=1e-5, atol=1e-5)
    model.predict(other_images, "fold the towel", state=state, noise=noise)
    fresh = model.predict(other_images, "fold the towel", state=state, noise=noise)  # 4th call re-encodes
    assert np.abs(fresh - encoded).max() > 1e-4
    # a new prompt text always re-encodes
    model.predict(images, "fold the towel", state=state, noise=noise)
    new_text = model.predict(images, "unfold the towel", state=state, noise=noise)
    ref = load_model(str(path), config=model_type, hardware="hopper", use_fp8=False)
    np.testing.assert_allclose(new_text, ref.predict(images, "unfold the towel", state=state, noise=noise),
                               rtol=1e-4, atol=1e-4)
