"""``flash_rt.flash_rt_kernels``: the compiled kernel module of the ``flashrt-kernels`` package.

Importing this name gives the ``flashrt_kernels`` module itself (it replaces this shim in
``sys.modules``), so ``from flash_rt import flash_rt_kernels as fvk`` and ``import flashrt_kernels``
are the same object. Importing it loads the extension but initialises no CUDA context.
"""

import sys

try:
    import flashrt_kernels as _kernels
except ImportError as exc:  # not installed, or built against another CUDA / Python
    raise ImportError(
        "flash_rt.flash_rt_kernels needs the compiled CUDA kernels, which are not importable here "
        f"({exc}). Install them with `pip install flashrt-kernels` (from a source checkout: "
        "`pip install ./packages/flashrt-kernels`; CUDAARCHS=90a builds Hopper only, faster)."
    ) from exc

sys.modules[__name__] = _kernels
