"""PEP 517 backend: scikit-build-core, plus the PyPI CUDA toolchain when this machine lacks one.

A machine with a CUDA 13 toolkit (nvcc and cuBLASLt headers under CUDA_HOME or /usr/local/cuda)
builds with it. A machine without one gets `nvidia-cuda-nvcc` (+ cccl, runtime) and/or
`nvidia-cublas` in the isolated build environment; CMakeLists.txt looks for them there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scikit_build_core import build as _skbuild
from scikit_build_core.build import (  # noqa: F401  (re-exported PEP 517 hooks)
    build_editable,
    build_sdist,
    build_wheel,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

_CUDA_PINS = ">=13.0,<14"


def _toolkit_roots() -> list[Path]:
    roots = [os.environ.get(name) for name in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT")]
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    return [Path(r) for r in roots if r]


def _has_nvcc() -> bool:
    return any((root / "bin" / "nvcc").exists() for root in _toolkit_roots())


def _has_cublaslt() -> bool:
    for root in _toolkit_roots():
        for include in (root / "include", *root.glob("targets/*/include")):
            if (include / "cublasLt.h").exists():
                return True
    return False


def _cuda_requires() -> list[str]:
    extra = []
    if not _has_nvcc():
        extra += [f"nvidia-cuda-nvcc{_CUDA_PINS}", f"nvidia-cuda-cccl{_CUDA_PINS}",
                  f"nvidia-cuda-runtime{_CUDA_PINS}"]
    if not _has_cublaslt():
        extra.append(f"nvidia-cublas{_CUDA_PINS}")
    return extra


def get_requires_for_build_wheel(config_settings=None):
    return [*_skbuild.get_requires_for_build_wheel(config_settings), *_cuda_requires()]


def get_requires_for_build_editable(config_settings=None):
    return [*_skbuild.get_requires_for_build_editable(config_settings), *_cuda_requires()]
