"""Registers this package's frontends with flash_rt (imported lazily by the registry)."""

from flash_rt.plugins import hookimpl

HOPPER = "flashrt_pi0.frontend_torch_hopper:Pi0TorchFrontendHopper"


@hookimpl
def flashrt_register_frontends(register):
    register("pi0", "torch", "cpu", "flashrt_pi0.frontend_torch_cpu:Pi0TorchFrontendCpu")
    # Measured: benchmarks/h100/*.json. The code is plain torch + flashrt_kernels and should run
    # unchanged on other FP8 GPUs (sm_89+), but no route is claimed where it never ran.
    register("pi0", "torch", "hopper", HOPPER, measured=True)
