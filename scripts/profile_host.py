"""Where predict()'s host time goes (run ON the GPU machine): cProfile over many calls.

Pi0.5 / Pi0 at true size (random weights drawn on the GPU), FP8, rotating input sets whose states
give different prompt lengths (as `flashrt bench` does). Prints the functions by own time; the
GPU wait shows up as the stream synchronize, everything else is host work on the critical path.

    python scripts/profile_host.py --config pi05 --views 2 --calls 300
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from types import SimpleNamespace

import torch


def main(argv=None):
    from flash_rt.api import VLAModel
    from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER
    from flash_rt.models.pi_random_weights import random_state_dict
    from flashrt_pi05.bench import _input_sets, _model_classes, true_size_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="pi05", choices=("pi05", "pi0"))
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    config = true_size_config(args.config)
    checkpoint = SimpleNamespace(config=config, state_dict=random_state_dict(config, device="cuda"),
                                 norm_stats=None, directory=None)
    frontend = _model_classes(args.config)[1](checkpoint, num_views=args.views, use_fp8=True,
                                              tokenizer=str(STANDIN_TOKENIZER), autotune=3)
    model = VLAModel(frontend, framework="torch", config=args.config, arch="hopper")
    pipe = frontend.pipeline
    sets = _input_sets(config, args.views, 8, 0)
    prompt = "pick up the fork and put it in the bin"

    def predict(i):
        s = sets[i % len(sets)]
        return model.predict(s["images"], prompt, state=s["state"], noise=s["noise"])

    for i in range(30):  # calibration, captures of every input set's bucket
        predict(i)
    wall, gpu, before = [], [], []
    for i in range(args.calls):
        start = time.perf_counter()
        predict(i)
        wall.append((time.perf_counter() - start) * 1e3)
        gpu.append(pipe.last_call_gpu_ms())
        before.append((pipe.last_call_host_marks()[0] - start) * 1e3)
    print(f"{args.config} {args.views} views fp8 on {torch.cuda.get_device_name()}: predict p50 {statistics.median(wall):.3f} ms, "
          f"GPU p50 {statistics.median(gpu):.3f} ms, host before infer() p50 {statistics.median(before):.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for i in range(args.calls):
        predict(i)
    prof.disable()
    stats = pstats.Stats(prof)
    print(f"\nper call, by own time (ms), {args.calls} calls under cProfile:")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{path.rsplit('/', 2)[-1] if '/' in path else path}:{line}({name})"
        print(f"{1e3 * tottime / args.calls:8.4f} own {1e3 * cumtime / args.calls:8.4f} cum {ncalls / args.calls:6.1f}x  {where[:110]}")


if __name__ == "__main__":
    main()
