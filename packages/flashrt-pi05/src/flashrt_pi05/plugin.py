"""Registers this package's frontends and CLI commands with flash_rt (imported lazily)."""

from flash_rt.plugins import hookimpl

HOPPER = "flashrt_pi05.frontend_torch_hopper:Pi05TorchFrontendHopper"


@hookimpl
def flashrt_register_frontends(register):
    register("pi05", "torch", "cpu", "flashrt_pi05.frontend_torch_cpu:Pi05TorchFrontendCpu")
    # Measured: benchmarks/h100/*.json. The code is plain torch + flashrt_kernels and should run
    # unchanged on other FP8 GPUs (sm_89+), but no route is claimed where it never ran.
    register("pi05", "torch", "hopper", HOPPER, measured=True)


@hookimpl
def flashrt_cli_commands(subparsers):
    from flashrt_pi05.bench import add_bench_parser  # noqa: PLC0415
    from flashrt_pi05.demo import add_demo_parser  # noqa: PLC0415

    add_demo_parser(subparsers)
    add_bench_parser(subparsers)
