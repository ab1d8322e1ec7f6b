"""`flashrt demo` end to end on this machine (tiny size), through the CLI hook."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")

from flash_rt import cli  # noqa: E402
from flash_rt.errors import ConfigError  # noqa: E402


def test_demo_runs_and_reuses_its_cache(tmp_path, capsys):
    assert cli.main(["demo", "--cache-dir", str(tmp_path), "--runs", "2", "--hardware", "cpu"]) == 0
    first = capsys.readouterr().out
    assert "writing a random tiny Pi0.5 checkpoint" in first
    assert re.search(r"actions\s+shape \(10, 7\), dtype float32", first), first
    assert re.search(r"latency\s+first call [\d.]+ ms, then median [\d.]+ ms", first), first
    values = re.search(r"first step\s+\[([^\]]+)\]", first).group(1).split()
    assert len(values) == 7 and all(v.lstrip("-").replace(".", "").isdigit() for v in values)

    assert cli.main(["demo", "--cache-dir", str(tmp_path), "--runs", "1", "--hardware", "cpu"]) == 0
    second = capsys.readouterr().out
    assert "writing" not in second  # cached
    assert re.search(r"first step\s+\[([^\]]+)\]", second).group(1).split() == values  # fixed noise


def test_demo_rebuilds_a_damaged_cache(tmp_path, capsys):
    from flashrt_pi05.demo import demo_checkpoint

    path = demo_checkpoint("tiny", str(tmp_path))
    (path / "model.safetensors").write_bytes(b"truncated")
    assert cli.main(["demo", "--cache-dir", str(tmp_path), "--runs", "1", "--hardware", "cpu"]) == 0
    assert "rebuilding" in capsys.readouterr().out


def test_demo_full_size_needs_cuda(tmp_path, monkeypatch):
    import flashrt_pi05.demo as demo

    monkeypatch.setattr(demo, "_cuda_available", lambda: False)
    args = cli.build_parser().parse_args(["demo", "--size", "full", "--cache-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="CUDA"):
        demo.run_demo(args)
