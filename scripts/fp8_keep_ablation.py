"""Which GEMMs to keep in bf16 under use_fp8: action cosine against the fp32 reference per keep list
(run ON the GPU machine; true size, random weights, the protocol of test_hopper_gpu.py: FP8 scales
calibrated on another observation of the same prompt length).

    python scripts/fp8_keep_ablation.py --config pi0 --views 1,2,3 --add "expert.*.down" "expert.*.qkv"
    python scripts/fp8_keep_ablation.py --config pi05 --views 2 --lists "llm.*.qkv,llm.*.o" --time 200

Prints the cosine of the model's own list, of that list plus each extra pattern (--add) and of each
whole other list (--lists, comma-separated patterns; "" keeps nothing in bf16); with --time N also
the median time of N graph-replayed calls (infer(), inputs already on the device) of each.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hopper_testing", ROOT / "packages/flashrt-pi05/tests/hopper_testing.py")
ht = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ht)
PROMPT_LEN = {"pi05": 120, "pi0": 30}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="pi0", choices=("pi05", "pi0"))
    ap.add_argument("--views", default="1")
    ap.add_argument("--add", nargs="*", default=[], help="patterns to try on top of the model's keep list")
    ap.add_argument("--lists", nargs="*", default=[], help="whole keep lists to try (comma-separated patterns)")
    ap.add_argument("--time", type=int, default=0, help="also time this many calls of each (median ms)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = ht.true_size_config(args.config)
    ref = ht.random_reference(config)
    base = ht.pipeline_class(args.config).fp8_keep_bf16
    n = PROMPT_LEN[args.config]
    for views in (int(v) for v in args.views.split(",")):
        inputs = ht.random_inputs(config, views, n, seed=views, device="cuda")
        calib = ht.random_inputs(config, views, n, seed=100 + views, device="cuda")
        want = ht.run_reference(ref, config, inputs)
        variants = [("model's list", base), *((f"+{p}", (*base, p)) for p in args.add),
                    *((f"list [{spec}]", tuple(p for p in spec.split(",") if p)) for spec in args.lists)]
        for label, keep in variants:
            pipe = ht.pipeline_class(args.config)(ref.state_dict(), config, num_views=views, use_fp8=True,
                                                   fp8_keep_bf16=keep)
            if args.time:
                pipe.autotune_attention(3)  # the frontend's default: measured GEMM / attention choices
            ht.load_pipeline_inputs(pipe, config, calib)
            pipe.calibrate_current()
            ht.load_pipeline_inputs(pipe, config, inputs)
            got = torch.from_numpy(pipe.infer())
            timing = ""
            if args.time:
                ms = []
                for _ in range(args.time):
                    start = time.perf_counter()
                    pipe.infer()
                    ms.append((time.perf_counter() - start) * 1e3)
                timing = f" infer p50 {statistics.median(ms):.3f} ms"
            print(f"{args.config} views={views} {label}: cos {ht.cosine(got, want['actions']):.6f} "
                  f"max_abs_err {ht.max_abs_err(got, want['actions']):.4g}{timing}", flush=True)
            del pipe
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
