"""Which GEMMs to keep in bf16 under use_fp8: action cosine against the fp32 reference per keep list
(run ON the GPU machine; true size, random weights, the protocol of test_hopper_gpu.py: FP8 scales
calibrated on another observation of the same prompt length).

    python scripts/fp8_keep_ablation.py --config pi0 --views 1,2,3 --add "expert.*.down" "expert.*.qkv"

Prints the cosine of the model's own list and of that list plus each extra pattern.
"""

from __future__ import annotations

import argparse
import importlib.util
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
        for extra in [None, *args.add]:
            keep = base if extra is None else (*base, extra)
            pipe = ht.pipeline_class(args.config)(ref.state_dict(), config, num_views=views, use_fp8=True,
                                                   fp8_keep_bf16=keep)
            ht.load_pipeline_inputs(pipe, config, calib)
            pipe.calibrate_current()
            ht.load_pipeline_inputs(pipe, config, inputs)
            got = torch.from_numpy(pipe.infer())
            print(f"{args.config} views={views} keep+{extra or '-'}: cos {ht.cosine(got, want['actions']):.6f} "
                  f"max_abs_err {ht.max_abs_err(got, want['actions']):.4g}", flush=True)
            del pipe
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
