"""Parity with lerobot 0.6.1 (an independent implementation): Pi0.5 and Pi0, fp32, CPU.

lerobot builds a small random-weight PI05Policy / PI0Policy, writes it with ``save_pretrained``;
flash_rt reads that directory (``load_pi_checkpoint``) into its reference model; both then run
``sample_actions`` on the same images, prompt tokens, state and noise. Pass:
max |ours - lerobot| / max(1, max |lerobot|) <= 1e-4.

lerobot only knows the full-size variants (``gemma_2b`` / ``gemma_300m``, SigLIP So400m), far too
big for a 2-core CI machine, so the test shrinks them the only way lerobot allows: it swaps the
variant table (``get_gemma_config``) and sets the SigLIP / projector sizes on the PaliGemma config
lerobot builds, just before lerobot instantiates the model from it. lerobot's own modules, init, forward code and ``save_pretrained`` are used unchanged; the
adaRMS projections (zero-initialised by lerobot) and every other tensor get non-zero random values.
lerobot's config.json cannot express those dims, so the test adds ``paligemma_dims`` /
``action_expert_dims`` / ``vision_dims`` to it (the documented way tiny checkpoints declare dims).

Run by ``nox -s parity`` (Python 3.12 + lerobot[pi]==0.6.1); skipped where lerobot is not installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")
pytest.importorskip("transformers")

from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER, PaligemmaTokenizer  # noqa: E402
from flash_rt.models.pi_checkpoint import load_pi_checkpoint  # noqa: E402
from flash_rt.models.pi_config import CAMERA_SLOTS, GemmaDims, PiConfig, VisionDims  # noqa: E402
from flash_rt.models.pi_make_checkpoint import random_state_dict  # noqa: E402

TOLERANCE = 1e-4
# Expert width != LLM width; 8 heads (lerobot hard-codes 8 in its joint attention), MQA.
LLM = GemmaDims(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16)
EXPERT = GemmaDims(width=32, depth=2, mlp_dim=96, num_heads=8, num_kv_heads=1, head_dim=16)
VISION = VisionDims(width=48, depth=2, mlp_dim=80, num_heads=4, patch_size=14, image_size=224)
HORIZON = 12
STATE_DIM, ACTION_DIM = 6, 5  # the robot's real dims, below the padded 32
PROMPTS = ["pick up the red block", "  Open_the top drawer\nand put the bowl inside, then close it  ", "go"]


def _tiny_lerobot(monkeypatch, model_type: str):
    """A lerobot policy of our tiny dims, built by lerobot's own code."""
    if model_type == "pi05":
        from lerobot.policies.pi05 import modeling_pi05 as modeling
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy as Policy
    else:
        from lerobot.policies.pi0 import modeling_pi0 as modeling
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy as Policy

    variants = {"gemma_2b": LLM, "gemma_300m": EXPERT}
    monkeypatch.setattr(modeling, "get_gemma_config",
                        lambda variant: modeling.GemmaConfig(**asdict(variants[variant])))

    build_paligemma = modeling.PaliGemmaForConditionalGenerationWithPiGemma

    def tiny_paligemma(config):
        # lerobot sets the real SigLIP sizes (4304, projection 2048) on the config just before this
        # call; give the vision tower our tiny dims instead.
        vision = config.vision_config
        vision.hidden_size, vision.num_hidden_layers = VISION.width, VISION.depth
        vision.num_attention_heads, vision.intermediate_size = VISION.num_heads, VISION.mlp_dim
        vision.patch_size, vision.image_size = VISION.patch_size, VISION.image_size
        vision.projection_dim = config.projection_dim = LLM.width
        return build_paligemma(config=config)

    monkeypatch.setattr(modeling, "PaliGemmaForConditionalGenerationWithPiGemma", tiny_paligemma)
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {f"observation.images.{slot}": PolicyFeature(FeatureType.VISUAL, (3, 224, 224))
              for slot in CAMERA_SLOTS}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (STATE_DIM,))
    config = Config(device="cpu", dtype="float32", chunk_size=HORIZON, n_action_steps=HORIZON,
                    input_features=inputs,
                    output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))})
    torch.manual_seed(0)
    return Policy(config).eval()


@pytest.fixture(scope="module", params=["pi05", "pi0"])
def pair(request, tmp_path_factory):
    """(model type, lerobot policy, flash_rt reference loaded from lerobot's save_pretrained dir)."""
    model_type = request.param
    monkeypatch = pytest.MonkeyPatch()
    try:
        policy = _tiny_lerobot(monkeypatch, model_type)
    finally:
        monkeypatch.undo()
    ours_config = PiConfig(model_type=model_type, paligemma=LLM, expert=EXPERT, vision=VISION,
                           action_horizon=HORIZON, max_token_len=200 if model_type == "pi05" else 48)
    weights = random_state_dict(ours_config, seed=1)  # adaRMS dense layers included: non-zero
    missing, unexpected = policy.model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # only the LM heads, which we do not model
    assert not any(torch.equal(v, torch.zeros_like(v)) for k, v in policy.model.state_dict().items()
                   if ".dense." in k)

    directory = tmp_path_factory.mktemp(f"lerobot_{model_type}")
    policy.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["type"] == model_type
    config.update(paligemma_dims=asdict(LLM), action_expert_dims=asdict(EXPERT), vision_dims=asdict(VISION))
    (directory / "config.json").write_text(json.dumps(config))

    checkpoint = load_pi_checkpoint(directory, model_type)
    assert checkpoint.format == "lerobot"
    assert (checkpoint.config.state_dim, checkpoint.config.robot_action_dim) == (STATE_DIM, ACTION_DIM)
    assert checkpoint.config.action_horizon == HORIZON
    if model_type == "pi05":
        from flashrt_pi05.reference import Pi05Reference as Reference
    else:
        from flashrt_pi0.reference import Pi0Reference as Reference
    ours = Reference.from_checkpoint(checkpoint, device="cpu")
    return model_type, policy, ours, checkpoint


def _relative_error(ours, ref) -> float:
    return float((ours - ref).abs().max() / max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("num_views", [1, 2, 3])
@pytest.mark.parametrize("prompt_index", [0, 1, 2])
@pytest.mark.parametrize("state_scale", [0.6, 2.5])  # inside / partly outside [-1, 1]
def test_sample_actions_match_lerobot(pair, num_views, prompt_index, state_scale):
    model_type, policy, ours, checkpoint = pair
    seed = 100 * num_views + 10 * prompt_index + int(state_scale * 10)
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.0, 1.0, size=(num_views, 224, 224, 3)).astype(np.float32)
    state = (rng.uniform(-1.0, 1.0, size=STATE_DIM) * state_scale).astype(np.float32)
    tokenizer = PaligemmaTokenizer(STANDIN_TOKENIZER)
    max_len = checkpoint.config.max_token_len
    if model_type == "pi05":
        tokens, mask = tokenizer.tokenize_pi05(PROMPTS[prompt_index], state, max_len)
    else:
        tokens, mask = tokenizer.tokenize_pi0(PROMPTS[prompt_index], max_len)
    noise = torch.from_numpy(rng.standard_normal((1, HORIZON, 32)).astype(np.float32))
    state_padded = torch.zeros(1, 32)
    state_padded[0, :STATE_DIM] = torch.from_numpy(state)

    images_t = torch.from_numpy(images)
    tokens_t = torch.from_numpy(tokens)[None]
    mask_t = torch.from_numpy(mask)[None]
    lerobot_images = [images_t[v].permute(2, 0, 1)[None] for v in range(num_views)]
    lerobot_masks = [torch.ones(1, dtype=torch.bool) for _ in range(num_views)]
    with torch.no_grad():
        if model_type == "pi05":
            ref = policy.model.sample_actions(lerobot_images, lerobot_masks, tokens_t, mask_t, noise=noise.clone())
            got = ours.sample_actions(images_t[None], tokens_t, mask_t, noise.clone())
        else:
            ref = policy.model.sample_actions(lerobot_images, lerobot_masks, tokens_t, mask_t, state_padded,
                                              noise=noise.clone())
            got = ours.sample_actions(images_t[None], tokens_t, mask_t, noise.clone(), state=state_padded)
    assert got.shape == ref.shape == (1, HORIZON, 32)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e-3  # a real signal, not zeros
    error = _relative_error(got.float(), ref.float())
    assert error <= TOLERANCE, f"{model_type} views={num_views} prompt={prompt_index}: rel err {error:.2e}"
    # the robot's dims, as lerobot's policy returns them
    assert _relative_error(got[..., :ACTION_DIM], ref[..., :ACTION_DIM]) <= TOLERANCE


def test_weights_round_trip_through_lerobot(pair):
    """Every tensor flash_rt reads from lerobot's file equals lerobot's own parameter."""
    model_type, policy, ours, checkpoint = pair
    theirs = policy.model.state_dict()
    for name, value in checkpoint.state_dict.items():
        torch.testing.assert_close(value, theirs[name].float(), rtol=0, atol=0, msg=name)


def test_images_only_stage_matches(pair):
    """SigLIP + projector on their own (localises a failure of the end-to-end test)."""
    model_type, policy, ours, _ = pair
    rng = np.random.default_rng(7)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(2, 224, 224, 3)).astype(np.float32))
    with torch.no_grad():
        ref = torch.cat([policy.model.paligemma_with_expert.embed_image(images[v].permute(2, 0, 1)[None])
                         for v in range(2)], dim=1)
        got = ours.embed_images(images[None])
    assert _relative_error(got, ref) <= TOLERANCE



@pytest.mark.parametrize("state_mode,action_mode", [("QUANTILES", "QUANTILES"), ("MEAN_STD", "MEAN_STD"),
                                                    ("MIN_MAX", "QUANTILES")])
def test_norm_stats_match_lerobot_processors(tmp_path, state_mode, action_mode):
    """Stats files written by lerobot's own processor pipelines, read by flash_rt; the (un)normalised
    values against lerobot's own transforms, including a zero-range dimension."""
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor import NormalizerProcessorStep, PolicyProcessorPipeline, UnnormalizerProcessorStep

    from flash_rt.models.pi_norm import load_lerobot_norm_stats

    rng = np.random.default_rng(3)

    def stats(dim):
        mean, std = rng.normal(size=dim), rng.uniform(0.3, 2.0, dim)
        values = {"mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std,
                  "q01": mean - 2 * std, "q99": mean + 2 * std}
        for name in ("min", "max", "q01", "q99"):
            values[name][1] = mean[1]  # a constant dimension: zero range
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}

    dataset_stats = {"observation.state": stats(STATE_DIM), "action": stats(ACTION_DIM)}
    norm_map = {FeatureType.VISUAL: NormalizationMode.IDENTITY, FeatureType.STATE: NormalizationMode(state_mode),
                FeatureType.ACTION: NormalizationMode(action_mode)}
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))}
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))}
    normalizer = NormalizerProcessorStep(features={**inputs, **outputs}, norm_map=norm_map, stats=dataset_stats)
    unnormalizer = UnnormalizerProcessorStep(features=outputs, norm_map=norm_map, stats=dataset_stats)
    PolicyProcessorPipeline(steps=[normalizer], name="policy_preprocessor").save_pretrained(tmp_path)
    PolicyProcessorPipeline(steps=[unnormalizer], name="policy_postprocessor").save_pretrained(tmp_path)

    ours = load_lerobot_norm_stats(tmp_path)
    assert ours is not None and (ours.state_dim, ours.action_dim) == (STATE_DIM, ACTION_DIM)
    state = (rng.normal(size=STATE_DIM) * 2).astype(np.float32)
    expected = normalizer._apply_transform(torch.from_numpy(state), "observation.state", FeatureType.STATE)
    np.testing.assert_allclose(ours.normalize_state(state), expected.numpy(), rtol=1e-5, atol=1e-5)
    model_actions = rng.uniform(-1.2, 1.2, size=(HORIZON, 32)).astype(np.float32)
    expected = unnormalizer._apply_transform(torch.from_numpy(model_actions[:, :ACTION_DIM]), "action",
                                             FeatureType.ACTION, inverse=True)
    np.testing.assert_allclose(ours.unnormalize_actions(model_actions), expected.numpy(), rtol=1e-5, atol=1e-5)
