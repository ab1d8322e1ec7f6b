"""Pi05TorchFrontendCpu end to end on a tiny random lerobot checkpoint: load_model -> predict against
the reference run by hand (preprocessing, state normalisation and tokenization redone here), and
every malformed input an InputError."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from flash_rt.models.pi_make_checkpoint import TINY_VISION

torch = pytest.importorskip("torch")

import flash_rt  # noqa: E402
from flash_rt.errors import InputError  # noqa: E402
from flash_rt.models.paligemma_tokenizer import PaligemmaTokenizer, find_tokenizer  # noqa: E402
from flash_rt.models.pi_checkpoint import load_pi_checkpoint  # noqa: E402
from flash_rt.models.pi_make_checkpoint import write_random_checkpoint  # noqa: E402
from flashrt_pi05.reference import Pi05Reference  # noqa: E402

PROMPT = "pick up the red cup"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("pi05") / "ckpt", "pi05", size="tiny", fmt="lerobot", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return flash_rt.load_model(str(checkpoint), config="pi05", hardware="cpu", num_views=2)


def observation(seed=0, views=2, size=(224, 224)):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(views)]
    state = rng.uniform(-1.5, 1.5, 8).astype(np.float32)
    return images, state


def test_predict_matches_reference_run_by_hand(checkpoint, model):
    # images at the checkpoint's own resolution, so the hand-run reference needs no resize
    images, state = observation(1, size=(TINY_VISION.image_size,) * 2)
    cfg = model.frontend.config
    noise = np.random.default_rng(2).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    actions = model.predict(images, PROMPT, state=state, noise=noise)

    ckpt = load_pi_checkpoint(checkpoint, "pi05")
    reference = Pi05Reference(ckpt.config)
    reference.load_state_dict(ckpt.state_dict, strict=True)
    stats = ckpt.norm_stats
    state_norm = stats.normalize_state(state)
    ids, mask = PaligemmaTokenizer(find_tokenizer(None, checkpoint)).tokenize_pi05(PROMPT, state_norm, cfg.max_token_len)
    pixels = torch.tensor(np.stack(images), dtype=torch.float32) / 255.0 * 2 - 1
    raw = reference.sample_actions(pixels[None], torch.from_numpy(ids)[None], torch.from_numpy(mask)[None],
                                   torch.from_numpy(noise)[None])[0].numpy()
    expected = stats.unnormalize_actions(raw)
    assert actions.shape == (cfg.action_horizon, 7) == expected.shape
    assert actions.dtype == np.float32
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_same_noise_same_actions_and_state_matters(model):
    images, state = observation(3)
    cfg = model.frontend.config
    noise = np.random.default_rng(4).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    a = model.predict(images, PROMPT, state=state, noise=noise)
    b = model.predict(images, None, state=state, noise=noise)
    np.testing.assert_array_equal(a, b)
    c = model.predict(images, None, state=state + 0.5, noise=noise)  # other bins in the prompt
    assert np.abs(a - c).max() > 1e-4
    d = model.predict({"image": images[0], "wrist_image": images[1], "state": state}, PROMPT, noise=noise)
    np.testing.assert_array_equal(a, d)


def test_resized_views_and_fresh_noise(model):
    images, state = observation(5, size=(120, 160))
    a = model.predict(images, PROMPT, state=state)
    b = model.predict(images, PROMPT, state=state)
    assert a.shape == b.shape and np.isfinite(a).all() and not np.array_equal(a, b)


def test_without_norm_stats_returns_raw_output(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    for path in bare.iterdir():
        if path.name.startswith("policy_") or path.suffix == ".safetensors" and path.name != "model.safetensors":
            path.unlink()
    m = flash_rt.load_model(str(bare), config="pi05", hardware="cpu")
    if m.frontend.norm_stats is not None:
        pytest.skip("the stand-in checkpoint keeps its stats in a file this test does not know")
    images, state = observation(6)
    cfg = m.frontend.config
    noise = np.random.default_rng(7).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    raw = m.predict(images, PROMPT, state=state, noise=noise)
    assert raw.shape[1] == (cfg.robot_action_dim or cfg.action_dim)


@pytest.mark.parametrize(
    "images, state, match",
    [
        ("rank", None, r"\(H, W, 3\)"),
        ("channels", None, r"\(H, W, 3\)"),
        ("dtype", None, "uint8"),
        ("count", None, "num_views=2"),
        (None, [np.nan] * 8, "NaN"),
        (None, [np.inf] + [0.0] * 7, "NaN or inf"),
        (None, [0.1] * 5, "8 values"),
        (None, np.zeros((2, 8)), "1-D"),
    ],
)
def test_bad_inputs_are_input_errors(model, images, state, match):
    good_images, good_state = observation(8)
    if images == "rank":
        images = [good_images[0][..., 0], good_images[1]]
    elif images == "channels":
        images = [good_images[0][..., :2], good_images[1]]
    elif images == "dtype":
        images = [good_images[0].astype(np.float32) / 255, good_images[1]]
    elif images == "count":
        images = good_images + good_images[:1]
    else:
        images = good_images
    with pytest.raises(InputError, match=match):
        model.predict(images, PROMPT, state=good_state if state is None else np.asarray(state, dtype=np.float32))


def test_missing_prompt_state_and_bad_noise(checkpoint):
    fresh = flash_rt.load_model(str(checkpoint), config="pi05", hardware="cpu")
    images, state = observation(9)
    with pytest.raises(InputError, match="prompt"):
        fresh.predict(images, None, state=state)
    with pytest.raises(InputError, match="state"):
        fresh.predict(images, PROMPT)
    with pytest.raises(InputError, match="prompt"):
        fresh.predict(images, "   ", state=state)
    with pytest.raises(InputError, match="noise"):
        fresh.predict(images, PROMPT, state=state, noise=np.zeros((3, 3), np.float32))
    with pytest.raises(InputError, match="tokens"):
        fresh.predict(images, "pick " * 400, state=state)
    from flashrt_pi05.frontend_torch_cpu import Pi05TorchFrontendCpu

    with pytest.raises(InputError, match="set_prompt"):
        Pi05TorchFrontendCpu(str(checkpoint)).infer({"images": images, "state": state})


def test_one_and_three_views(checkpoint):
    for views in (1, 3):
        m = flash_rt.load_model(str(checkpoint), config="pi05", hardware="cpu", num_views=views)
        images, state = observation(10, views=views)
        out = m.predict(images, PROMPT, state=state)
        assert out.shape == (m.frontend.config.action_horizon, 7) and np.isfinite(out).all()


def test_speed_knobs_and_bf16_through_the_frontend(checkpoint):
    from flash_rt.errors import ConfigError
    from flashrt_pi05.frontend_torch_cpu import Pi05TorchFrontendCpu

    images, state = observation(11)
    fast = flash_rt.load_model(str(checkpoint), config="pi05", hardware="cpu", vision_num_layers=1,
                               vision_pool_factor=2)
    assert (fast.frontend.model.vision_num_layers, fast.frontend.model.vision_pool_factor) == (1, 2)
    assert np.isfinite(fast.predict(images, PROMPT, state=state)).all()
    with pytest.raises(ConfigError, match="vision_num_layers"):
        flash_rt.load_model(str(checkpoint), config="pi05", hardware="cpu", vision_num_layers=5)

    cfg = fast.frontend.config
    noise = np.random.default_rng(12).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    fp32, bf16 = Pi05TorchFrontendCpu(str(checkpoint)), Pi05TorchFrontendCpu(str(checkpoint), dtype="bfloat16")
    outs = []
    for frontend in (fp32, bf16):
        frontend.set_prompt(PROMPT, state=state)
        outs.append(frontend.infer({"images": images}, noise=noise))
    cos = float(np.dot(outs[0].ravel(), outs[1].ravel()) / np.linalg.norm(outs[0]) / np.linalg.norm(outs[1]))
    assert cos > 0.999, cos


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_frontend_on_cuda_matches_cpu(checkpoint):
    from flashrt_pi05.frontend_torch_cpu import Pi05TorchFrontendCpu

    images, state = observation(13)
    cpu, gpu = Pi05TorchFrontendCpu(str(checkpoint)), Pi05TorchFrontendCpu(str(checkpoint), device="cuda")
    assert gpu.model.device.type == "cuda"
    noise = np.random.default_rng(14).standard_normal((cpu.config.action_horizon, cpu.config.action_dim))
    outs = []
    for frontend in (cpu, gpu):
        frontend.set_prompt(PROMPT, state=state)
        outs.append(frontend.infer({"images": images}, noise=noise.astype(np.float32)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-3 * max(1.0, np.abs(outs[0]).max()))
