"""Importing flash_rt (any module) initialises no CUDA, imports no jax and no model package."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import flash_rt
    assert "torch" not in sys.modules, "import flash_rt pulled in torch"
    failed = []
    for info in pkgutil.walk_packages(flash_rt.__path__, "flash_rt."):
        if info.name in ("flash_rt.flash_rt_kernels", "flash_rt.flash_rt_fa2"):
            continue  # raise ImportError without flashrt-kernels, by design
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            failed.append((info.name, str(exc)))
    bad = [m for m in sys.modules if m == "jax" or m.startswith("jax.")
           or m.split(".")[0] in ("flashrt_pi05", "flashrt_pi0", "flashrt_pi0fast", "flashrt_groot",
                                  "flashrt_video", "flashrt_toy")]
    assert not bad, f"imported: {bad}"
    if "torch" in sys.modules:
        import torch
        assert not torch.cuda.is_initialized(), "a flash_rt module initialised CUDA at import"
    print("FAILED_IMPORTS", failed)
    """
)


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "FAILED_IMPORTS []" in out.stdout, out.stdout
