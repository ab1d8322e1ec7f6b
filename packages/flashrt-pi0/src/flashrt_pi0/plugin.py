"""Registers this package's frontends with flash_rt (imported lazily by the registry)."""

from flash_rt.plugins import hookimpl

HOPPER = "flashrt_pi0.frontend_torch_hopper:Pi0TorchFrontendHopper"


@hookimpl
def flashrt_register_frontends(register):
    register("pi0", "torch", "cpu", "flashrt_pi0.frontend_torch_cpu:Pi0TorchFrontendCpu")
    # plain torch (see flashrt_pi05.plugin): unchanged on other FP8-capable GPUs, unmeasured there
    register("pi0", "torch", "hopper", HOPPER, measured=False)
    for arch in ("rtx_sm120", "rtx_sm89", "thor"):
        register("pi0", "torch", arch, HOPPER, measured=False)
