"""``flashrt demo``: a Pi0.5 end to end on this machine, with nothing to download.

Writes (once, cached under the user cache dir) a random-weight Pi0.5 checkpoint in the lerobot
format with the stand-in tokenizer, loads it with ``flash_rt.load_model(..., config="pi05")``,
runs ``predict`` on synthetic two-view images and a state, and prints the action chunk's shape, a
few values and the latency. ``--size tiny`` (default) runs on a CPU in seconds; ``--size full``
(3.3 B parameters, ~7 GB on disk) is meant for a CUDA device.
"""

from __future__ import annotations

import inspect
import shutil
import time
from pathlib import Path

CACHE_COMPLETE = "flashrt-demo-complete"


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run a random-weight Pi0.5 end to end (no download)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny",
                        help="tiny: small dims, seconds on a CPU (default); full: the true 3.3 B model (CUDA)")
    parser.add_argument("--hardware", default="auto", help="auto (default), cpu, hopper, ...")
    parser.add_argument("--device", default=None, help="torch device for the reference frontend (cpu, cuda)")
    parser.add_argument("--num-views", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--runs", type=int, default=3, help="predict() calls; the first one warms up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="where the demo checkpoint is kept")
    parser.set_defaults(func=run_demo)


def demo_checkpoint(size: str, cache_dir: str | None = None, seed: int = 0, rebuild: bool = False) -> Path:
    """The cached demo checkpoint directory, written on first use (atomically: a half-written one
    is never reused)."""
    from flash_rt.models.pi_make_checkpoint import write_random_checkpoint  # noqa: PLC0415

    if cache_dir is None:
        import platformdirs  # noqa: PLC0415

        cache_dir = platformdirs.user_cache_dir("flashrt")
    target = Path(cache_dir).expanduser() / "demo" / f"pi05-{size}-lerobot-seed{seed}"
    if (target / CACHE_COMPLETE).is_file() and not rebuild:
        return target
    shutil.rmtree(target, ignore_errors=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"writing a random {size} Pi0.5 checkpoint (lerobot format) to {target} ...", flush=True)
    write_random_checkpoint(staging, "pi05", size=size, fmt="lerobot", seed=seed)
    (staging / CACHE_COMPLETE).write_text("ok\n")
    staging.rename(target)
    return target


def synthetic_observation(num_views: int, state_dim: int, seed: int):
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    images = []
    for view in range(num_views):  # a gradient plus noise, different per view; not all zeros
        base = (ramp[None, :, None] * (view + 1) / num_views + ramp[:, None, None] * 0.5) % 256
        images.append(np.clip(base + rng.normal(0, 20, (224, 224, 3)), 0, 255).astype(np.uint8))
    state = rng.uniform(-0.5, 0.5, state_dim).astype(np.float32)
    return images, state


def _cuda_available() -> bool:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return False
    return torch.cuda.is_available()


def run_demo(args) -> int:
    import numpy as np  # noqa: PLC0415

    import flash_rt  # noqa: PLC0415
    from flash_rt.errors import CheckpointError, ConfigError  # noqa: PLC0415

    if args.size == "full" and not _cuda_available() and args.hardware in ("auto", "cpu") and args.device in (None, "cpu"):
        raise ConfigError(
            "--size full is the true 3.3 B-parameter model and needs a CUDA device; on this machine use "
            "--size tiny (the default)"
        )
    if args.runs < 1:
        raise ConfigError(f"--runs must be >= 1; got {args.runs}")
    started = time.perf_counter()
    path = demo_checkpoint(args.size, args.cache_dir, args.seed)
    options = dict(config="pi05", num_views=args.num_views, hardware=args.hardware, device=args.device)
    if args.hardware == "auto":
        from flash_rt.hardware import detect_arch, registered_routes  # noqa: PLC0415

        arch = detect_arch()
        if ("pi05", "torch", arch) not in registered_routes():
            # No fast path installed for this GPU: run the reference frontend on it instead.
            print(f"no pi05 frontend for arch {arch!r}; using the reference frontend on "
                  f"{args.device or ('cuda' if arch != 'cpu' else 'cpu')}", flush=True)
            options.update(hardware="cpu", device=args.device or ("cuda" if arch != "cpu" else None))
    try:
        model = flash_rt.load_model(str(path), **options)
    except CheckpointError as exc:  # a damaged cache is rebuilt, not trusted
        print(f"cached demo checkpoint unreadable ({exc}); rebuilding", flush=True)
        path = demo_checkpoint(args.size, args.cache_dir, args.seed, rebuild=True)
        model = flash_rt.load_model(str(path), **options)
    loaded = time.perf_counter()
    config = getattr(model.frontend, "config", None)
    state_dim = getattr(config, "state_dim", None) or 8
    images, state = synthetic_observation(args.num_views, state_dim, args.seed)
    prompt = "pick up the red cup and put it on the plate"
    noise = None  # fixed flow noise where the frontend takes it, so the printed values are reproducible
    if config is not None and "noise" in inspect.signature(model.frontend.infer).parameters:
        rng = np.random.default_rng(args.seed + 1)
        noise = rng.standard_normal((config.action_horizon, config.action_dim)).astype(np.float32)

    latencies = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        actions = model.predict(images, prompt=prompt, state=state, noise=noise)
        latencies.append(time.perf_counter() - t0)

    print(f"model       Pi0.5 ({args.size}, random weights) via {model!r}")
    print(f"checkpoint  {path}")
    print(f"inputs      {args.num_views} x (224, 224, 3) uint8 images, state ({state_dim},), prompt {prompt!r}")
    print(f"actions     shape {actions.shape}, dtype {actions.dtype}")
    with np.printoptions(precision=4, suppress=True, linewidth=120):
        print(f"first step  {actions[0, : min(7, actions.shape[1])]}")
        print(f"last step   {actions[-1, : min(7, actions.shape[1])]}")
    print(f"latency     first call {latencies[0] * 1e3:.1f} ms", end="")
    if len(latencies) > 1:
        print(f", then median {np.median(latencies[1:]) * 1e3:.1f} ms over {len(latencies) - 1} call(s)", end="")
    print(f"  (load {loaded - started:.1f} s)")
    if not np.all(np.isfinite(actions)):
        print("error: the actions hold NaN or inf")
        return 1
    return 0
