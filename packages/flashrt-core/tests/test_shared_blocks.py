"""flash_rt.models.{gemma, siglip, paligemma_expert, pi_preprocess} against independent float64
computations written differently (loops, einsum, complex rotations), on random weights and inputs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flash_rt.errors import ConfigError, InputError  # noqa: E402
from flash_rt.models import gemma, pi_preprocess, siglip  # noqa: E402
from flash_rt.models.paligemma_expert import (  # noqa: E402
    PaliGemmaWithExpert,
    sinusoidal_time_embedding,
)
from flash_rt.models.pi_config import GemmaDims, PiConfig, VisionDims  # noqa: E402

_spec = importlib.util.spec_from_file_location("pi_functional_reference", Path(__file__).with_name("pi_functional_reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

D64 = torch.float64
TOL = 1e-4  # max abs error / max(1, max |ref|), fp32 against float64


def rel_err(ours, expected) -> float:
    ours, expected = torch.as_tensor(ours).double(), torch.as_tensor(expected).double()
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    assert torch.isfinite(ours).all()
    return ((ours - expected).abs().max() / max(1.0, expected.abs().max().item())).item()


def randomize(module, seed=0, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            # SigLIP LayerNorm scales near 1, so what follows a LayerNorm keeps its size
            p.copy_(1.0 + 0.2 * noise if ("layer_norm" in name or "post_layernorm" in name) and name.endswith("weight")
                    else noise * std)
    return module


GDIMS = GemmaDims(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=16)
EXPERT_DIMS = GemmaDims(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16)
VDIMS = VisionDims(width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=7, image_size=28)


# ---- Gemma pieces --------------------------------------------------------------------------
def test_rms_norm_matches_formula():
    norm = randomize(gemma.RMSNorm(48), seed=1, std=0.5)
    x = torch.randn(3, 5, 48) * 3
    y, gate = norm(x)
    x64 = x.double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight.double())
    assert gate is None
    assert rel_err(y, expected) < 1e-6


def test_rms_norm_bf16_input_is_normalised_in_fp32():
    norm = randomize(gemma.RMSNorm(64), seed=2, std=0.5)
    x = (torch.randn(2, 7, 64) * 50).to(torch.bfloat16)
    y, _ = norm(x)
    x64 = x.double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight.double())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, expected) < 1e-2  # one bf16 rounding of the output only


def test_adaptive_rms_norm_scale_shift_gate_order():
    norm = randomize(gemma.AdaptiveRMSNorm(16, 8), seed=3, std=0.5)
    x, cond = torch.randn(2, 4, 16), torch.randn(2, 8)
    y, gate = norm(x, cond)
    for b in range(2):
        mod = norm.dense.weight.double() @ cond[b].double() + norm.dense.bias.double()
        scale, shift, g = mod[:16], mod[16:32], mod[32:]
        x64 = x[b].double()
        expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6) * (1 + scale) + shift
        assert rel_err(y[b], expected) < 1e-5
        assert rel_err(gate[b].expand(4, 16), g.expand(4, 16)) < 1e-5
    with pytest.raises(TypeError):
        norm(x, None)


def test_rope_is_split_half_rotation():
    head_dim = 16
    positions = torch.tensor([[0, 3, 7, 250], [1, 1, 2, 9]])
    x = torch.randn(2, 3, 4, head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = gemma.rope_tables(positions, head_dim)
    y = gemma.apply_rope(x, cos, sin)
    for b in range(2):
        for h in range(3):
            for t in range(4):
                for i in range(head_dim // 2):
                    angle = positions[b, t].item() / 10000 ** (2 * i / head_dim)
                    a, c = x[b, h, t, i].item(), x[b, h, t, i + head_dim // 2].item()
                    # the tables hold fp32 angles (as openpi's): at position 250 the fp32 power and
                    # product (a few 1e-7 relative) move the result by ~angle * 1e-7 * |x|, which
                    # exceeds a flat 1e-5 for some draws
                    tol = 1e-5 + 4e-7 * angle * (abs(a) + abs(c))
                    assert y[b, h, t, i].item() == pytest.approx(a * math.cos(angle) - c * math.sin(angle), abs=tol)
                    assert y[b, h, t, i + head_dim // 2].item() == pytest.approx(
                        c * math.cos(angle) + a * math.sin(angle), abs=tol
                    )


def test_attention_mask_semantics_by_loops():
    ar = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 1], [1, 0, 1, 0, 0, 0, 1, 0]])
    valid = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    allowed = gemma.attention_allowed(ar, valid)
    for b in range(2):
        cum = np.cumsum(ar[b].numpy())
        for i in range(8):
            for j in range(8):
                want = bool(valid[b, i] and valid[b, j] and cum[j] <= cum[i])
                assert allowed[b, i, j].item() == want, (b, i, j)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_mqa_attention_against_per_head_loop(num_kv_heads):
    batch, heads, tq, tk, hd = 2, 4, 5, 9, 8
    q = torch.randn(batch, heads, tq, hd)
    k, v = torch.randn(batch, num_kv_heads, tk, hd), torch.randn(batch, num_kv_heads, tk, hd)
    allowed = torch.rand(batch, tq, tk) > 0.3
    allowed[0, 2] = False  # a row with nothing allowed: uniform, not NaN (openpi's finite constant)
    out = gemma.attend(q, k, v, allowed)
    expected = torch.empty(batch, tq, heads * hd, dtype=D64)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // num_kv_heads)
            for i in range(tq):
                logits = [
                    (q[b, h, i].double() @ k[b, kv, j].double()).item() / math.sqrt(hd) if allowed[b, i, j] else -1e300
                    for j in range(tk)
                ]
                w = torch.softmax(torch.tensor(logits, dtype=D64), 0)
                expected[b, i, h * hd : (h + 1) * hd] = w @ v[b, kv].double()
    assert rel_err(out, expected) < 1e-5


def test_gemma_mlp_is_geglu():
    mlp = randomize(gemma.GemmaMLP(GDIMS), seed=4, std=0.2)
    x = torch.randn(3, GDIMS.width)
    s = {k: v.double() for k, v in mlp.state_dict().items()}
    gate = x.double() @ s["gate_proj.weight"].T
    expected = (ref.gelu_tanh(gate) * (x.double() @ s["up_proj.weight"].T)) @ s["down_proj.weight"].T
    assert rel_err(mlp(x), expected) < 1e-5


@pytest.mark.parametrize("adaptive", [False, True])
def test_gemma_stack_single_stream(adaptive):
    model = randomize(gemma.GemmaModel(GDIMS, vocab_size=50, cond_dim=24 if adaptive else None), seed=5)
    tokens = torch.tensor([[3, 9, 17, 42, 8, 1]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    ar = torch.tensor([[0, 0, 0, 1, 1, 1]])  # prefix-LM, then causal
    cond = torch.randn(1, 24) if adaptive else None
    x = model.embed(tokens)
    positions = torch.cumsum(valid.long(), 1) - 1
    out = model(x, positions, gemma.attention_allowed(ar, valid), cond=cond)
    sd = ref.sd64({f"m.{k}": v for k, v in model.state_dict().items()})
    x64 = sd["m.embed_tokens.weight"][tokens[0]] * math.sqrt(GDIMS.width)
    (expected,) = ref.joint(sd, [("m.", x64, None if cond is None else cond[0].double())], ar[0].tolist(),
                            valid[0].tolist(), GDIMS.num_heads, GDIMS.num_kv_heads, GDIMS.head_dim)
    keep = valid[0]
    assert rel_err(out[0][keep], expected[keep]) < TOL


def test_gemma_stack_with_kv_cache_equals_one_pass():
    model = randomize(gemma.GemmaModel(GDIMS, vocab_size=50), seed=6)
    tokens = torch.randint(0, 50, (2, 10))
    valid = torch.ones(2, 10, dtype=torch.bool)
    ar = torch.tensor([[0] * 6 + [1] * 4] * 2)
    positions = torch.arange(10)[None].expand(2, -1)
    allowed = gemma.attention_allowed(ar, valid)
    full = model(model.embed(tokens), positions, allowed)
    _, (keys, values) = model(model.embed(tokens[:, :6]), positions[:, :6], allowed[:, :6, :6], return_kv=True)
    cache = gemma.KVCache(keys, values, valid[:, :6], valid[:, :6].long().sum(1))
    rest = model(model.embed(tokens[:, 6:]), positions[:, 6:], allowed[:, 6:, :], past=cache)
    assert rel_err(rest, full[:, 6:]) < 1e-5


# ---- SigLIP --------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers, pool", [(None, 1), (2, 1), (None, 2), (1, 4)])
def test_siglip_tower_against_patch_reshape_reference(num_layers, pool):
    tower = randomize(siglip.SiglipVisionTower(VDIMS), seed=7, std=0.2)
    images = torch.rand(2, 28, 28, 3) * 2 - 1
    out = tower(images.permute(0, 3, 1, 2), num_layers, pool)
    sd = ref.sd64({f"vision_tower.{k}": v for k, v in tower.state_dict().items()})
    expected = ref.siglip(sd, images.double(), "", VDIMS.num_heads, num_layers, pool)
    assert out.shape == (2, 16 // pool**2, VDIMS.width)
    assert rel_err(out, expected) < TOL


def test_siglip_rejects_bad_knobs():
    tower = siglip.SiglipVisionTower(VDIMS)
    with pytest.raises(ValueError):
        tower(torch.zeros(1, 3, 28, 28), num_layers=4)
    with pytest.raises(ValueError):
        siglip.pool_tokens(torch.zeros(1, 16, 8), 3)


# ---- the joint PaliGemma + expert stack ----------------------------------------------------
def tiny_config(model_type="pi05", **kw) -> PiConfig:
    base = GemmaDims(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=16)
    return PiConfig(model_type=model_type, paligemma=base, expert=EXPERT_DIMS, vision=VDIMS, vocab_size=64,
                    action_horizon=4, **kw)


@pytest.mark.parametrize("adaptive", [False, True])
def test_joint_forward_against_float64_reference(adaptive):
    model = randomize(PaliGemmaWithExpert(tiny_config(), adaptive_expert=adaptive), seed=8)
    prefix = torch.randn(1, 7, 48)
    prefix_valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    suffix = torch.randn(1, 5, 32)
    suffix_ar = torch.tensor([[1, 1, 0, 0, 0]])
    cond = torch.randn(1, 32) if adaptive else None
    pre_out, suf_out = model.joint_forward(prefix, prefix_valid, suffix, suffix_ar, cond)
    sd = ref.sd64({f"paligemma_with_expert.{k}": v for k, v in model.state_dict().items()})
    ar = [0] * 7 + suffix_ar[0].tolist()
    valid = prefix_valid[0].tolist() + [True] * 5
    exp_pre, exp_suf = ref.joint(
        sd, [(ref.LLM, prefix[0].double(), None), (ref.EXPERT, suffix[0].double(), None if cond is None else cond[0].double())],
        ar, valid, 4, 1, 16,
    )
    assert rel_err(suf_out[0], exp_suf) < TOL
    assert rel_err(pre_out[0][:5], exp_pre[:5]) < TOL


def test_cached_prefix_suffix_equals_joint_forward():
    model = randomize(PaliGemmaWithExpert(tiny_config(), adaptive_expert=True), seed=9)
    prefix = torch.randn(2, 9, 48)
    prefix_valid = torch.ones(2, 9, dtype=torch.bool)
    prefix_valid[1, 6:] = False
    suffix = torch.randn(2, 4, 32)
    suffix_ar = torch.tensor([[1, 0, 0, 0]] * 2)
    cond = torch.randn(2, 32)
    _, joint = model.joint_forward(prefix, prefix_valid, suffix, suffix_ar, cond)
    cached = model.suffix_forward(suffix, suffix_ar, model.prefix_kv(prefix, prefix_valid), cond)
    assert rel_err(cached, joint) < 1e-5


def test_mismatched_stream_dims_are_a_config_error():
    bad = GemmaDims(width=32, depth=3, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16)
    with pytest.raises(ConfigError, match="depth"):
        PaliGemmaWithExpert(PiConfig(model_type="pi0", paligemma=GDIMS, expert=bad, vision=VDIMS), adaptive_expert=False)


def test_time_embedding_matches_formula():
    t = torch.tensor([1.0, 0.3, 0.0])
    emb = sinusoidal_time_embedding(t, 32)
    for i, tv in enumerate([1.0, 0.3, 0.0]):
        assert rel_err(emb[i], ref.time_embedding(float(np.float32(tv)), 32)) < 1e-6


# ---- preprocessing -------------------------------------------------------------------------
def test_resize_with_pad_keeps_aspect_and_pads_black():
    rng = np.random.default_rng(0)
    img = rng.integers(1, 256, size=(120, 240, 3), dtype=np.uint8)
    out = pi_preprocess.resize_with_pad(img, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 240x120 -> 224x112, padded 56 rows top and bottom
    assert (out[:56] == 0).all() and (out[168:] == 0).all()
    assert (out[56:168] > 0).mean() > 0.99
    # a constant image stays constant inside the resized area
    flat = np.full((100, 50, 3), 77, dtype=np.uint8)
    out = pi_preprocess.resize_with_pad(flat, 224)
    assert (out[:, 56:168] == 77).all() and (out[:, :56] == 0).all() and (out[:, 168:] == 0).all()


def test_resize_same_size_is_identity_and_scaling():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    assert np.array_equal(pi_preprocess.resize_with_pad(img, 224), img)
    prepared = pi_preprocess.prepare_images([img, img[::-1]], 2)
    assert prepared.shape == (2, 224, 224, 3) and prepared.dtype == np.float32
    np.testing.assert_allclose(prepared[0], img / 255.0 * 2 - 1, atol=1e-6)


def test_prepare_images_dict_order_and_camera_keys():
    rng = np.random.default_rng(2)
    a, b, c = (rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8) for _ in range(3))
    out = pi_preprocess.prepare_images({"wrist_image": b, "image": a}, 2)
    np.testing.assert_allclose(out[1], b / 255.0 * 2 - 1, atol=1e-6)
    out = pi_preprocess.prepare_images({"cam_base": a, "cam_left": b, "cam_right": c}, 3,
                                       camera_keys=("cam_base", "cam_left", "cam_right"))
    np.testing.assert_allclose(out[2], c / 255.0 * 2 - 1, atol=1e-6)
    out = pi_preprocess.prepare_images({"images": [a]}, 1)
    assert out.shape == (1, 224, 224, 3)


@pytest.mark.parametrize(
    "images, match",
    [
        ([np.zeros((224, 224), np.uint8)] * 2, r"\(H, W, 3\)"),
        ([np.zeros((224, 224, 4), np.uint8)] * 2, r"\(H, W, 3\)"),
        ([np.zeros((3, 224, 224), np.uint8)] * 2, "channels-first"),
        ([np.zeros((224, 224, 3), np.float32)] * 2, "uint8"),
        ([np.zeros((224, 224, 3), np.uint8)] * 3, "num_views=2"),
        ([np.zeros((224, 224, 3), np.uint8)], "num_views=2"),
        ({"image": np.zeros((224, 224, 3), np.uint8)}, "wrist_image"),
        (np.zeros((2, 224, 224, 3), np.uint8), "list"),
        (["not an image", np.zeros((224, 224, 3), np.uint8)], "numpy array"),
    ],
)
def test_bad_images_are_input_errors(images, match):
    with pytest.raises(InputError, match=match):
        pi_preprocess.prepare_images(images, 2)


def test_validate_state():
    np.testing.assert_array_equal(pi_preprocess.validate_state([1, 2, 3], 3, 32, "Pi0"), [1, 2, 3])
    for bad, match in [([1, np.nan, 3], "NaN"), ([1, np.inf, 3], "finite"), ([1, 2], "3 values"),
                       (np.zeros((2, 3)), "1-D"), (None, "needs the robot state"), ("abc", "numbers")]:
        with pytest.raises(InputError, match=match):
            pi_preprocess.validate_state(bad, 3, 32, "Pi0")
    with pytest.raises(InputError, match="at most 4"):
        pi_preprocess.validate_state(np.ones(5), None, 4, "Pi0")


@pytest.mark.parametrize("shape", [(480, 640), (100, 50), (300, 224), (720, 1280)])
def test_resize_with_pad_matches_jax_image_resize(shape):
    """openpi resizes with jax.image.resize (linear, antialiased), rounds to uint8 and pads with 0."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ratio = max(shape[1] / 224, shape[0] / 224)
    rh, rw = int(shape[0] / ratio), int(shape[1] / ratio)
    resized = jax.image.resize(jnp.asarray(image, dtype=jnp.float32), (rh, rw, 3), method="linear")
    expected = np.zeros((224, 224, 3), np.uint8)
    top, left = (224 - rh) // 2, (224 - rw) // 2
    expected[top : top + rh, left : left + rw] = np.asarray(jnp.round(resized).clip(0, 255)).astype(np.uint8)
    diff = np.abs(pi_preprocess.resize_with_pad(image, 224).astype(int) - expected.astype(int))
    assert diff.max() <= 1  # rounding ties only
