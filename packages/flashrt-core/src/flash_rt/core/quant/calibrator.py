"""FP8 calibration cache: scales measured once per (checkpoint, model options), reused after.

A cache file is JSON:

    {"schema_version": 1, "flash_rt_version": "0.1.0", "created": "2026-...Z",
     "fingerprint": "<checkpoint_fingerprint(path)>", "options": {...},
     "scales": {"enc_act": [0.031, ...], "lm_head_act": 0.17}}

``load_calibration`` trusts a file only if every field checks out (schema, fingerprint, options,
every scale finite and positive, and the names / lengths the caller expects); otherwise it warns
and returns ``None`` and the caller recalibrates. A cache never crashes a load and never hands
back a wrong scale. Writes are atomic (temp file + ``os.replace``). See docs/calibration.md.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flash_rt.errors import CalibrationError, CheckpointError

__all__ = [
    "SCHEMA_VERSION",
    "CalibrationWarning",
    "save_calibration",
    "load_calibration",
    "checkpoint_fingerprint",
    "default_cache_dir",
    "calibration_path",
]

SCHEMA_VERSION = 1
CACHE_ENV = "FLASHRT_CACHE_DIR"
_SAMPLE = 64 * 1024  # bytes hashed from each end of a non-safetensors file
_MAX_HEADER = 100 * 1024 * 1024

Scales = dict[str, "float | list[float]"]


class CalibrationWarning(UserWarning):
    """A calibration cache file was ignored (corrupt, stale or for other options)."""


# --------------------------------------------------------------------------------------------
# where


def default_cache_dir() -> Path:
    """``$FLASHRT_CACHE_DIR/calibration`` if the variable is set, else
    ``platformdirs.user_cache_dir("flashrt")/calibration`` (``~/.cache/flashrt/calibration``
    on Linux)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("flashrt")
    return Path(root).expanduser() / "calibration"


def _canonical_options(options: Mapping[str, Any] | None) -> dict:
    """Options as JSON sees them (tuples -> lists, keys sorted) so equality survives a round trip."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise CalibrationError(f"calibration options must be a mapping, got {type(options).__name__}")
    try:
        return json.loads(json.dumps(dict(options), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CalibrationError(
            f"calibration options must be JSON values (str, int, float, bool, None, lists, dicts): {e}"
        ) from None


def calibration_path(
    fingerprint: str, options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The default cache file for a checkpoint fingerprint and model options."""
    blob = json.dumps({"fingerprint": fingerprint, "options": _canonical_options(options)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:24]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{key}.json"


def _resolve_path(path_or_key, fingerprint: str, options) -> Path:
    if path_or_key is None:
        return calibration_path(fingerprint, options)
    p = os.fspath(path_or_key)
    if (
        isinstance(path_or_key, os.PathLike)
        or os.sep in p
        or (os.altsep and os.altsep in p)
        or p.endswith(".json")
    ):
        return Path(p).expanduser()
    return default_cache_dir() / f"{p}.json"


# --------------------------------------------------------------------------------------------
# fingerprint


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a checkpoint file or directory (sha256 hex).

    Hashes, for every file (sorted relative paths, hidden files skipped): its name, its size and
    either its safetensors header (dtypes, shapes, offsets, metadata) or its first and last 64 KiB.
    Reads a few KiB to MiB, never the tensors, so it is fast on multi-GB checkpoints; modification
    times are ignored, so a copied checkpoint keeps its calibration.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"cannot fingerprint {os.fspath(path)!r}: no such file or directory")
    h = hashlib.sha256(b"flashrt-fingerprint-v1\0")
    if root.is_file():
        files = [(root.name, root)]
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith("."):
                    full = Path(dirpath) / f
                    files.append((full.relative_to(root).as_posix(), full))
        files.sort()
    for rel, full in files:
        size = full.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        h.update(_file_sample(full, size))
    return h.hexdigest()


def _file_sample(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= min(size - 8, _MAX_HEADER):
                return b"st\0" + f.read(n)
            f.seek(0)
        head = f.read(_SAMPLE)
        if size > 2 * _SAMPLE:
            f.seek(size - _SAMPLE)
        tail = f.read(_SAMPLE) if size > _SAMPLE else b""
        return b"raw\0" + head + tail


# --------------------------------------------------------------------------------------------
# save / load


def _is_scale(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _plain(value):
    """numpy / torch scalars and arrays -> Python floats / lists of floats."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_scales(scales, where: str) -> str | None:
    """None if good, else what is wrong."""
    if not isinstance(scales, Mapping):
        return f"{where}: 'scales' is a {type(scales).__name__}, expected an object"
    for name, value in scales.items():
        if not isinstance(name, str):
            return f"{where}: scale name {name!r} is not a string"
        vals = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            return f"{where}: scale {name!r} is an empty list"
        for j, v in enumerate(vals):
            if not _is_scale(v):
                at = f"[{j}]" if isinstance(value, list) else ""
                return f"{where}: scale {name}{at} = {v!r}; scales must be finite positive numbers"
    return None


def save_calibration(
    path_or_key: str | os.PathLike | None,
    scales: Mapping[str, Any],
    *,
    fingerprint: str,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Write calibration scales atomically; returns the file written.

    Args:
        path_or_key: a file path (contains a path separator or ends in ``.json``), a short key
            (``"pi05_hopper"`` -> ``<cache dir>/pi05_hopper.json``), or ``None`` for a file
            named after ``fingerprint`` and ``options`` in the cache dir.
        scales: name -> a positive finite float, or a list of them (one per layer); numpy and
            torch values are accepted.
        fingerprint: ``checkpoint_fingerprint(checkpoint_path)``.
        options: the model options the scales depend on (num_views, pool factor, fp8 layers,
            ...): JSON values.

    Raises ``CalibrationError`` for a non-finite, zero or negative scale (a calibration that
    produced one is broken and must not be cached), and when the file cannot be written
    (a frontend may catch that, warn, and run with the scales it has).
    """
    if not isinstance(fingerprint, str) or not fingerprint:
        raise CalibrationError("save_calibration needs fingerprint=checkpoint_fingerprint(checkpoint_path)")
    plain = {str(k): _plain(v) for k, v in dict(scales).items()}
    problem = _check_scales(plain, "save_calibration")
    if problem:
        raise CalibrationError(problem + ". Calibration produced a broken scale; it was not saved.")
    opts = _canonical_options(options)
    from flash_rt import __version__

    doc = {
        "schema_version": SCHEMA_VERSION,
        "flash_rt_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fingerprint": fingerprint,
        "options": opts,
        "scales": plain,
    }
    path = _resolve_path(path_or_key, fingerprint, options)
    data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise CalibrationError(
            f"cannot write the calibration cache {os.fspath(path)}: {e}. Set {CACHE_ENV} to a writable "
            "directory (the scales are still valid for this run)."
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CalibrationError(
                f"cannot write the calibration cache {os.fspath(path)}: {e}. The previous file, if any, "
                f"is unchanged; set {CACHE_ENV} to a writable directory."
            ) from e
        raise
    return path


def load_calibration(
    path_or_key: str | os.PathLike | None,
    *,
    fingerprint: str,
    options: Mapping[str, Any] | None = None,
    expect: Mapping[str, int | None] | Sequence[str] | None = None,
) -> Scales | None:
    """Read cached scales, or ``None`` if there is no trustworthy cache (then recalibrate).

    Args:
        path_or_key, fingerprint, options: as for ``save_calibration``; the file must have been
            saved with the same fingerprint and equal options.
        expect: names the caller needs, optionally with their list length
            (``{"enc_act": 27, "lm_head_act": None}``: a list of 27 and a single float).
            A file lacking one, or with another length, is not trusted.

    A missing file returns ``None`` silently; a corrupt, truncated, wrong-schema, stale
    (other fingerprint or options) or implausible (non-finite / non-positive scale) file
    returns ``None`` with a ``CalibrationWarning`` saying why. Never raises for a bad file.
    """
    path = _resolve_path(path_or_key, fingerprint, options)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return _reject(path, f"cannot be read ({e})")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return _reject(path, f"is not valid JSON (corrupt or truncated: {e})")
    if not isinstance(doc, dict):
        return _reject(path, f"holds a {type(doc).__name__}, expected a calibration object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        return _reject(
            path, f"has schema_version {doc.get('schema_version')!r}, this FlashRT reads {SCHEMA_VERSION}"
        )
    if doc.get("fingerprint") != fingerprint:
        return _reject(path, "was made for a different checkpoint (fingerprint differs)")
    try:
        opts = _canonical_options(options)
    except CalibrationError as e:
        return _reject(path, str(e))
    if doc.get("options") != opts:
        return _reject(path, f"was made with options {doc.get('options')!r}, these are {opts!r}")
    scales = doc.get("scales")
    problem = _check_scales(scales, "scales")
    if problem:
        return _reject(path, f"holds an implausible value ({problem})")
    if expect is not None:
        names_only = not isinstance(expect, Mapping)
        wanted = dict.fromkeys(expect) if names_only else expect
        for name, length in wanted.items():
            if name not in scales:
                return _reject(path, f"has no scale {name!r}")
            value = scales[name]
            if length is None and isinstance(value, list) and not names_only:
                return _reject(path, f"scale {name!r} is a list, expected one number")
            if length is not None and (not isinstance(value, list) or len(value) != length):
                got = len(value) if isinstance(value, list) else "one number"
                return _reject(path, f"scale {name!r} has {got} entries, expected {length}")
    return {k: (list(v) if isinstance(v, list) else float(v)) for k, v in scales.items()}


def _reject(path: Path, why: str) -> None:
    warnings.warn(
        f"calibration cache {os.fspath(path)} {why}; ignoring it and recalibrating.",
        CalibrationWarning,
        stacklevel=3,
    )
    return None
