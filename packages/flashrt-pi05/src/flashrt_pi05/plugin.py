"""Registers this package's frontends and CLI commands with flash_rt (imported lazily)."""

from flash_rt.plugins import hookimpl

HOPPER = "flashrt_pi05.frontend_torch_hopper:Pi05TorchFrontendHopper"


@hookimpl
def flashrt_register_frontends(register):
    register("pi05", "torch", "cpu", "flashrt_pi05.frontend_torch_cpu:Pi05TorchFrontendCpu")
    # The Hopper path is plain torch (cuBLAS, torch._scaled_mm FP8, SDPA): it runs unchanged on
    # other FP8-capable GPUs (sm_89+), unmeasured there.
    register("pi05", "torch", "hopper", HOPPER, measured=False)
    for arch in ("rtx_sm120", "rtx_sm89", "thor"):
        register("pi05", "torch", arch, HOPPER, measured=False)


@hookimpl
def flashrt_cli_commands(subparsers):
    from flashrt_pi05.bench import add_bench_parser  # noqa: PLC0415
    from flashrt_pi05.demo import add_demo_parser  # noqa: PLC0415

    add_demo_parser(subparsers)
    add_bench_parser(subparsers)
