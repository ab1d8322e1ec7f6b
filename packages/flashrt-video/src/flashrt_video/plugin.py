"""Registers this package's frontends with flash_rt. No frontend is registered yet:
config(s) wan22_ti2v_5b cosmos3_video motus have no compute path in this release."""

from flash_rt.plugins import hookimpl


@hookimpl
def flashrt_register_frontends(register):
    return None
