"""Registers this package's frontends with flash_rt. No frontend is registered yet:
config(s) groot groot_n17 have no compute path in this release."""

from flash_rt.plugins import hookimpl


@hookimpl
def flashrt_register_frontends(register):
    return None
