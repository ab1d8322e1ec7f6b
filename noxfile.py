"""One session per target. `nox` runs the CI set: lint, wheels, tests (CPU), parity.

    nox -s demo        the main job: a tiny Pi0.5 end to end on this machine
    nox -s wheels      every pure-Python package builds a wheel and installs from it
    nox -s tests       CPU tests of every package, the kernel build + import, the plugin example
    nox -s parity      Python 3.12 + lerobot: our references against an independent implementation
    nox -s kernels     build the flashrt-kernels wheel into dist/
    nox -s gpu         on a CUDA machine: build kernels, -m gpu tests, benchmarks (scripts/gpu_check.sh)
    nox -s lint        ruff
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import nox


def _expose_pyenv_versions() -> None:
    """pyenv's shims answer `python3.12` only for the selected versions (pyenv also sets
    PYENV_VERSION for the process it runs); select every installed one, current first, so nox
    finds the interpreters its sessions name."""
    if shutil.which("pyenv") is None:
        return
    current = os.environ.get("PYENV_VERSION") or subprocess.run(
        ["pyenv", "version-name"], capture_output=True, text=True).stdout.strip()
    selected = [v for v in current.split(":") if v]
    installed = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
    os.environ["PYENV_VERSION"] = ":".join(selected + [v for v in installed if v not in selected])


_expose_pyenv_versions()

nox.options.sessions = ["lint", "wheels", "tests", "parity"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

TORCH_CPU = "torch==2.13.0"  # the CPU build that the machines carry on disk
PY_DEFAULT = "3.11"
PY_PARITY = "3.12"  # lerobot 0.6.1 needs >= 3.12

MODEL_PACKAGES = [
    "packages/flashrt-pi05",
    "packages/flashrt-pi0",
    "packages/flashrt-pi0fast",
    "packages/flashrt-groot",
    "packages/flashrt-video",
]
CPU_MARKERS = "not gpu and not parity"


def _install_flashrt(session: nox.Session, torch_spec: str = TORCH_CPU) -> None:
    session.install(torch_spec)
    session.install("-e", "packages/flashrt-core[serve,tokenizer,jax,cuda]")
    for package in MODEL_PACKAGES:
        session.install("-e", package)


@nox.session(python=PY_DEFAULT)
def tests(session: nox.Session) -> None:
    _install_flashrt(session)
    # The CUDA extension builds without a GPU (system nvcc, cuBLASLt from the PyPI wheel); CI builds
    # sm_90a only and its tests check the build imports and fails cleanly without a device.
    session.install("scikit-build-core>=0.8", "pybind11>=2.12", "nvidia-cublas>=13.0,<14")
    session.install("--no-build-isolation", "./packages/flashrt-kernels", env={"CUDAARCHS": "90a"})
    session.install("pytest>=8", "pytest-timeout")
    session.install("-e", "examples/plugin-toy")
    session.run(
        "pytest", "-m", CPU_MARKERS, "--timeout=1800", "-q",
        "packages", "examples/plugin-toy/tests", *session.posargs,
    )


@nox.session(python=PY_DEFAULT, reuse_venv=False)
def wheels(session: nox.Session) -> None:
    """Every pure-Python package builds as a wheel and installs from those wheels alone."""
    session.install("build")
    dist = session.create_tmp()
    for package in ["packages/flashrt-core", *MODEL_PACKAGES, "examples/plugin-toy"]:
        session.run("python", "-m", "build", "--wheel", "--outdir", dist, package, silent=True)
    session.install(TORCH_CPU)
    wheels = sorted(str(p) for p in pathlib.Path(dist).glob("*.whl"))
    session.install(*wheels)
    session.run("flashrt", "plugins")
    session.run("python", "-c", "import flash_rt, flashrt_pi05, flashrt_pi0; print(flash_rt.__version__)")


@nox.session(python=PY_DEFAULT)
def demo(session: nox.Session) -> None:
    _install_flashrt(session)
    session.run("flashrt", "demo", *session.posargs)


# lerobot 0.6.1 (the independent implementation) pins Python >= 3.12 and torch < 2.12. With a CPU
# torch index for 3.12 (FLASHRT_PARITY_TORCH_INDEX=https://download.pytorch.org/whl/cpu) it is
# installed as published. Offline - the only CPU torch on these machines is 2.13 for Python 3.11, and
# PyPI's torch for 3.12 is a CUDA build - it is installed on 3.11 without its pins, and
# lerobot_py311_compat.py rewrites its five 3.12-only type-parameter declarations (none on the model
# path) and stubs torchvision (no CPU wheel offline; lerobot imports it for dataset transforms only).
PARITY_TORCH_INDEX = os.environ.get("FLASHRT_PARITY_TORCH_INDEX")
LEROBOT = "lerobot==0.6.1"
LEROBOT_RUNTIME_DEPS = [  # lerobot 0.6.1's requirements and its [pi] extra, less torch / torchvision / cmake
    "numpy>=2.0,<2.3", "opencv-python-headless>=4.9,<4.14", "Pillow>=10,<13", "einops>=0.8,<0.9",
    "draccus>=0.11.6,<0.12", "huggingface-hub>=1.6,<2", "requests>=2.32,<3", "gymnasium>=1.1.1,<2",
    "safetensors>=0.4.3,<1", "packaging>=24.2,<26", "termcolor>=2.4,<4", "tqdm>=4.66,<5",
    "transformers>=5.4,<5.6", "scipy>=1.14,<2",
]


@nox.session(python=PY_PARITY if PARITY_TORCH_INDEX else PY_DEFAULT)
def parity(session: nox.Session) -> None:
    if PARITY_TORCH_INDEX:
        session.install("torch==2.11.0", "torchvision==0.26.0", "--index-url", PARITY_TORCH_INDEX)
        session.install(f"lerobot[pi]{LEROBOT.removeprefix('lerobot')}")
    else:
        session.install(TORCH_CPU)
        session.install("--no-deps", "--ignore-requires-python", "--force-reinstall", LEROBOT)
        session.install(*LEROBOT_RUNTIME_DEPS)
    session.run("python", "packages/flashrt-pi05/tests/lerobot_py311_compat.py")
    # fail here, not as a quiet pytest skip, when lerobot's Pi models cannot be imported
    session.run("python", "-c", "import lerobot.policies.pi05.modeling_pi05, lerobot.policies.pi0.modeling_pi0")
    session.install("-e", "packages/flashrt-core[tokenizer,serve]")  # serve: its test modules import msgpack
    for package in MODEL_PACKAGES:
        session.install("-e", package)
    session.install("pytest>=8", "pytest-timeout")
    session.run("pytest", "-m", "parity", "--timeout=1800", "-q", "packages", *session.posargs,
                success_codes=[0, 5])


@nox.session(python=PY_DEFAULT)
def kernels(session: nox.Session) -> None:
    session.install("build")
    session.run("python", "-m", "build", "--wheel", "--outdir", "dist", "packages/flashrt-kernels",
                env={"CUDAARCHS": os.environ.get("CUDAARCHS", "")} if os.environ.get("CUDAARCHS") else None)


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    session.run("bash", "scripts/gpu_check.sh", *session.posargs, external=True)


@nox.session(python=PY_DEFAULT)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "packages", "examples", "noxfile.py")
