"""``flashrt bench``: the Pi0.5 / Pi0 fast path against the reference, in one process, on one GPU.

    flashrt bench --config pi05 --views 1,2,3 --precision fp8,bf16 --out benchmarks/h100/pi05.json --plot

True-size random weights are drawn directly on the GPU (inside the fp32 reference model; no
checkpoint on disk). Same inputs for everyone. Measured:
  * the fast path (``Pi05TorchFrontendHopper`` behind ``VLAModel``), per precision and view count:
    p50 / p99 of the full ``predict()`` wall time (uint8 images -> actions: preprocessing,
    tokenization, H2D, graph replay, D2H, unnormalisation), graph replay time (CUDA events),
    per-stage replay time (vision / prefix / denoise, each its own graph) with the achieved
    TFLOP/s and weight TB/s, peak GPU memory, cosine and max abs error vs the fp32 reference,
    the p99 <= 1.15 x p50 check over ``--iters`` (1,000) calls, GPU / host memory growth over
    ``--memory-calls`` (``--long``: 10,000), capture time of a new prompt-length bucket;
  * the reference in bf16, eager: ``sample_actions`` on preprocessed device tensors + sync
    (no preprocessing counted: this favours the baseline);
  * the same under ``torch.compile`` (``--compile``, default max-autotune) for ``--compile-views``;
    it runs last, under a watchdog with a wall budget (``--compile-budget-s``): past it the result
    is recorded as not finished and the process exits after writing everything else.
The JSON (``--out``) is rewritten after every measurement, so an interrupted run still leaves
what it measured. ``--plot`` writes a PNG next to it (needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from flash_rt.errors import ConfigError, HardwareError

PROMPT = "pick up the black bowl between the plate and the ramekin and place it on the plate"
P99_FACTOR = 1.15
NUM_INPUT_SETS = 4  # rotated, so no call sees the inputs of the previous one


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark the Pi0.5 / Pi0 GPU fast path against the reference (eager, torch.compile)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", choices=("pi05", "pi0"), default="pi05")
    p.add_argument("--views", default="1,2,3", help="comma-separated view counts (default 1,2,3)")
    p.add_argument("--precision", default="fp8,bf16", help="comma-separated: fp8, bf16 (default both)")
    p.add_argument("--iters", type=int, default=300, help="timed predict() calls per case")
    p.add_argument("--p99-iters", type=int, default=1000,
                   help="timed calls of the headline case (2 views, or the first listed): the p99 <= 1.15 x p50 check")
    p.add_argument("--memory-calls", type=int, default=None,
                   help="calls of the headline case's memory-growth check (default: its timed calls)")
    p.add_argument("--long", action="store_true", help="memory-growth check over 10,000 calls (headline case)")
    p.add_argument("--baseline-iters", type=int, default=10, help="timed calls of each reference baseline")
    p.add_argument("--no-eager", action="store_true", help="skip the eager bf16 reference baseline")
    p.add_argument(
        "--compile", default="max-autotune",
        choices=("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of the compiled baseline, or none",
    )
    p.add_argument("--compile-views", default="2", help="view counts of the compiled baseline (each compiles anew)")
    p.add_argument("--compile-budget-s", type=float, default=420.0, help="wall budget of the compiled baseline")
    p.add_argument("--ops", default="auto",
                   help="comma-separated op sets of the fast path: auto (compiled kernels when they pass their "
                        "self-check, else torch), torch, kernels")
    p.add_argument("--autotune", type=int, choices=(0, 3, 5), default=3,
                   help="the fast path's autotune level, as load_model's (default 3)")
    p.add_argument("--knobs", action="store_true", help="also measure vision_pool_factor / vision_num_layers / cache_frames")
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--state-dim", type=int, default=8, help="robot state dims (Pi0.5: discretised into the prompt)")
    p.add_argument("--camera-size", default=None, metavar="HxW",
                   help="feed camera images of this size (e.g. 480x640), so predict() includes the resize to "
                        "224 that real cameras need (copy and resize run in the graph); default: images "
                        "already at the model's size")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results file (benchmarks/<card>/<model>.json)")
    p.add_argument("--plot", action="store_true", help="write a PNG of the per-stage breakdown next to --out")
    p.add_argument("--smoke", action="store_true", help="tiny model, any device (CPU too): checks the tool, measures nothing")
    p.set_defaults(func=run_bench)


# ------------------------------------------------------------------------------------------ util
def _percentiles(values_ms) -> dict:
    a = np.asarray(values_ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "min": float(a.min()), "n": int(a.size)}


HOST_PHASES = ("before_infer", "launch", "wait", "after_sync")


def _host_phases(start, end, marks) -> list[float]:
    """One predict() call's host clock split at the pipeline's marks (ms): preprocessing up to
    infer(), the launch (the graph replay, copies included), the wait for the GPU, the work after it."""
    t_enter, t_launched, t_synced, _ = marks
    return [(t_enter - start) * 1e3, (t_launched - t_enter) * 1e3, (t_synced - t_launched) * 1e3,
            (end - t_synced) * 1e3]


def _tail_split(wall_ms, gpu_ms, p99_ms, phases=None) -> dict:
    """Where the slow calls' time went: the median call's and the calls at or above p99's GPU time
    (graph + D2H, from the pipeline's events) and host time (the rest of predict()), and the host
    clock's phases (``HOST_PHASES``) of both."""
    wall = np.asarray(wall_ms, np.float64)
    slow = wall >= p99_ms
    out = {"slow_calls": int(slow.sum())}
    if gpu_ms and gpu_ms[0] is not None:  # no GPU events on the CPU (--smoke)
        gpu = np.asarray(gpu_ms, np.float64)
        out.update({"gpu_ms_p50": float(np.median(gpu)), "host_ms_p50": float(np.median(wall - gpu)),
                    "slow_gpu_ms_mean": float(gpu[slow].mean()), "slow_host_ms_mean": float((wall - gpu)[slow].mean())})
    if phases:
        ph = np.asarray(phases, np.float64)
        out["host_phases_ms_p50"] = dict(zip(HOST_PHASES, np.median(ph, axis=0).tolist()))
        out["slow_host_phases_ms_mean"] = dict(zip(HOST_PHASES, ph[slow].mean(axis=0).tolist()))
    return out


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _host_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return -1


def _commit() -> str:
    """The source commit: FLASHRT_COMMIT where the tree was copied without git (a GPU machine)."""
    if os.environ.get("FLASHRT_COMMIT"):
        return os.environ["FLASHRT_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cuda() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def _sync():
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mem_allocated() -> int:
    import torch  # noqa: PLC0415

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _reset_peak():
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    import torch  # noqa: PLC0415

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _free():
    import torch  # noqa: PLC0415

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time_events(fn, iters: int, warmup: int = 3) -> dict:
    """Per-call CUDA-event time of ``fn`` (enqueues GPU work), in ms; wall time on the CPU (--smoke)."""
    import torch  # noqa: PLC0415

    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        wall = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            wall.append((time.perf_counter() - start) * 1e3)
        return _percentiles(wall)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _percentiles([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def stage_costs(config, num_views: int, prefix_tokens: int, num_steps: int, weight_bytes: float) -> dict:
    """FLOPs and weight bytes of each stage (GEMMs + attention), for achieved TFLOP/s and TB/s."""
    v, g, e = config.vision, config.paligemma, config.expert
    t = num_views * v.num_patches
    vis_w = v.depth * (4 * v.width**2 + 2 * v.width * v.mlp_dim) + v.width * 3 * v.patch_size**2 + v.width * g.width
    vis = 2 * t * vis_w + v.depth * 4 * num_views * v.num_patches**2 * v.width

    def gemma_layer(d, tokens, keys):
        w = d.width * (d.num_heads + 2 * d.num_kv_heads) * d.head_dim + d.num_heads * d.head_dim * d.width + 3 * d.width * d.mlp_dim
        return w, 2 * tokens * w + 4 * tokens * keys * d.num_heads * d.head_dim

    llm_w, llm_f = gemma_layer(g, prefix_tokens, prefix_tokens)
    s = config.action_horizon
    exp_w, exp_f = gemma_layer(e, s, prefix_tokens + s)
    return {
        "vision": {"flops": vis, "weight_bytes": vis_w * weight_bytes},
        "prefix": {"flops": g.depth * llm_f, "weight_bytes": g.depth * llm_w * weight_bytes},
        "denoise": {"flops": num_steps * e.depth * exp_f, "weight_bytes": num_steps * e.depth * exp_w * weight_bytes},
    }


def true_size_config(model_type: str):
    """The released model's dimensions; prompt (Pi0.5: with its state) up to 200 tokens, Pi0's 48.
    The benchmark, its profiling scripts and the true-size GPU tests all build this one."""
    from flash_rt.models.pi_config import PiConfig  # noqa: PLC0415

    return PiConfig(model_type=model_type, max_token_len=200 if model_type == "pi05" else 48)


def smoke_config(config):
    """A tiny model of the same type (openpi's dummy Gemma, a 4x4-patch SigLIP) for --smoke."""
    from dataclasses import replace  # noqa: PLC0415

    from flash_rt.models.pi_config import GEMMA_VARIANTS, VisionDims  # noqa: PLC0415

    vision = VisionDims(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=14, image_size=56)
    return replace(config, paligemma=GEMMA_VARIANTS["dummy"], expert=GEMMA_VARIANTS["dummy"], vision=vision,
                   action_horizon=10)


class _Results:
    """The JSON document, rewritten after every measurement."""

    def __init__(self, path, doc):
        self.path = Path(path) if path else None
        self.doc = doc

    def write(self):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, sort_keys=False))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------ setup
def _model_classes(model_type):
    if model_type == "pi05":
        from flashrt_pi05.frontend_torch_hopper import Pi05TorchFrontendHopper  # noqa: PLC0415
        from flashrt_pi05.reference import Pi05Reference  # noqa: PLC0415

        return Pi05Reference, Pi05TorchFrontendHopper
    from flashrt_pi0.frontend_torch_hopper import Pi0TorchFrontendHopper  # noqa: PLC0415
    from flashrt_pi0.reference import Pi0Reference  # noqa: PLC0415

    return Pi0Reference, Pi0TorchFrontendHopper


def _camera_hw(text, config) -> tuple[int, int]:
    if text is None:
        return config.vision.image_size, config.vision.image_size
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise ConfigError(f"--camera-size takes HEIGHTxWIDTH in pixels, e.g. 480x640; got {text!r}")
    return h, w


def _input_sets(config, num_views, state_dim, seed, camera_hw=None):
    rng = np.random.default_rng(seed + 1000 * num_views)
    h, w = camera_hw or (config.vision.image_size,) * 2
    sets = []
    for _ in range(NUM_INPUT_SETS):
        sets.append({
            "images": [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(num_views)],
            "state": rng.uniform(-0.9, 0.9, state_dim).astype(np.float32),
            "noise": rng.standard_normal((config.action_horizon, config.action_dim)).astype(np.float32),
        })
    return sets


def _reference_inputs(config, tokenizer, prompt, inputs, device):
    """What the reference's ``sample_actions`` takes for one input set (model space: no norm stats)."""
    import torch  # noqa: PLC0415

    from flash_rt.models.pi_preprocess import prepare_images  # noqa: PLC0415

    images = torch.from_numpy(prepare_images({"images": inputs["images"]}, len(inputs["images"]),
                                             config.vision.image_size))[None].to(device)
    if config.is_pi05:
        ids, mask = tokenizer.tokenize_pi05(prompt, inputs["state"], config.max_token_len)
        extra = {}
    else:
        ids, mask = tokenizer.tokenize_pi0(prompt, config.max_token_len)
        state = np.zeros(config.max_state_dim, np.float32)
        state[: inputs["state"].shape[0]] = inputs["state"]
        extra = {"state": torch.from_numpy(state)[None].to(device)}
    return dict(
        images=images, tokens=torch.from_numpy(ids)[None].to(device), token_mask=torch.from_numpy(mask)[None].to(device),
        noise=torch.from_numpy(inputs["noise"])[None].to(device), **extra,
    ), int(mask.sum())


def _reference_call(ref, ref_inputs, num_steps):
    import torch  # noqa: PLC0415

    with torch.no_grad():
        out = ref.sample_actions(ref_inputs["images"], ref_inputs["tokens"], ref_inputs["token_mask"],
                                 ref_inputs["noise"], num_steps=num_steps,
                                 **({"state": ref_inputs["state"]} if "state" in ref_inputs else {}))
    return out


# ------------------------------------------------------------------------------------------ main
def run_bench(args) -> int:
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available() and not args.smoke:
        raise HardwareError(
            "flashrt bench needs a CUDA GPU (it measures the GPU fast path); none is visible. "
            "(--smoke runs the whole flow on a tiny model on the CPU, to check the tool itself)"
        )
    from flash_rt.api import VLAModel  # noqa: PLC0415
    from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER, PaligemmaTokenizer  # noqa: PLC0415
    from flash_rt.models.pi_random_weights import fill_random_  # noqa: PLC0415

    # the fp32 ground truth must be fp32: no TF32 anywhere in this process
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views_list = [int(v) for v in args.views.split(",") if v]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip() and p.strip() != "none"]
    bad = [p for p in precisions if p not in ("fp8", "bf16")]
    if bad:
        raise ConfigError(f"--precision takes fp8, bf16 or none (comma-separated); got {bad}")
    compile_views = [int(v) for v in args.compile_views.split(",") if v] if args.compile != "none" else []
    if any(v not in views_list for v in compile_views):
        raise ConfigError(f"--compile-views {args.compile_views} must be among --views {args.views} (the compiled "
                          "baseline runs on the same inputs as the fast path); pass --compile none to skip it")
    headline_views = 2 if 2 in views_list else views_list[0]
    memory_calls = 10_000 if args.long else (args.memory_calls or 0)
    config = true_size_config(args.config)
    if args.smoke:
        config = smoke_config(config)
    camera_hw = _camera_hw(args.camera_size, config)
    num_steps = args.num_steps or config.num_steps
    ref_cls, frontend_cls = _model_classes(args.config)
    tokenizer = PaligemmaTokenizer(STANDIN_TOKENIZER)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_name, capability = props.name, f"sm_{props.major}{props.minor}"
    else:
        device_name, capability = "cpu (--smoke: tiny model, not a benchmark)", "cpu"
    results = _Results(args.out, {
        "model": args.config,
        "device": device_name,
        "capability": capability,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {
            "num_steps": num_steps, "action_horizon": config.action_horizon, "autotune": args.autotune,
            "prompt": args.prompt,
            "state_dim": args.state_dim, "camera_hw": list(camera_hw), "iters": args.iters,
            "headline_views": headline_views,
            "headline_iters": max(args.iters, args.p99_iters), "memory_calls": memory_calls,
            "weights": f"random, true size, seed {args.seed}", "tokenizer": "stand-in SentencePiece model",
            "wall": "predict(): uint8 images + prompt + state -> actions (host), time.perf_counter; "
                    "gc.freeze() after warm-up, as a realtime loop would",
            "replay": "CUDA events around graph.replay()",
            "baseline_timing": "reference.sample_actions on preprocessed device tensors + synchronize",
        },
        "ceilings_reference": {"bf16_tflops": 780, "fp8_tflops": 1400, "copy_tbps": 3.0, "source": "BENCH.md (H100 SXM)"},
        "results": [], "baselines": [], "speedups": [],
    })
    if device.type == "cuda":  # which ops "auto" resolves to, and why (recorded with the results)
        from flash_rt.models.hopper_kernel_ops import kernels_available  # noqa: PLC0415

        ok, why = kernels_available(device)
        results.doc["kernels"] = {"used_by_auto": ok, "why": why}
        print(f"  compiled kernels for ops=auto: {'yes' if ok else 'no'} ({why})", flush=True)
    print(f"flashrt bench: {args.config} on {device_name}, torch {torch.__version__}, views {views_list}, "
          f"precision {precisions}, {args.iters} calls per case")

    t0 = time.perf_counter()
    with torch.device(device):
        ref = ref_cls(config)
    fill_random_(ref, seed=args.seed)
    ref.eval()
    print(f"  fp32 reference with random weights on {device}: {time.perf_counter() - t0:.1f} s", flush=True)
    checkpoint = SimpleNamespace(config=config, state_dict=ref.state_dict(), norm_stats=None, directory=None)

    cases = {}
    for views in views_list:
        sets = _input_sets(config, views, args.state_dim, args.seed, camera_hw)
        ref_in, prompt_tokens = _reference_inputs(config, tokenizer, args.prompt, sets[0], device)
        truth = _reference_call(ref, ref_in, num_steps)[0].float().cpu().numpy()
        held_in, _ = _reference_inputs(config, tokenizer, args.prompt, sets[1], device)
        held_out = _reference_call(ref, held_in, num_steps)[0].float().cpu().numpy()
        cases[views] = SimpleNamespace(sets=sets, ref_in=ref_in, truth=truth, held_out=held_out,
                                       prompt_tokens=prompt_tokens)

    ops_list = [o.strip() for o in args.ops.split(",") if o.strip()]
    for ops in ops_list:
        for precision in precisions:
            for views in views_list:
                iters = max(args.iters, args.p99_iters) if views == headline_views else args.iters
                try:
                    entry = _bench_fast_path(args, config, frontend_cls, checkpoint, VLAModel, views, precision,
                                             cases[views], num_steps, iters,
                                             memory_calls if views == headline_views else 0, ops)
                except Exception as exc:  # one broken case is reported, the others still run
                    import traceback  # noqa: PLC0415

                    traceback.print_exc()
                    entry = {"views": views, "precision": precision, "ops_requested": ops,
                             "error": f"{type(exc).__name__}: {exc}"[:2000]}
                    _free()
                results.doc["results"].append(entry)
                results.write()
                _print_entry(entry)

    ref_bf16 = None
    if not args.no_eager or compile_views:
        with torch.device(device):
            ref_bf16 = ref_cls(config)
        ref_bf16.load_state_dict(ref.state_dict())
        ref_bf16.to_precision(torch.bfloat16).eval()
    if not args.no_eager:
        for views in views_list:
            entry = _bench_reference(ref_bf16, cases[views], views, num_steps, args.baseline_iters, "reference bf16 eager")
            results.doc["baselines"].append(entry)
            results.write()
            print(f"  baseline {entry['name']:<44} views {views}: p50 {entry['wall_ms']['p50']:8.2f} ms  "
                  f"cos {entry['cosine_vs_fp32']:.6f}")
    del ref
    _free()

    if compile_views:
        _bench_compiled(args, ref_bf16, cases, compile_views, num_steps, results)
    _speedups(results.doc)
    results.write()
    _print_table(results.doc)
    if args.plot and args.out:
        _plot(results.doc, Path(args.out).with_suffix(".png"))
    return 0


def _bench_fast_path(args, config, frontend_cls, checkpoint, vla_model_cls, views, precision, case, num_steps, iters,
                     memory_calls, ops="auto"):
    from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER  # noqa: PLC0415

    _free()
    _sync()
    base_mem = _mem_allocated()
    _reset_peak()
    t0 = time.perf_counter()
    frontend = frontend_cls(checkpoint, num_views=views, use_fp8=precision == "fp8", num_steps=num_steps,
                            tokenizer=str(STANDIN_TOKENIZER), autotune=args.autotune, ops=ops)
    build_s = time.perf_counter() - t0
    model = vla_model_cls(frontend, framework="torch", config=config.model_type, arch="hopper")
    pipe = frontend.pipeline
    # the headline case rotates all input sets (Pi0.5: as many prompt lengths, each prewarmed);
    # the others two, which keeps a 6-case run within a few minutes
    sets, prompt = (case.sets if memory_calls or iters >= args.p99_iters else case.sets[:2]), args.prompt

    def predict(i):
        s = sets[i % len(sets)]
        return model.predict(s["images"], prompt, state=s["state"], noise=s["noise"])

    # first call: calibration (FP8) + capture of its bucket; then every other input set's bucket
    t0 = time.perf_counter()
    first = predict(0)
    first_call_s = time.perf_counter() - t0
    if config.is_pi05:
        lengths = model.warm_state_prompt_buckets(sets[0]["images"], prompt, [s["state"] for s in sets])
    else:
        lengths = [pipe.current.length]
    captures_before = pipe.captures
    # FP8 scales came from set 0: the cosine of record is on set 1, an observation not calibrated on
    second = predict(1)
    cos, cos_calib = _cosine(second, case.held_out), _cosine(first, case.truth)
    max_err = float(np.abs(np.asarray(second, np.float64) - case.held_out).max())

    for i in range(20):
        predict(i)
    _sync()
    # a realtime loop freezes its start-up objects so the collector never walks them mid-loop
    gc.collect()
    gc.freeze()
    mem_before, rss_before = _mem_allocated(), _host_rss()
    wall, gpu, phases = [], [], []
    for i in range(iters):
        start = time.perf_counter()
        predict(i)
        end = time.perf_counter()
        wall.append((end - start) * 1e3)
        gpu.append(pipe.last_call_gpu_ms())
        phases.append(_host_phases(start, end, pipe.last_call_host_marks()))
    for i in range(max(0, memory_calls - iters)):
        predict(i)
    _sync()
    gc.unfreeze()
    gc.collect()
    mem_after, rss_after = _mem_allocated(), _host_rss()
    new_captures = pipe.captures - captures_before

    # graph replay and per-stage replay of the current bucket (same inputs as the last call)
    bucket = pipe.current
    with pipe._on_stream():
        if pipe.use_graphs:
            graphs = pipe.call_graphs(bucket)  # one graph, or three under FLASHRT_GRAPH_STAGES=1
            replay = _time_events(lambda: [graph.replay() for graph in graphs], 200)
        else:  # --smoke on the CPU: the same stages, eager
            replay = _time_events(pipe.stage_fn(bucket, "full"), 5)
        stages = {}
        for kind in ("vision", "prefix", "denoise"):
            if pipe.use_graphs:
                graph = pipe.capture(bucket, kind)
                stages[kind] = _time_events(graph.replay, 100)["p50"]
                bucket.graphs.pop(pipe.graph_key(kind), None)
                del graph
            else:
                stages[kind] = _time_events(pipe.stage_fn(bucket, kind), 3)["p50"]
    # a new prompt length: its first call pays one capture (timed), the next reuses it
    new_len_s = _new_bucket_capture_s(pipe, bucket)

    prefix_tokens = pipe.prefix_len(bucket)
    costs = stage_costs(config, views, prefix_tokens, num_steps, 1.0 if precision == "fp8" else 2.0)
    achieved = {
        k: {"tflops": costs[k]["flops"] / (stages[k] * 1e-3) / 1e12,
            "weight_tbps": costs[k]["weight_bytes"] / (stages[k] * 1e-3) / 1e12}
        for k in stages
    }
    knobs = _bench_knobs(args, config, frontend_cls, checkpoint, vla_model_cls, views, precision, case, num_steps) if (
        args.knobs and views == 2) else []
    p = _percentiles(wall)
    tail = _tail_split(wall, gpu, p["p99"], phases)
    entry = {
        "views": views, "precision": precision, "ops": pipe.ops.name, "ops_requested": ops,
        "kernels_fallback_reason": pipe.ops.fallback_reason,
        "prompt_tokens": bucket.length, "prefix_tokens": prefix_tokens,
        "wall_ms": p, "replay_ms": replay, "stages_ms": stages, "stage_sum_ms": sum(stages.values()),
        "achieved": achieved, "cosine_vs_fp32": cos, "max_abs_err_vs_fp32": max_err,
        "cosine_vs_fp32_calibration_observation": cos_calib,
        "peak_mem_gb": (_peak() - base_mem) / 2**30,
        "resident_mem_gb": (mem_after - base_mem) / 2**30,
        "p99_check": {"calls": iters, "p99_over_p50": p["p99"] / p["p50"], "limit": P99_FACTOR,
                      "pass": p["p99"] <= P99_FACTOR * p["p50"], **tail},
        "memory_growth": {"calls": max(memory_calls, iters), "gpu_bytes": mem_after - mem_before,
                          "host_rss_bytes": rss_after - rss_before, "pass": mem_after - mem_before <= 0},
        "buckets": lengths, "captures_during_timed_calls": new_captures,
        "build_s": build_s, "first_call_s": first_call_s, "new_bucket_capture_s": new_len_s,
        "attention_backend": frontend.attention_backend, "knobs": knobs,
        # what autotune timed per shape: skinny GEMM against cuBLASLt, SDPA against our attention
        "gemm_choices": {"x".join(map(str, k)): v for k, v in getattr(pipe.ops, "gemm_choices", {}).items()},
    }
    model = frontend = pipe = bucket = None  # free the pipeline (and its graphs) before the next case
    _free()
    return entry


def _new_bucket_capture_s(pipe, bucket):
    """Capture time of a prompt length not seen before (ids of the current prompt, one shorter)."""
    ids = bucket.ids.cpu().numpy()
    if len(ids) < 2 or (len(ids) - 1) in pipe.buckets:
        return None
    new = pipe.set_prompt_tokens(ids[:-1])
    start = time.perf_counter()
    pipe.infer()
    seconds = time.perf_counter() - start
    pipe.buckets.pop(new.length)
    pipe.set_prompt_tokens(ids)
    return seconds


def _bench_knobs(args, config, frontend_cls, checkpoint, vla_model_cls, views, precision, case, num_steps):
    """Each speed knob's effect on latency and on cosine vs the full fp32 reference."""
    from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER  # noqa: PLC0415

    out = []
    fewer_layers = max(1, 2 * config.vision.depth // 3)  # 18 of SigLIP's 27
    for knob in ({"vision_pool_factor": 2}, {"vision_pool_factor": 4}, {"vision_num_layers": fewer_layers},
                 {"cache_frames": 2}):
        try:
            frontend = frontend_cls(checkpoint, num_views=views, use_fp8=precision == "fp8", num_steps=num_steps,
                                    tokenizer=str(STANDIN_TOKENIZER), autotune=0, **knob)
            model = vla_model_cls(frontend, framework="torch", config=config.model_type, arch="hopper")
            s0 = case.sets[0]
            first = model.predict(s0["images"], args.prompt, state=s0["state"], noise=s0["noise"])
            wall = []
            for _ in range(200):  # the same observation: cache_frames' cached prefix is then exact
                start = time.perf_counter()
                model.predict(s0["images"], args.prompt, state=s0["state"], noise=s0["noise"])
                wall.append((time.perf_counter() - start) * 1e3)
            out.append({"knob": knob, "wall_ms": _percentiles(wall), "cosine_vs_fp32": _cosine(first, case.truth)})
        except Exception as exc:  # a knob that fails is reported, not fatal
            out.append({"knob": knob, "error": f"{type(exc).__name__}: {exc}"[:500]})
        model = frontend = None
        _free()
    return out


def _bench_reference(ref, case, views, num_steps, iters, name, fn=None):

    fn = fn or (lambda: _reference_call(ref, case.ref_in, num_steps))
    _sync()
    base = _mem_allocated()
    _reset_peak()
    out = fn()
    _sync()
    fn()
    _sync()
    wall = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync()
        wall.append((time.perf_counter() - start) * 1e3)
    actions = out[0].float().cpu().numpy()
    return {"name": name, "views": views, "wall_ms": _percentiles(wall), "cosine_vs_fp32": _cosine(actions, case.truth),
            "activation_peak_gb": (_peak() - base) / 2**30}


def _bench_compiled(args, ref_bf16, cases, compile_views, num_steps, results) -> bool:
    """torch.compile baseline, run in the main thread (inductor wants it) under a watchdog: past
    ``--compile-budget-s`` the watchdog records "did not finish", prints the table and ends the
    process (a compile cannot be interrupted). Returns False when it finished (or failed)."""
    import torch  # noqa: PLC0415

    name = f"reference bf16 torch.compile({args.compile})"
    mode = None if args.compile == "default" else args.compile
    done = threading.Event()

    def watchdog():
        if done.wait(args.compile_budget_s):
            return
        results.doc["baselines"].append({"name": name, "views": compile_views, "status": "did not finish",
                                         "budget_s": args.compile_budget_s})
        _speedups(results.doc)
        results.write()
        _print_table(results.doc)
        if args.plot and args.out:
            _plot(results.doc, Path(args.out).with_suffix(".png"))
        print(f"  torch.compile did not finish within --compile-budget-s {args.compile_budget_s:.0f}; exiting",
              flush=True)
        os._exit(0)

    print(f"  compiling the reference with torch.compile(mode={args.compile!r}), budget {args.compile_budget_s:.0f} s ...",
          flush=True)
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        compiled = torch.compile(ref_bf16.sample_actions, mode=mode)
        for views in compile_views:
            case = cases[views]
            ri = case.ref_in
            extra = {"state": ri["state"]} if "state" in ri else {}

            def fn(ri=ri, extra=extra):
                return compiled(ri["images"], ri["tokens"], ri["token_mask"], ri["noise"], num_steps=num_steps, **extra)

            start = time.perf_counter()
            fn()
            _sync()
            compile_s = time.perf_counter() - start
            entry = _bench_reference(ref_bf16, case, views, num_steps, args.baseline_iters, name, fn=fn)
            entry["compile_s"] = compile_s
            results.doc["baselines"].append(entry)
            results.write()
            print(f"  baseline {name:<44} views {views}: p50 {entry['wall_ms']['p50']:8.2f} ms  "
                  f"cos {entry['cosine_vs_fp32']:.6f}  (compile {compile_s:.0f} s)", flush=True)
    except Exception as exc:  # a failed baseline is reported, it does not void the run
        results.doc["baselines"].append({"name": name, "views": compile_views, "status": "failed",
                                         "error": f"{type(exc).__name__}: {exc}"[:2000]})
        print(f"  compiled baseline failed: {type(exc).__name__}: {exc}"[:2000])
    finally:
        done.set()
    return False


def _speedups(doc):
    doc["speedups"] = []
    for r in doc["results"]:
        if "error" in r:
            continue
        row = {"views": r["views"], "precision": r["precision"], "ops": r["ops"], "p50_ms": r["wall_ms"]["p50"]}
        for b in doc["baselines"]:
            if b.get("views") == r["views"] and "wall_ms" in b:
                key = "vs_compile" if "compile" in b["name"] else "vs_eager"
                row[key] = b["wall_ms"]["p50"] / r["wall_ms"]["p50"]
        doc["speedups"].append(row)


# ------------------------------------------------------------------------------------------ output
def _print_entry(e):
    if "error" in e:
        print(f"  {e['precision']:<4} views {e['views']}: FAILED: {e['error']}", flush=True)
        return
    st = e["stages_ms"]
    print(f"  {e['precision']:<4} {e['ops']:<7} views {e['views']}: predict p50 {e['wall_ms']['p50']:.3f} ms p99 {e['wall_ms']['p99']:.3f}"
          f" | replay {e['replay_ms']['p50']:.3f} | vision {st['vision']:.3f} prefix {st['prefix']:.3f} denoise "
          f"{st['denoise']:.3f} | cos {e['cosine_vs_fp32']:.6f} | peak {e['peak_mem_gb']:.2f} GiB"
          f" | p99 check {'ok' if e['p99_check']['pass'] else 'FAIL'} | mem growth {e['memory_growth']['gpu_bytes']} B")
    c = e["p99_check"]
    if "gpu_ms_p50" in c:  # is the tail on the GPU or on the host?
        print(f"    calls: gpu p50 {c['gpu_ms_p50']:.3f} ms, host p50 {c['host_ms_p50']:.3f} ms; the {c['slow_calls']} "
              f"calls >= p99: gpu {c['slow_gpu_ms_mean']:.3f} ms, host {c['slow_host_ms_mean']:.3f} ms (mean)", flush=True)
    if "host_phases_ms_p50" in c:
        def fmt(d):
            return " ".join(f"{k} {v:.3f}" for k, v in d.items())
        print(f"    host clock (ms): p50 {fmt(c['host_phases_ms_p50'])}; >= p99 {fmt(c['slow_host_phases_ms_mean'])}",
              flush=True)
    for shape, times in e.get("gemm_choices", {}).items():
        if shape.startswith("attention"):
            print(f"    {shape}: " + ", ".join(f"{k.removesuffix('_us')} {v:.1f} us" for k, v in times.items()), flush=True)


def _print_table(doc):
    print()
    print(f"{doc['model']} on {doc['device']} ({doc['date']}, commit {doc['commit']})")
    head = f"{'views':>5} {'prec':>5} {'ops':>7} {'p50 ms':>8} {'p99 ms':>8} {'replay':>8} {'vision':>8} {'prefix':>8} {'denoise':>8} {'cosine':>9} {'peak GiB':>8} {'x eager':>8} {'x compile':>9}"
    print(head)
    print("-" * len(head))
    speed = {(s["views"], s["precision"], s["ops"]): s for s in doc["speedups"]}
    for r in doc["results"]:
        if "error" in r:
            print(f"{r['views']:>5} {r['precision']:>5}  FAILED: {r['error'][:150]}")
            continue
        s = speed.get((r["views"], r["precision"], r["ops"]), {})
        st = r["stages_ms"]
        print(f"{r['views']:>5} {r['precision']:>5} {r['ops']:>7} {r['wall_ms']['p50']:>8.3f} {r['wall_ms']['p99']:>8.3f} "
              f"{r['replay_ms']['p50']:>8.3f} {st['vision']:>8.3f} {st['prefix']:>8.3f} {st['denoise']:>8.3f} "
              f"{r['cosine_vs_fp32']:>9.6f} {r['peak_mem_gb']:>8.2f} {s.get('vs_eager', float('nan')):>8.1f} "
              f"{s.get('vs_compile', float('nan')):>9.1f}")
    for b in doc["baselines"]:
        if "wall_ms" in b:
            print(f"{b['views']:>5} {'base':>5} {'':>7} {b['wall_ms']['p50']:>8.3f} {b['wall_ms']['p99']:>8.3f}  {b['name']}"
                  f"  cos {b['cosine_vs_fp32']:.6f}")
        else:
            print(f"{str(b['views']):>5} {'base':>5}  {b['name']}: {b.get('status')} {b.get('error', '')}")


def _plot(doc, path):
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("  --plot: matplotlib is not installed; no PNG written (pip install matplotlib)")
        return
    labels, parts = [], {"vision": [], "prefix": [], "denoise": [], "other": []}
    for r in doc["results"]:
        if "error" in r:
            continue
        labels.append(f"{r['precision']} {r['ops']}\n{r['views']}v")
        st = r["stages_ms"]
        for k in ("vision", "prefix", "denoise"):
            parts[k].append(st[k])
        parts["other"].append(max(0.0, r["wall_ms"]["p50"] - sum(st.values())))
    base = [b for b in doc["baselines"] if "wall_ms" in b]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [max(1, len(labels)), max(1, len(base))]})
    bottom = np.zeros(len(labels))
    for k, values in parts.items():
        ax1.bar(labels, values, bottom=bottom, label=k if k != "other" else "host + H2D/D2H")
        bottom += np.asarray(values)
    ax1.set_ylabel("ms (p50)")
    ax1.set_title(f"FlashRT {doc['model']} on {doc['device']}: predict() by stage")
    ax1.legend()
    ax2.bar([f"{b['name'].replace('reference ', '')}\n{b['views']}v" for b in base], [b["wall_ms"]["p50"] for b in base],
            color="gray")
    ax2.set_title("baselines (reference, p50)")
    ax2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"  plot: {path}")
