"""The tail of predict()'s own host work, without a GPU: infer() stubbed, many calls timed.

A tiny Pi0.5 (dummy Gemma widths, one SigLIP layer) at the true image size and prompt length, so
the host work per call (argument checks, tokenising the prompt with the discretised state,
staging the images, the actions' copy out) is the product's. Prints p50 / p99 / p99.9 / max, and
which calls were slow: spikes from the code itself (a cache refill every N calls, say) recur at a
fixed period; the machine's own come at random. On a GPU machine the same numbers, set against
the bench's `host clock` line, show whether a slow call's host time is ours or the machine's.

    python scripts/host_tail.py --calls 20000
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np


def main(argv=None):
    from flash_rt.api import VLAModel
    from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER
    from flash_rt.models.pi_config import GEMMA_VARIANTS, VisionDims
    from flash_rt.models.pi_random_weights import fill_random_
    from flashrt_pi05.bench import PROMPT, _input_sets, _model_classes, true_size_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--views", type=int, default=2)
    args = ap.parse_args(argv)
    true = true_size_config("pi05")
    config = replace(true, paligemma=GEMMA_VARIANTS["dummy"], expert=GEMMA_VARIANTS["dummy"],
                     vision=VisionDims(width=32, depth=1, mlp_dim=64, num_heads=4,
                                       patch_size=true.vision.patch_size, image_size=true.vision.image_size))
    reference_cls, frontend_cls = _model_classes("pi05")
    reference = reference_cls(config)
    fill_random_(reference, seed=0)
    checkpoint = SimpleNamespace(config=config, state_dict=reference.state_dict(), norm_stats=None, directory=None)
    frontend = frontend_cls(checkpoint, num_views=args.views, use_fp8=False, num_steps=1,
                            tokenizer=str(STANDIN_TOKENIZER))
    model = VLAModel(frontend, framework="torch", config="pi05", arch="hopper")
    sets = _input_sets(config, args.views, 8, 0)

    def predict(i):
        s = sets[i % len(sets)]
        return model.predict(s["images"], PROMPT, state=s["state"], noise=s["noise"])

    for i in range(len(sets)):  # every input set's prompt length gets its bucket
        predict(i)
    actions = np.zeros((config.action_horizon, config.action_dim), np.float32)
    frontend.pipeline.infer = lambda prefix=True: actions.copy()  # the host work alone from here
    for i in range(200):
        predict(i)
    gc.collect()
    gc.freeze()  # as a realtime loop (and `flashrt bench`) would
    ms = np.empty(args.calls)
    for i in range(args.calls):
        start = time.perf_counter()
        predict(i)
        ms[i] = (time.perf_counter() - start) * 1e3
    p50, p99, p999, top = np.percentile(ms, [50, 99, 99.9, 100])
    print(f"predict() host work over {args.calls} calls (infer stubbed): p50 {p50:.3f} ms, p99 {p99:.3f}, "
          f"p99.9 {p999:.3f}, max {top:.3f}")
    slow = np.flatnonzero(ms > 3 * p50)
    print(f"calls over 3x p50: {len(slow)}; first at {slow[:12].tolist()}, spaced {np.diff(slow)[:12].tolist()}")


if __name__ == "__main__":
    main()
