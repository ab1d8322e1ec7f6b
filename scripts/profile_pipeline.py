"""Where the Hopper fast path's time goes, kernel by kernel (run ON the GPU machine).

For Pi0.5 / Pi0 at true size (random weights drawn on the GPU), per precision:
  * the stages' graph replay times (vision, prefix, denoise, the whole call), CUDA events, median;
  * one replay of each stage's graph (vision, prefix, denoise) under the PyTorch profiler (CUPTI):
    every kernel of the graph with its duration, summed by kernel name, and the span of the replay
    against the sum of its kernels: span - busy = the time between kernels (launch gaps), which a
    fused or persistent kernel would recover; busy = the time fusion inside kernels must recover.
    Under programmatic dependent launch a kernel starts while its predecessor runs, so busy counts
    the overlap twice; each kernel's "path" time, end - the previous kernel's end (kernels in end
    order), sums to the span instead (_path_us);
  * the whole call's graph under the profiler too (vision + prefix + denoise as one graph, with
    PDL across the stage boundaries).

    python scripts/profile_pipeline.py --config pi05 --views 2 --precision fp8,bf16 --out $OUT/profile.json

Prints one table per case; the JSON holds every kernel row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hopper_testing", ROOT / "packages/flashrt-pi05/tests/hopper_testing.py")
ht = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ht)


def _median_replay_ms(graph, iters=50):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _short(name: str) -> str:
    """A kernel's name without template arguments and parameter lists."""
    name = re.sub(r"\(.*$", "", name)
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    short = "".join(out).replace("void ", "").strip()
    return short.split("::")[-1][:60] or name[:60]


def _profile_graph(graph, head=24):
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() >= 0]
    kernels = [e for e in kernels if not e.name.startswith(("Memcpy", "Memset", "cudaGraph"))]
    if not kernels:
        return None
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    rows: dict[str, dict] = {}
    for e in kernels:
        r = rows.setdefault(_short(e.name), {"count": 0, "us": 0.0, "path_us": 0.0})
        r["count"] += 1
        r["us"] += e.time_range.elapsed_us()
    path = dict(_path_us([(i, e.time_range.start, e.time_range.end) for i, e in enumerate(kernels)]))
    for i, e in enumerate(kernels):
        rows[_short(e.name)]["path_us"] += path[i]
    busy = sum(r["us"] for r in rows.values())
    # the first kernels in launch order: one layer's sequence, so kernels that share a name (the
    # GEMMs of one tile shape) are told apart by where they run
    ordered = sorted(range(len(kernels)), key=lambda i: kernels[i].time_range.start)[:head]
    return {"span_us": end - start, "busy_us": busy, "kernels": len(kernels),
            "by_name": dict(sorted(rows.items(), key=lambda kv: -kv[1]["us"])),
            "first": [[_short(kernels[i].name), round(kernels[i].time_range.elapsed_us(), 2), round(path[i], 2)]
                      for i in ordered]}


def _path_us(kernels):
    """(key, start, end) -> [(key, its share of the span)]: in end order, each kernel's end minus
    the end before it (the first: minus the earliest start). The shares sum to the span; on one
    stream's chain a share is what the call would lose if that kernel (with the launch gap before
    it) took no time, its overlap with the previous kernel (PDL) not counted twice."""
    out, prev = [], min(k[1] for k in kernels)
    for key, _, end in sorted(kernels, key=lambda k: k[2]):
        out.append((key, end - prev))
        prev = end
    return out


def run_case(config, sd, views, precision, prompt_len, seed=0):
    cls = ht.pipeline_class(config.model_type)
    pipe = cls(sd, config, num_views=views, use_fp8=precision == "fp8")
    pipe.autotune_attention(3)  # as load_model's default autotune=3
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 250_000, size=prompt_len)
    bucket = pipe.set_prompt_tokens(ids)
    size = config.vision.image_size
    images = rng.integers(0, 256, size=(views, size, size, 3), dtype=np.uint8)
    noise = rng.standard_normal((config.action_horizon, config.action_dim)).astype(np.float32)
    state = rng.uniform(-1, 1, size=(config.max_state_dim,)).astype(np.float32)
    pipe.load_inputs(images, noise, state if config.model_type == "pi0" else None)
    if not pipe.calibrated:
        pipe.calibrate_current()
    pipe.infer()
    out = {"model": config.model_type, "views": views, "precision": precision, "ops": pipe.ops.name,
           "prefix_tokens": pipe.prefix_len(bucket), "steps": pipe.num_steps, "stages_ms": {}}
    for kind in ("full", "vision", "prefix", "denoise"):
        out["stages_ms"][kind] = _median_replay_ms(pipe._graph(bucket, kind))
    for kind in ("vision", "prefix", "denoise", "full"):
        out[f"{kind}_profile"] = _profile_graph(pipe._graph(bucket, kind))
    gemm_choices = getattr(pipe.ops, "gemm_choices", {})
    out["gemm_choices"] = {"x".join(map(str, k)): v for k, v in gemm_choices.items()}
    del pipe
    torch.cuda.empty_cache()
    return out


def print_case(c):
    s = c["stages_ms"]
    print(f"\n== {c['model']} {c['precision']} {c['views']} views, ops={c['ops']}, prefix {c['prefix_tokens']} tokens, "
          f"{c['steps']} steps ==")
    print(f"graph replay ms: full {s['full']:.2f}  vision {s['vision']:.2f}  prefix {s['prefix']:.2f}  "
          f"denoise {s['denoise']:.2f}")
    for kind, per, top in (("vision", 1, 8), ("prefix", 1, 8), ("denoise", c["steps"], 12), ("full", 1, 12)):
        p = c[f"{kind}_profile"]
        if p is None:
            print(f"profiler saw no kernels in the {kind} replay")
            continue
        gaps = p["span_us"] - p["busy_us"]
        print(f"{kind} replay under the profiler: span {p['span_us'] / 1e3:.2f} ms, kernels busy {p['busy_us'] / 1e3:.2f} "
              f"ms, gaps {gaps / 1e3:.2f} ms over {p['kernels']} kernels ({gaps / max(p['kernels'], 1):.2f} us each)")
        unit = "step" if per > 1 else "call"
        print(f"  {'kernel':58s} {'per ' + unit:>8s} {'us/' + unit:>8s} {'us each':>8s} {'share':>6s} "
              f"{'path/' + unit:>9s}")
        for name, r in list(p["by_name"].items())[:top]:
            print(f"  {name:58s} {r['count'] / per:8.1f} {r['us'] / per:8.1f} {r['us'] / r['count']:8.2f} "
                  f"{r['us'] / p['busy_us']:6.1%} {r['path_us'] / per:9.1f}")
        print("  first kernels in launch order (us, path us): "
              + ", ".join(f"{n} {us:.1f} ({path:.1f})" for n, us, path in p["first"]))
    for shape, v in c["gemm_choices"].items():
        print(f"{shape}: " + ", ".join(f"{name.removesuffix('_us')} {us:.1f} us" for name, us in v.items()))


def main(argv=None):
    from flash_rt.models.pi_random_weights import random_state_dict

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="pi05", choices=("pi05", "pi0"))
    ap.add_argument("--views", default="2")
    ap.add_argument("--precision", default="fp8,bf16")
    ap.add_argument("--prompt-len", type=int, default=65)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    config = ht.true_size_config(args.config)
    sd = random_state_dict(config, device="cuda")
    cases = []
    for precision in args.precision.split(","):
        for views in (int(v) for v in args.views.split(",")):
            case = run_case(config, sd, views, precision, min(args.prompt_len, config.max_token_len))
            print_case(case)
            cases.append(case)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "commit": commit.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else ""),
                       "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
