"""The Hopper pipeline's logic against the reference, on the CPU in fp32 (tiny random configs).

The same pipeline code runs on the GPU in bf16/FP8 under CUDA graphs (test_hopper_gpu.py); here it
runs eagerly in fp32 so that every fold (norm weights into GEMMs, dt into action_out_proj, Pi0's
action_in_proj into action_time_mlp_in), the exact-length prompt buckets (no padding) and the
cached suffix tricks (Pi0's state token, the skipped last prefix layer) are checked stage by stage.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from flash_rt.errors import CalibrationError, ConfigError, InputError

_spec = importlib.util.spec_from_file_location("hopper_testing", Path(__file__).with_name("hopper_testing.py"))
ht = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ht)

from flash_rt.models.paligemma_hopper import calibrate_amax, euler_times  # noqa: E402
from flash_rt.models.pi_preprocess import resize_with_pad  # noqa: E402
from flash_rt.models.pi_random_weights import random_state_dict, state_dict_shapes  # noqa: E402

MODELS = ["pi05", "pi0"]
COS_FP32 = 0.9999


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    config = ht.tiny_config(request.param)
    state_dict = random_state_dict(config, seed=7)
    return config, state_dict, ht.make_reference(config, state_dict)


def test_random_weights_cover_the_reference_exactly(model):
    config, state_dict, ref = model
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ref_shapes == state_dict_shapes(config)
    assert all(float(t.abs().max()) > 0 for t in state_dict.values())


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_stages_and_actions_match_reference_fp32(model, num_views):
    config, state_dict, ref = model
    prompt_len = 9
    inputs = ht.random_inputs(config, num_views, prompt_len, seed=num_views)
    want = ht.run_reference(ref, config, inputs)
    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=num_views, use_fp8=False)
    bucket = ht.load_pipeline_inputs(pipe, config, inputs)
    assert bucket.length == prompt_len

    pipe.prefix_x.fill_(float("nan"))
    pipe.run_vision()
    got = pipe.prefix_x[: pipe.num_image_tokens]
    assert torch.isfinite(got).all()
    assert ht.cosine(got, want["image_tokens"]) >= COS_FP32
    assert ht.rel_err(got, want["image_tokens"]) < 1e-4

    for cache in (*pipe.k_layers, *pipe.v_layers):
        cache.fill_(float("nan"))
    pipe.run_prefix(bucket)
    for layer in range(config.paligemma.depth):
        k_ref, v_ref = ht.prefix_kv_of_reference(want["kv"], layer, pipe.num_image_tokens, prompt_len)
        n = k_ref.shape[0]
        assert ht.rel_err(pipe.k_layers[layer][:n], k_ref) < 1e-4, f"prefix K of layer {layer}"
        assert ht.rel_err(pipe.v_layers[layer][:n], v_ref) < 1e-4, f"prefix V of layer {layer}"

    v1 = pipe.velocity(bucket, inputs["noise"], 0)
    assert ht.cosine(v1, want["v1"]) >= COS_FP32
    assert ht.rel_err(v1, want["v1"]) < 1e-4

    pipe.actions_host.fill_(float("nan"))
    actions = pipe.infer()
    assert np.isfinite(actions).all()
    assert ht.cosine(torch.from_numpy(actions), want["actions"]) >= COS_FP32
    assert ht.rel_err(torch.from_numpy(actions), want["actions"]) < 1e-4


def test_rows_ordered_for_fused_epilogues_give_the_same_actions(model):
    """The compiled kernels' pipelines permute the expert's qkv (RoPE pairs adjacent) and gate_up
    (gate / up interleaved) rows; ops without those fused GEMMs restore the natural column order.
    Same weights, same inputs: the permuted pipeline must give the natural one's actions."""
    from flash_rt.models.hopper_ops import TorchOps

    class OrderedTorchOps(TorchOps):
        fused_epilogues = True

    config, state_dict, _ = model
    inputs = ht.random_inputs(config, 2, 9, seed=5)
    results = []
    for ops in (TorchOps(torch.float32), OrderedTorchOps(torch.float32)):
        pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=2, use_fp8=False, ops=ops)
        ht.load_pipeline_inputs(pipe, config, inputs)
        results.append((pipe, torch.from_numpy(pipe.infer())))
    (natural, want), (ordered, got) = results
    assert ordered.expert[0].qkv.row_order == "rope" and ordered.expert[0].gate_up.row_order == "geglu"
    assert not torch.equal(ordered.expert[0].qkv.weight, natural.expert[0].qkv.weight)  # really permuted
    assert ht.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("pool,layers", [(2, None), (4, 1), (1, 2)])
def test_speed_knobs_match_reference_with_same_knobs(model, pool, layers):
    config, state_dict, _ = model
    ref = ht.make_reference(config, state_dict, vision_pool_factor=pool, vision_num_layers=layers)
    inputs = ht.random_inputs(config, 2, 6, seed=11)
    want = ht.run_reference(ref, config, inputs)
    pipe = ht.pipeline_class(config.model_type)(
        state_dict, config, num_views=2, use_fp8=False, vision_pool_factor=pool, vision_num_layers=layers
    )
    assert pipe.num_image_tokens == 2 * (4 // pool) ** 2
    ht.load_pipeline_inputs(pipe, config, inputs)
    assert ht.cosine(torch.from_numpy(pipe.infer()), want["actions"]) >= COS_FP32


def test_num_steps_override_matches_reference(model):
    config, state_dict, ref = model
    inputs = ht.random_inputs(config, 1, 5, seed=3)
    want = ht.run_reference(ref, config, inputs, num_steps=4)
    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=1, use_fp8=False, num_steps=4)
    ht.load_pipeline_inputs(pipe, config, inputs)
    assert ht.cosine(torch.from_numpy(pipe.infer()), want["actions"]) >= COS_FP32


def test_fp8_path_calibrates_and_stays_close(model):
    """FP8 W8A8 (on the CPU through the E4M3 values widened to fp32): first call calibrates from its inputs."""
    config, state_dict, ref = model
    inputs = ht.random_inputs(config, 2, 7, seed=5)
    want = ht.run_reference(ref, config, inputs)
    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=2, use_fp8=True)
    assert pipe.fp8_linears() and not pipe.calibrated
    ht.load_pipeline_inputs(pipe, config, inputs)
    actions = pipe.infer()
    assert pipe.calibrated
    amax = pipe.act_amax()
    assert all(np.isfinite(v) and v > 0 for v in amax.values())
    # tiny widths make FP8 noisier than at true size (>= 0.999 is the GPU test's bar)
    assert ht.cosine(torch.from_numpy(actions), want["actions"]) >= 0.99
    # scales live in device tensors: recalibration changes them in place, the result stays close
    pipe.clear_calibration()
    assert not pipe.calibrated
    again = pipe.infer()
    assert ht.cosine(torch.from_numpy(again), torch.from_numpy(actions)) >= 0.9999


def test_buckets_are_per_prompt_length_and_reused(model):
    config, state_dict, _ = model
    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=1, use_fp8=False)
    first = pipe.set_prompt_tokens([2, 5, 6, 7, 8])
    second = pipe.set_prompt_tokens([2, 9, 9])
    again = pipe.set_prompt_tokens([2, 4, 4, 4, 4])
    assert again is first and second is not first
    assert sorted(pipe.buckets) == [3, 5]
    assert pipe.current is first
    assert pipe.bucket_ids_match(first, [2, 4, 4, 4, 4])
    with pytest.raises(InputError, match="tokens"):
        pipe.set_prompt_tokens(list(range(config.max_token_len + 1)))
    with pytest.raises(InputError):
        pipe.set_prompt_tokens([])


def test_same_length_prompts_give_their_own_actions(model):
    """A bucket is reused across prompts of one length: the ids are data, not baked into it."""
    config, state_dict, ref = model
    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=1, use_fp8=False)
    for seed in (21, 22):
        inputs = ht.random_inputs(config, 1, 6, seed=seed)
        want = ht.run_reference(ref, config, inputs)
        ht.load_pipeline_inputs(pipe, config, inputs)
        assert ht.cosine(torch.from_numpy(pipe.infer()), want["actions"]) >= COS_FP32
    assert list(pipe.buckets) == [6]


def test_bad_options_and_weights_are_config_errors(model):
    config, state_dict, _ = model
    cls = ht.pipeline_class(config.model_type)
    with pytest.raises(ConfigError, match="vision_pool_factor"):
        cls(state_dict, config, vision_pool_factor=3, use_fp8=False)
    with pytest.raises(ConfigError, match="vision_num_layers"):
        cls(state_dict, config, vision_num_layers=config.vision.depth + 1, use_fp8=False)
    with pytest.raises(ConfigError, match="num_views"):
        cls(state_dict, config, num_views=4, use_fp8=False)
    missing = dict(state_dict)
    missing.pop("action_out_proj.weight")
    with pytest.raises(ConfigError, match="action_out_proj.weight"):
        cls(missing, config, use_fp8=False)
    extra = dict(state_dict, **{"some.unknown.weight": torch.ones(3)})
    with pytest.raises(ConfigError, match="does not use"):
        cls(extra, config, use_fp8=False)
    with pytest.raises(ConfigError, match="CUDA"):
        cls(state_dict, config, use_graphs=True, device="cpu")


def test_infer_without_prompt_is_an_input_error(model):
    config, state_dict, _ = model
    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=1, use_fp8=False)
    with pytest.raises(InputError, match="prompt"):
        pipe.infer()


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_fp8_linear_matches_scaled_mm(act_dtype, bias):
    """On the CPU the FP8 GEMM widens E4M3 to fp32 instead of calling torch's (very slow there)
    _scaled_mm: the same products and fp32 sum, so the same result up to the summation order."""
    from flash_rt.models.hopper_ops import TorchOps, make_linear  # noqa: PLC0415

    gen = torch.Generator().manual_seed(3)
    m, k, n = 24, 96, 48
    weight = torch.randn(n, k, generator=gen) * 0.2
    lin = make_linear("t", weight, torch.randn(n, generator=gen) if bias else None, act_dtype=act_dtype,
                      device="cpu", fp8=True)
    assert lin.fp8
    lin.act_scale.fill_(0.01)
    lin.inv_act_scale.fill_(100.0)
    ops = TorchOps(act_dtype)
    h = torch.randn(m, k, generator=gen)
    got = ops.linear(h, lin)
    x8 = ops.to_input_of(h, lin)
    want = torch._scaled_mm(x8, lin.weight.t(), scale_a=lin.act_scale, scale_b=lin.weight_scale, bias=lin.bias,
                            out_dtype=act_dtype)
    assert got.dtype == want.dtype == act_dtype and torch.isfinite(got).all()
    tol = 1e-5 if act_dtype == torch.float32 else 1e-2  # bf16: one rounding step of the output
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


def test_calibrate_amax_max_and_percentile():
    observed = [{"a": 1.0, "b": 4.0}, {"a": 3.0, "b": 2.0}, {"a": 2.0, "b": 8.0}]
    assert calibrate_amax(observed) == {"a": 3.0, "b": 8.0}
    assert calibrate_amax(observed, percentile=50) == {"a": 2.0, "b": 4.0}
    with pytest.raises(CalibrationError):
        calibrate_amax([])


def test_euler_times_follow_openpi_fp32_loop():
    times = euler_times(10)
    assert len(times) == 10 and times[0] == 1.0
    assert abs(times[-1] - 0.1) < 1e-6
    assert len(euler_times(3)) == 3


def test_attention_through_the_backend_protocol(model):
    """A pluggable AttentionBackend (here core's SDPA reference) runs the joint site; its K/V slots
    are the KV cache. Same actions as the ops' own attention."""
    from flash_rt.hardware.sdpa_backend import TorchSdpaBackend

    config, state_dict, ref = model
    inputs = ht.random_inputs(config, 2, 8, seed=41)
    want = ht.run_reference(ref, config, inputs)["actions"]
    cls = ht.pipeline_class(config.model_type)
    spec = cls(state_dict, config, num_views=2, use_fp8=False).attention_spec()
    assert spec.sites.keys() == {"joint"}
    backend = TorchSdpaBackend(spec, device="cpu", dtype=torch.float32)
    pipe = cls(state_dict, config, num_views=2, use_fp8=False, attention_backend=backend)
    assert pipe.k_layers[0].data_ptr() == backend.get_slot_ptrs("joint", 0)["K"]
    ht.load_pipeline_inputs(pipe, config, inputs)
    got = torch.from_numpy(pipe.infer())
    assert ht.cosine(got, want) >= COS_FP32 and ht.rel_err(got, want) < 1e-4
    wrong = TorchSdpaBackend(type(spec)().add_site("prefix", num_layers=1, num_q_heads=8, num_kv_heads=1,
                                                    head_dim=16, max_q_seq=8), device="cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match="joint"):
        cls(state_dict, config, num_views=2, use_fp8=False, attention_backend=wrong)


class _EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: replaying it runs its stage eagerly."""

    def __init__(self, pipe, bucket, kind, replayed):
        self.run, self.kind, self.replayed = pipe.stage_fn(bucket, kind), kind, replayed

    def replay(self):
        self.replayed.append(self.kind)
        self.run()


def test_stage_graphs_replay_the_whole_call(model, monkeypatch):
    """FLASHRT_GRAPH_STAGES=1: a call replays vision, prefix and denoise as three graphs, which
    together are the call: the same actions as the one-graph call, and the reference's."""
    config, state_dict, ref = model
    inputs = ht.random_inputs(config, 2, 7, seed=31)
    want = ht.run_reference(ref, config, inputs)
    results = {}
    for stages in ("0", "1"):
        monkeypatch.setenv("FLASHRT_GRAPH_STAGES", stages)
        pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=2, use_fp8=False)
        replayed = []
        pipe.use_graphs = True  # the graphs below run eagerly, so the CPU can take this path

        def capture(bucket, kind, pipe=pipe, replayed=replayed):
            bucket.graphs[kind] = _EagerGraph(pipe, bucket, kind, replayed)
            return bucket.graphs[kind]

        pipe.capture = capture
        ht.load_pipeline_inputs(pipe, config, inputs)
        assert pipe.warm_buckets([list(range(2, 9))]) == [7]  # restages the prompt: load again
        bucket = ht.load_pipeline_inputs(pipe, config, inputs)
        assert sorted(bucket.graphs) == (["denoise", "prefix", "vision"] if stages == "1" else ["full"])
        pipe.actions_host.fill_(float("nan"))
        results[stages] = pipe.infer()
        assert replayed == (["vision", "prefix", "denoise"] if stages == "1" else ["full"])
        assert pipe.infer(prefix=False) is not None and replayed[-1] == "denoise"
    assert np.isfinite(results["1"]).all()
    np.testing.assert_array_equal(results["1"], results["0"])
    assert ht.cosine(torch.from_numpy(results["1"]), want["actions"]) >= COS_FP32


def test_camera_size_images_are_resized_inside_the_call(model, monkeypatch):
    """stage_images with camera-size images: the call's own graph copies them in and resizes them
    (camera_input.py), so the actions equal those of the same images resized on the host first, and
    the reference's; each set of camera sizes has its own graphs, images at the model's size the
    plain ones."""
    config, state_dict, ref = model
    size = config.vision.image_size
    rng = np.random.default_rng(5)
    cameras = [rng.integers(0, 256, (size + 19, 2 * size - 3, 3), dtype=np.uint8),  # shrunk, padded rows
               rng.integers(0, 256, (size, size, 3), dtype=np.uint8)]  # already at size: no resize
    inputs = ht.random_inputs(config, 2, 6, seed=17)
    inputs["images_u8"] = torch.from_numpy(np.stack([resize_with_pad(c, size) for c in cameras]))
    inputs["images"] = inputs["images_u8"].float() / 255.0 * 2.0 - 1.0
    want = ht.run_reference(ref, config, inputs)["actions"]

    pipe = ht.pipeline_class(config.model_type)(state_dict, config, num_views=2, use_fp8=False)
    replayed = []
    pipe.use_graphs = True  # stand-in graphs that run eagerly, as above

    def capture(bucket, kind):
        graph = bucket.graphs[pipe.graph_key(kind)] = _EagerGraph(pipe, bucket, kind, replayed)
        graph.kind = pipe.graph_key(kind)  # replays are logged by key
        return graph

    pipe.capture = capture
    bucket = ht.load_pipeline_inputs(pipe, config, inputs)
    host_resized = pipe.infer()
    pipe.stage_images(cameras)
    pipe.images.fill_(77)  # poison: the call must write every pixel, padding included
    on_device = pipe.infer()
    camera_key = f"full@{size + 19}x{2 * size - 3}+{size}x{size}"
    assert sorted(bucket.graphs) == ["full", camera_key]
    np.testing.assert_array_equal(pipe.images.numpy(), inputs["images_u8"].numpy())
    np.testing.assert_array_equal(on_device, host_resized)
    assert ht.cosine(torch.from_numpy(on_device), want) >= COS_FP32

    # new pixels, same sizes: the layout's buffers and graph are reused
    cameras = [rng.integers(0, 256, c.shape, dtype=np.uint8) for c in cameras]
    pipe.stage_images(cameras)
    pipe.infer()
    assert len(bucket.graphs) == 2
    np.testing.assert_array_equal(pipe.images.numpy(), np.stack([resize_with_pad(c, size) for c in cameras]))
    pipe.load_inputs(inputs["images_u8"], inputs["noise"], None if config.is_pi05 else inputs["state"])
    np.testing.assert_array_equal(pipe.infer(), host_resized)  # back on the plain graph
    assert replayed == ["full", camera_key, camera_key, "full"]

    # beyond a 16x shrink the host resizes (torch's CUDA antialiasing refuses extreme factors)
    huge = rng.integers(0, 256, (size, 16 * size + 1, 3), dtype=np.uint8)
    pipe.stage_images([huge, cameras[1]])
    assert pipe.camera is None
    np.testing.assert_array_equal(pipe.images_host[0].numpy(), resize_with_pad(huge, size))

    # a fifth set of sizes warns: every set captures its own graphs
    for extra in range(1, 4):
        pipe.stage_images([rng.integers(0, 256, (size + extra, size, 3), dtype=np.uint8)] * 2)
    with pytest.warns(UserWarning, match="different sets of sizes"):
        pipe.stage_images([rng.integers(0, 256, (size + 9, size, 3), dtype=np.uint8)] * 2)
