"""load_model validation and VLAModel.predict semantics (seed contract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import flash_rt
from flash_rt.errors import ConfigError, InputError


@pytest.fixture
def echo(clean_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    clean_registry.register("echo", "torch", "cpu", "fake_frontends:EchoFrontend", distribution="tests")
    clean_registry.register("promptonly", "torch", "cpu", "fake_frontends:PromptOnlyFrontend",
                            distribution="tests")
    return clean_registry


def _load(**kw):
    kw.setdefault("config", "echo")
    kw.setdefault("hardware", "cpu")
    return flash_rt.load_model("/ckpt", **kw)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_views": 4}, r"num_views must be one of 1, 2, 3; got 4"),
        ({"num_views": 0}, r"num_views"),
        ({"vision_pool_factor": 3}, r"vision_pool_factor must be None or one of 1, 2, 4"),
        ({"vision_num_layers": 0}, r"\[1, 27\]"),
        ({"vision_num_layers": 28}, r"\[1, 27\]"),
        ({"cache_frames": 0}, r"cache_frames must be None or an int >= 1"),
        ({"config": "pi7"}, r"unknown config 'pi7'; accepted: .*'echo'.*'pi05'"),
        ({"framework": "tf"}, r"unknown framework 'tf'; accepted: 'torch', 'jax'"),
        ({"hardware": "tpu"}, r"unknown hardware 'tpu'; accepted: 'auto'.*'hopper'"),
        ({"use_fp16": True}, r"use_fp16=True requires use_fp8=False"),
        ({"use_fp16": True, "use_fp8": False}, r"config='pi05', framework='torch'"),
        ({"use_fp16": True, "use_fp8": False, "config": "pi05"}, r"hardware in 'rtx_sm120', 'rtx_sm89'"),
        ({"autotune": -1}, r"autotune must be an int >= 0"),
        ({"num_steps": 0}, r"num_steps"),
    ],
)
def test_invalid_arguments_raise_config_error(echo, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _load(**kwargs)


def test_use_fp16_accepted_on_rtx_routes_to_registry(echo):
    # Valid combination: passes validation, then fails only because nothing is registered.
    with pytest.raises(ConfigError, match=r"no frontend for \(pi05, torch, rtx_sm89\)"):
        _load(config="pi05", use_fp16=True, use_fp8=False, hardware="rtx_sm89")


def test_options_reach_frontend_constructor(echo):
    model = _load(num_views=3, num_steps=7, use_fp8=False)
    fe = model.frontend
    assert (fe.checkpoint, fe.num_views, fe.num_steps, fe.use_fp8) == ("/ckpt", 3, 7, False)
    assert model.framework == "torch" and model.prompt is None


def test_unsupported_non_default_option_warns(echo):
    with pytest.warns(UserWarning, match="does not take vision_pool_factor"):
        _load(vision_pool_factor=2)


def _images(rng, n=2):
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def test_predict_prompt_required_then_reused(echo):
    rng = np.random.default_rng(0)
    model = _load()
    with pytest.raises(InputError, match="needs a prompt on the first call"):
        model.predict(_images(rng))
    images, state = _images(rng), rng.standard_normal(2)
    first = model.predict(images, "pick up the cup", state)
    again = model.predict(images, None, state)
    np.testing.assert_array_equal(first, again)
    assert model.prompt == "pick up the cup"
    expected = np.mean([i.astype(np.float64).mean() for i in images]) + state.sum() + len("pick up the cup")
    np.testing.assert_allclose(first, np.full((4, 2), expected))


def test_prompt_refreshed_on_prompt_or_state_change(echo):
    rng = np.random.default_rng(1)
    model = _load()
    images = _images(rng)
    s1, s2 = rng.standard_normal(2), rng.standard_normal(2)
    model.predict(images, "a", s1)
    model.predict(images, None, s1.copy())  # same values: no refresh
    model.predict(images, None, s2)  # state changed: refresh
    model.predict(images, "b", s2)  # prompt changed: refresh
    prompts = model.frontend.prompts
    assert [p for p, _ in prompts] == ["a", "a", "b"]
    np.testing.assert_array_equal(prompts[1][1], s2)


def test_prompt_without_state_parameter_refreshes_on_text_only(echo):
    rng = np.random.default_rng(2)
    model = _load(config="promptonly")
    images = _images(rng)
    model.predict(images, "a", rng.standard_normal(2))
    model.predict(images, None, rng.standard_normal(2))
    assert [p for p, _ in model.frontend.prompts] == ["a"]


def test_dict_observation_keeps_explicit_state(echo):
    rng = np.random.default_rng(3)
    model = _load()
    img = _images(rng)
    own, other = rng.standard_normal(2), rng.standard_normal(2)
    out = model.predict({"image": img[0], "wrist_image": img[1], "state": own}, "t", other)
    expected = np.mean([i.astype(np.float64).mean() for i in img]) + own.sum() + 1
    np.testing.assert_allclose(out, np.full((4, 2), expected))


def test_noise_passed_through(echo):
    rng = np.random.default_rng(4)
    model = _load()
    images, noise = _images(rng), rng.standard_normal((4, 2))
    base = model.predict(images, "t")
    np.testing.assert_allclose(model.predict(images, "t", noise=noise), base + noise)


@pytest.mark.parametrize("bad", [np.zeros((224, 224, 3), np.uint8), "image.png", 3,
                                 {"left_image": np.zeros((2, 2, 3), np.uint8)}])
def test_bad_image_container_is_input_error(echo, bad):
    with pytest.raises(InputError):
        _load().predict(bad, "t")


def test_recalibrate_and_warm_buckets_delegate(echo):
    model = _load()
    model.recalibrate()
    assert model.frontend.recalibrated == 1
    with pytest.raises(ConfigError, match="no prompt-length buckets"):
        model.warm_state_prompt_buckets([], "t", [])
