"""Pi05Reference against an independent float64 implementation (pi_functional_reference.py in
flashrt-core's tests), stage by stage and end to end, on random weights and inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from flash_rt.models.pi_config import GemmaDims, PiConfig, VisionDims  # noqa: E402
from flashrt_pi05.reference import Pi05Reference  # noqa: E402

_path = Path(__file__).parents[2] / "flashrt-core" / "tests" / "pi_functional_reference.py"
_spec = importlib.util.spec_from_file_location("pi_functional_reference", _path)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

TOL = 1e-4


def tiny_config(**kw) -> PiConfig:
    llm = GemmaDims(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=16)
    expert = GemmaDims(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16)
    vision = VisionDims(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=7, image_size=28)
    return PiConfig(model_type="pi05", paligemma=llm, expert=expert, vision=vision, vocab_size=64,
                    action_horizon=5, max_token_len=12, **kw)


def random_model(seed=0, **kw) -> Pi05Reference:
    model = Pi05Reference(tiny_config(), **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # adaRMS Dense layers included: zero ones would test nothing
            noise = torch.randn(p.shape, generator=gen)
            layer_norm_scale = ("layer_norm" in name or "post_layernorm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if layer_norm_scale else noise * 0.1)
    return model.eval()


def inputs(views=2, seed=1, valid_tokens=9):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(1, views, 28, 28, 3, generator=gen) * 2 - 1
    tokens = torch.randint(0, 64, (1, 12), generator=gen)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :valid_tokens] = True
    noise = torch.randn(1, 5, 32, generator=gen)
    return images, tokens, mask, noise


def rel_err(ours, expected) -> float:
    ours, expected = torch.as_tensor(ours).double(), torch.as_tensor(expected).double()
    assert ours.shape == expected.shape and torch.isfinite(ours).all()
    return ((ours - expected).abs().max() / max(1.0, expected.abs().max().item())).item()


def test_state_dict_names_are_openpi_names():
    keys = set(Pi05Reference(tiny_config()).state_dict())
    assert "paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight" in keys
    assert "paligemma_with_expert.gemma_expert.model.norm.dense.bias" in keys
    assert "time_mlp_in.weight" in keys and "state_proj.weight" not in keys
    assert not any("lm_head" in k for k in keys)


@pytest.mark.parametrize("views, valid_tokens", [(1, 12), (2, 9), (3, 4)])
def test_sample_actions_matches_float64_reference(views, valid_tokens):
    model = random_model()
    images, tokens, mask, noise = inputs(views, valid_tokens=valid_tokens)
    ours = model.sample_actions(images, tokens, mask, noise)
    expected = ref.sample_actions(ref.sd64(model.state_dict()), model.config, images[0], tokens[0], mask[0],
                                  noise[0], pi05=True)
    assert rel_err(ours[0], expected) < TOL


@pytest.mark.parametrize("num_layers, pool", [(1, 1), (None, 2)])
def test_vision_speed_knobs_match_reference(num_layers, pool):
    model = random_model(vision_num_layers=num_layers, vision_pool_factor=pool)
    images, tokens, mask, noise = inputs(2)
    ours = model.sample_actions(images, tokens, mask, noise, num_steps=3)
    expected = ref.sample_actions(ref.sd64(model.state_dict()), model.config, images[0], tokens[0], mask[0],
                                  noise[0], pi05=True, num_steps=3, vision_num_layers=num_layers, pool=pool)
    assert rel_err(ours[0], expected) < TOL


def test_cached_velocity_equals_joint_forward_at_every_step():
    model = random_model(seed=3)
    images, tokens, mask, noise = inputs(2)
    kv = model.compute_prefix_kv(images, tokens, mask)
    x = noise
    for t in (1.0, 0.6, 0.1):
        cached = model.denoise_velocity(x, t, kv)
        joint = model.velocity_joint(images, tokens, mask, x, t)
        assert rel_err(cached, joint) < 1e-5
        x = x - 0.3 * cached


def test_image_mask_equals_dropping_the_view():
    # openpi masks an absent slot; we leave it out. Same velocity (positions skip invalid tokens).
    model = random_model(seed=4)
    images, tokens, mask, noise = inputs(3)
    with_mask = model.compute_prefix_kv(images, tokens, mask, image_mask=torch.tensor([[True, True, False]]))
    dropped = model.compute_prefix_kv(images[:, :2], tokens, mask)
    v1 = model.denoise_velocity(noise, 0.5, with_mask)
    v2 = model.denoise_velocity(noise, 0.5, dropped)
    assert rel_err(v1, v2) < 1e-5


def test_batch_of_two_equals_two_single_runs():
    model = random_model(seed=5)
    a = inputs(2, seed=1, valid_tokens=9)
    b = inputs(2, seed=2, valid_tokens=5)
    both = model.sample_actions(*(torch.cat([x, y]) for x, y in zip(a, b)), num_steps=2)
    assert rel_err(both[0], model.sample_actions(*a, num_steps=2)[0]) < 1e-5
    assert rel_err(both[1], model.sample_actions(*b, num_steps=2)[0]) < 1e-5


def test_bf16_close_to_fp32():
    model = random_model(seed=6)
    images, tokens, mask, noise = inputs(2)
    fp32 = model.sample_actions(images, tokens, mask, noise)
    bf16 = random_model(seed=6).to_precision(torch.bfloat16)
    assert bf16.paligemma_with_expert.llm.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert bf16.paligemma_with_expert.expert.layers[0].input_layernorm.dense.weight.dtype == torch.float32
    out = bf16.sample_actions(images, tokens, mask, noise)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), fp32.flatten(), dim=0).item()
    assert out.dtype == torch.float32 and cos > 0.999 and rel_err(out, fp32) < 3e-2


def test_load_state_dict_strict_round_trip():
    model = random_model(seed=7)
    other = Pi05Reference(tiny_config())
    other.load_state_dict(model.state_dict(), strict=True)
    images, tokens, mask, noise = inputs(1)
    assert torch.equal(other.sample_actions(images, tokens, mask, noise, num_steps=2),
                       model.sample_actions(images, tokens, mask, noise, num_steps=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = random_model(seed=8)
    images, tokens, mask, noise = inputs(2)
    cpu = model.sample_actions(images, tokens, mask, noise)
    gpu = model.cuda().sample_actions(images.cuda(), tokens.cuda(), mask.cuda(), noise.cuda())
    assert rel_err(gpu.cpu(), cpu) < 1e-3
