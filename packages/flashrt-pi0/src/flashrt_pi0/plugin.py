"""Registers this package's frontends with flash_rt (imported lazily by the registry)."""

from flash_rt.plugins import hookimpl


@hookimpl
def flashrt_register_frontends(register):
    register("pi0", "torch", "cpu", "flashrt_pi0.frontend_torch_cpu:Pi0TorchFrontendCpu")
