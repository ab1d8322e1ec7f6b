"""Registers this package's frontends with flash_rt."""

from flash_rt.plugins import hookimpl

HOPPER = "flashrt_pi05.frontend_torch_hopper:Pi05TorchFrontendHopper"


@hookimpl
def flashrt_register_frontends(register):
    # The Hopper path is plain torch (cuBLAS, torch._scaled_mm FP8, SDPA): it runs unchanged on
    # other FP8-capable GPUs (sm_89+), unmeasured there.
    register("pi05", "torch", "hopper", HOPPER, measured=False)
    for arch in ("rtx_sm120", "rtx_sm89", "thor"):
        register("pi05", "torch", arch, HOPPER, measured=False)


@hookimpl
def flashrt_cli_commands(subparsers):
    from flashrt_pi05.bench import add_bench_parser  # noqa: PLC0415

    add_bench_parser(subparsers)
