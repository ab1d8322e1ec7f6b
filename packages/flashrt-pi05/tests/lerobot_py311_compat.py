"""Make the installed lerobot 0.6.1 importable on Python 3.11 with a CPU-only torch (nox -s parity).

lerobot 0.6.1 declares Python >= 3.12 and torch < 2.12. Offline, the only CPU torch is 2.13 for
Python 3.11, and PyPI's torch / torchvision wheels for 3.12 are CUDA builds. Two things stand in the
way on 3.11, neither on the Pi0 / Pi0.5 model path:

1. five declarations use Python 3.12 type-parameter syntax (PEP 695: ``type X = ...``,
   ``class C[T]``, ``def f[T: B]``) in dataset, motor, processor-pipeline and io modules that
   lerobot's package ``__init__`` imports. They are rewritten here to the equivalent
   ``TypeVar`` / ``Generic`` / plain-alias forms - typing only, no behaviour.
2. torchvision (imported for dataset image transforms and ACT's backbone) has no CPU wheel here;
   if it cannot be imported, a stub package whose every attribute is an inert dummy is installed.

lerobot's modeling code, ``pi_gemma``, ``transformers`` and torch run unmodified. Idempotent.
Usage: python lerobot_py311_compat.py   (inside the parity venv, after installing lerobot)
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path

TYPEVARS = 'from typing import Generic as _Generic, TypeVar as _TypeVar\n{names}\n'
REWRITES = {
    "processor/pipeline.py": (
        [("class DataProcessorPipeline[TInput, TOutput](HubMixin):",
          "class DataProcessorPipeline(HubMixin, _Generic[TInput, TOutput]):")],
        'TInput = _TypeVar("TInput")\nTOutput = _TypeVar("TOutput")',
    ),
    "motors/motors_bus.py": (
        [("type NameOrID = str | int", "NameOrID = str | int"), ("type Value = int | float", "Value = int | float")],
        None,
    ),
    "datasets/streaming_dataset.py": (
        [("class Backtrackable[T]:", "class Backtrackable(_Generic[T]):")],
        'T = _TypeVar("T")',
    ),
    "datasets/aggregate.py": (
        [("type FeatureDict =", "FeatureDict ="), ("type ChunkFile =", "ChunkFile ="),
         ("type VideoIndexState =", "VideoIndexState =")],
        None,
    ),
    "utils/io_utils.py": (
        [("def deserialize_json_into_object[T: JsonLike](", "def deserialize_json_into_object(")],
        'T = _TypeVar("T")',
    ),
}

TORCHVISION_STUB = '''"""Inert torchvision stand-in for lerobot's parity venv (see lerobot_py311_compat.py)."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy()


class _Dummy(metaclass=_Meta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Dummy()

    def __getattr__(self, name):
        return _Dummy()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Dummy,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StubModule
'''


def _insert_after_future_imports(text: str, block: str) -> str:
    """Put ``block`` before the module's first import other than ``from __future__``."""
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.startswith(("import ", "from ")) and not line.startswith("from __future__"):
            return "".join(lines[:index]) + block + "".join(lines[index:])
    raise ValueError("no import statement found")


def patch_lerobot() -> None:
    spec = importlib.util.find_spec("lerobot")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("lerobot is not installed in this environment")
    root = Path(next(iter(spec.submodule_search_locations)))
    for relative, (pairs, typevars) in REWRITES.items():
        path = root / relative
        text = path.read_text()
        if not any(old in text for old, _ in pairs) and all(new in text for _, new in pairs):
            continue  # already rewritten
        for old, new in pairs:
            if old not in text:
                sys.exit(f"{path}: expected {old!r}; this is not lerobot 0.6.1")
            text = text.replace(old, new)
        if typevars:
            text = _insert_after_future_imports(text, TYPEVARS.format(names=typevars))
        path.write_text(text)
        print(f"rewrote the Python 3.12 type-parameter syntax in {path}")


def stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # absent, or a CUDA build that cannot load with a CPU torch
        pass
    target = Path(sysconfig.get_paths()["purelib"]) / "torchvision"
    target.mkdir(exist_ok=True)
    (target / "__init__.py").write_text(TORCHVISION_STUB)
    print(f"installed an inert torchvision stub at {target}")


if __name__ == "__main__":
    if sys.version_info >= (3, 12):
        print("Python >= 3.12: lerobot runs as published; nothing to do")
    else:
        patch_lerobot()
    stub_torchvision()
