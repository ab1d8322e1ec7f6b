"""Registers this package's frontends and CLI commands with flash_rt (imported lazily)."""

from flash_rt.plugins import hookimpl


@hookimpl
def flashrt_register_frontends(register):
    register("pi05", "torch", "cpu", "flashrt_pi05.frontend_torch_cpu:Pi05TorchFrontendCpu")


@hookimpl
def flashrt_cli_commands(subparsers):
    from flashrt_pi05.demo import add_demo_parser  # noqa: PLC0415

    add_demo_parser(subparsers)
