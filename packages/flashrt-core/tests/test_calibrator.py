"""Calibration cache: exact round trip, fingerprint, and every way a cache file can be bad."""

import json
import math
import os
import random
import warnings

import pytest

from flash_rt.core.quant import calibrator
from flash_rt.core.quant.calibrator import (
    SCHEMA_VERSION,
    CalibrationWarning,
    calibration_path,
    checkpoint_fingerprint,
    default_cache_dir,
    load_calibration,
    save_calibration,
)
from flash_rt.errors import CalibrationError, CheckpointError

FP = "f" * 64
OPTS = {"num_views": 2, "vision_pool_factor": 1, "fp8_layers": [0, 1, 2], "arch": "hopper"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration"


def random_scales(seed=0):
    rng = random.Random(seed)
    return {
        "enc_act": [rng.uniform(1e-4, 3.0) for _ in range(27)],
        "dec_act": [rng.uniform(1e-4, 3.0) for _ in range(18)],
        "lm_head_act": rng.uniform(1e-3, 1.0),
    }


def test_round_trip_is_exact_and_keyed_by_fingerprint_and_options(cache_dir):
    scales = random_scales()
    path = save_calibration(None, scales, fingerprint=FP, options=OPTS)
    assert path.parent == cache_dir and path == calibration_path(FP, OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_calibration(
            None, fingerprint=FP, options=OPTS, expect={"enc_act": 27, "lm_head_act": None}
        )
    assert back == scales  # floats survive JSON exactly
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["fingerprint"] == FP and doc["options"] == OPTS
    assert "flash_rt_version" in doc
    # other options or checkpoint -> another file, so nothing found (silently)
    assert calibration_path(FP, {**OPTS, "num_views": 3}) != path
    assert load_calibration(None, fingerprint=FP, options={**OPTS, "num_views": 3}) is None
    assert load_calibration(None, fingerprint="0" * 64, options=OPTS) is None


def test_options_equal_after_json_round_trip():
    save_calibration("k", {"a": 1.5}, fingerprint=FP, options={"layers": (1, 2), "b": None})
    assert load_calibration("k", fingerprint=FP, options={"b": None, "layers": [1, 2]}) == {"a": 1.5}


def test_key_and_explicit_path(tmp_path, cache_dir):
    p = save_calibration("pi05_hopper", {"a": 0.5}, fingerprint=FP)
    assert p == cache_dir / "pi05_hopper.json"
    explicit = tmp_path / "sub" / "cal.json"
    assert save_calibration(explicit, {"a": 0.25}, fingerprint=FP) == explicit
    assert load_calibration(str(explicit), fingerprint=FP) == {"a": 0.25}


def test_numpy_and_torch_values_are_accepted():
    np = pytest.importorskip("numpy")
    scales = {"a": np.float32(0.5), "b": np.array([0.25, 2.0])}
    save_calibration("np", scales, fingerprint=FP)
    assert load_calibration("np", fingerprint=FP) == {"a": 0.5, "b": [0.25, 2.0]}


def test_default_cache_dir_env_and_platformdirs(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "calibration"
    monkeypatch.delenv("FLASHRT_CACHE_DIR")
    import platformdirs

    assert str(default_cache_dir()) == os.path.join(platformdirs.user_cache_dir("flashrt"), "calibration")


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5, True, "0.5", None, [], [0.1, float("nan")]]
)
def test_save_rejects_broken_scales(bad, cache_dir):
    with pytest.raises(CalibrationError, match="scale"):
        save_calibration("bad", {"ok": 1.0, "x": bad}, fingerprint=FP)
    assert not (cache_dir / "bad.json").exists()


def test_save_rejects_bad_options_and_missing_fingerprint():
    with pytest.raises(CalibrationError, match="JSON"):
        save_calibration("k", {"a": 1.0}, fingerprint=FP, options={"f": object()})
    with pytest.raises(CalibrationError, match="fingerprint"):
        save_calibration("k", {"a": 1.0}, fingerprint="")


def test_atomic_write_keeps_old_file_when_write_fails(monkeypatch, cache_dir):
    save_calibration("k", {"a": 1.0}, fingerprint=FP)
    before = (cache_dir / "k.json").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(calibrator.os, "replace", boom)
    with pytest.raises(CalibrationError, match="disk full.*previous file"):
        save_calibration("k", {"a": 2.0}, fingerprint=FP)
    assert (cache_dir / "k.json").read_bytes() == before
    assert os.listdir(cache_dir) == ["k.json"]  # no temp file left


def test_unwritable_cache_dir_is_a_calibration_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(blocker / "sub"))  # a path under a regular file
    with pytest.raises(CalibrationError, match="FLASHRT_CACHE_DIR"):
        save_calibration(None, {"a": 1.0}, fingerprint=FP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_calibration(None, fingerprint=FP) is None  # reading there is just "no cache"


def _write(cache_dir, text):
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "k.json").write_text(text)


def _good_doc():
    return {
        "schema_version": SCHEMA_VERSION,
        "flash_rt_version": "0.1.0",
        "fingerprint": FP,
        "options": {},
        "scales": {"a": [0.5, 0.25], "b": 1.0},
    }


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda d: json.dumps(d)[: len(json.dumps(d)) // 2], "not valid JSON"),
        (lambda d: "\x00\xff garbage", "not valid JSON"),
        (lambda d: "[1, 2]", "holds a list"),
        (lambda d: json.dumps({**d, "schema_version": 99}), "schema_version 99"),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "schema_version"}), "schema_version None"),
        (lambda d: json.dumps({**d, "fingerprint": "0" * 64}), "different checkpoint"),
        (lambda d: json.dumps({**d, "options": {"num_views": 3}}), "options"),
        (lambda d: json.dumps({**d, "scales": {"a": [0.5, -1.0]}}), r"a\[1\] = -1.0"),
        (lambda d: json.dumps({**d, "scales": {"a": 0}}), "a = 0"),
        (lambda d: json.dumps({**d, "scales": {"a": "NaN"}}), "'NaN'"),
        (lambda d: json.dumps({**d, "scales": {"a": float("nan")}}), "nan"),
        (lambda d: json.dumps({**d, "scales": {"a": float("inf")}}), "inf"),
        (lambda d: json.dumps({**d, "scales": {"a": True}}), "True"),
        (lambda d: json.dumps({**d, "scales": [1.0]}), "expected an object"),
        (lambda d: json.dumps({**d, "scales": {"a": []}}), "empty list"),
    ],
)
def test_bad_cache_file_warns_and_returns_none(cache_dir, mutate, why):
    _write(cache_dir, mutate(_good_doc()))
    with pytest.warns(CalibrationWarning, match=why):
        assert load_calibration("k", fingerprint=FP) is None


def test_good_hand_written_file_loads(cache_dir):
    _write(cache_dir, json.dumps(_good_doc()))
    assert load_calibration("k", fingerprint=FP) == {"a": [0.5, 0.25], "b": 1.0}


@pytest.mark.parametrize(
    "expect, why",
    [
        ({"a": 3}, "'a' has 2 entries, expected 3"),
        ({"c": None}, "no scale 'c'"),
        ({"a": None}, "'a' is a list, expected one number"),
        ({"b": 2}, "'b' has one number entries, expected 2"),
        (["a", "zz"], "no scale 'zz'"),
    ],
)
def test_expected_names_and_lengths(cache_dir, expect, why):
    _write(cache_dir, json.dumps(_good_doc()))
    with pytest.warns(CalibrationWarning, match=why):
        assert load_calibration("k", fingerprint=FP, expect=expect) is None


def test_expected_names_only_accepts_lists(cache_dir):
    _write(cache_dir, json.dumps(_good_doc()))
    assert load_calibration("k", fingerprint=FP, expect=["a", "b"]) is not None


def test_missing_file_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_calibration("never_saved", fingerprint=FP) is None


# ---------------------------------------------------------------------------------------------
# fingerprint


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _ckpt(dirpath, shape=(4,), data=None, meta=None):
    dirpath.mkdir(parents=True, exist_ok=True)
    n = math.prod(shape) * 4
    data = data if data is not None else os.urandom(n)
    hdr = {"w": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, n]}}
    if meta:
        hdr["__metadata__"] = meta
    (dirpath / "model.safetensors").write_bytes(_safetensors_bytes(hdr, data))
    (dirpath / "config.json").write_text('{"hidden": 8}')
    return dirpath


def test_fingerprint_stable_and_sensitive(tmp_path):
    a = _ckpt(tmp_path / "a", data=b"\x01" * 16)
    fp = checkpoint_fingerprint(a)
    assert len(fp) == 64 and fp == checkpoint_fingerprint(a)
    # a copy elsewhere (other mtime, same content) keeps its fingerprint
    b = _ckpt(tmp_path / "b", data=b"\x01" * 16)
    os.utime(b / "model.safetensors", (1, 1))
    assert checkpoint_fingerprint(b) == fp
    # shapes, metadata, config content and file names all matter
    assert checkpoint_fingerprint(_ckpt(tmp_path / "c", shape=(2, 2), data=b"\x01" * 16)) != fp
    assert checkpoint_fingerprint(_ckpt(tmp_path / "d", data=b"\x01" * 16, meta={"v": "2"})) != fp
    e = _ckpt(tmp_path / "e", data=b"\x01" * 16)
    (e / "config.json").write_text('{"hidden": 9}')
    assert checkpoint_fingerprint(e) != fp
    f = _ckpt(tmp_path / "f", data=b"\x01" * 16)
    (f / "extra.bin").write_bytes(b"x")
    assert checkpoint_fingerprint(f) != fp
    # a single file fingerprints too, and differs from its directory
    assert checkpoint_fingerprint(a / "model.safetensors") not in (
        fp,
        checkpoint_fingerprint(a / "config.json"),
    )


def test_fingerprint_of_large_raw_file_reads_only_its_ends(tmp_path):
    p = tmp_path / "blob.bin"
    with open(p, "wb") as f:
        f.truncate(64 << 20)  # sparse 64 MiB
    fp = checkpoint_fingerprint(p)
    with open(p, "r+b") as f:
        f.seek((64 << 20) - 10)
        f.write(b"changed")
    assert checkpoint_fingerprint(p) != fp  # the tail is sampled


def test_fingerprint_of_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint_fingerprint(tmp_path / "nope")
