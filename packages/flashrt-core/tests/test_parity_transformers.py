"""Parity: our SigLIP tower and Gemma stack against transformers' SiglipVisionModel / GemmaModel on the
same random weights (fp32, max abs err / max(1, max |ref|) <= 1e-4). Runs in `nox -s parity`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flash_rt.models import gemma, siglip  # noqa: E402
from flash_rt.models.pi_config import GemmaDims, VisionDims  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


def rel_err(ours, expected) -> float:
    ours, expected = ours.double(), expected.double()
    assert ours.shape == expected.shape and torch.isfinite(ours).all()
    return ((ours - expected).abs().max() / max(1.0, expected.abs().max().item())).item()


def randomize(module, seed, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            # LayerNorm scales near 1 (RMSNorm's are stored as w in (1 + w)), so the outputs keep their size
            layer_norm_scale = "layer_norm" in name and name.endswith("weight") or name.endswith("layernorm.weight")
            p.copy_(1.0 + 0.2 * noise if layer_norm_scale and "self_attn" not in name else noise * std)


@pytest.mark.parametrize(
    "dims",
    [
        VisionDims(width=64, depth=3, mlp_dim=128, num_heads=4, patch_size=14, image_size=56),
        VisionDims(width=1152, depth=1, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224),  # So400m layer
    ],
)
def test_siglip_tower_matches_transformers(dims):
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=dims.width, intermediate_size=dims.mlp_dim, num_hidden_layers=dims.depth,
        num_attention_heads=dims.num_heads, num_channels=3, image_size=dims.image_size,
        patch_size=dims.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        vision_use_head=False, attention_dropout=0.0,
    )
    hf = transformers.SiglipVisionModel(hf_config).eval()
    hf.config._attn_implementation = "eager"
    randomize(hf, seed=1)
    ours = siglip.SiglipVisionTower(dims).eval()
    hf_state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v  # transformers 5 drops the prefix
                for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(hf_state, strict=True)
    pixels = torch.rand(2, 3, dims.image_size, dims.image_size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert rel_err(got, expected) < TOL


def _hf_gemma(dims: GemmaDims, vocab: int, seed: int):
    hf_config = transformers.GemmaConfig(
        vocab_size=vocab, hidden_size=dims.width, intermediate_size=dims.mlp_dim, num_hidden_layers=dims.depth,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads, head_dim=dims.head_dim,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0, attention_dropout=0.0,
        max_position_embeddings=512,
    )
    hf = transformers.GemmaModel(hf_config).eval()
    hf.config._attn_implementation = "eager"
    randomize(hf, seed)
    ours = gemma.GemmaModel(dims, vocab_size=vocab).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if "rotary" not in k}, strict=True)
    return hf, ours


@pytest.mark.parametrize(
    "dims",
    [
        GemmaDims(width=64, depth=3, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),  # MQA
        GemmaDims(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=24),  # GQA
        GemmaDims(width=256, depth=1, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=256),  # Pi head_dim
    ],
)
def test_gemma_layers_and_stack_match_transformers(dims):
    hf, ours = _hf_gemma(dims, vocab=97, seed=3)
    tokens = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        length = tokens.shape[1]
        positions = torch.arange(length)[None].expand(2, -1)
        allowed = gemma.attention_allowed(torch.ones(2, length, dtype=torch.long), torch.ones(2, length, dtype=torch.bool))
        x = ours.embed(tokens)
        assert rel_err(x, out.hidden_states[0]) < TOL
        cos, sin = gemma.rope_tables(positions, dims.head_dim)
        for i, layer in enumerate(ours.layers):  # layer by layer: each from HF's own input to it
            hf_in = out.hidden_states[i]
            q, k, v, gate = layer.project_qkv(hf_in, cos, sin)
            y = layer.finish(hf_in, gemma.attend(q, k, v, allowed), gate)
            if i + 1 < len(ours.layers):
                assert rel_err(y, out.hidden_states[i + 1]) < TOL, f"layer {i}"
        stack = ours(x, positions, allowed)
    assert rel_err(stack, out.last_hidden_state) < TOL
