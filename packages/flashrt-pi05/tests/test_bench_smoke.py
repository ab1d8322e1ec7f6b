"""``flashrt bench --smoke``: the benchmark tool's whole flow on a tiny model on the CPU (the GPU run
is the one that measures; this checks that the tool runs and that its JSON says what the docs say)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashrt_pi05.bench import HOST_PHASES


@pytest.mark.parametrize("config", ["pi05", "pi0"])
def test_bench_smoke_writes_results_with_host_phases(tmp_path, config):
    out = tmp_path / f"{config}.json"
    run = subprocess.run(
        [sys.executable, "-m", "flash_rt.cli", "bench", "--smoke", "--config", config, "--views", "1,2",
         "--precision", "bf16", "--compile", "none", "--iters", "12", "--p99-iters", "12", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["model"] == config and "smoke" in doc["device"]
    assert [(r["views"], r["precision"]) for r in doc["results"]] == [(1, "bf16"), (2, "bf16")]
    for r in doc["results"]:
        wall = r["wall_ms"]
        assert 0 < wall["min"] <= wall["p50"] <= wall["p99"] and wall["n"] == 12
        # the tiny model in bf16 against its fp32 reference, same noise
        assert r["cosine_vs_fp32"] > 0.999, r["cosine_vs_fp32"]
        assert r["memory_growth"]["calls"] == 12
        phases = r["p99_check"]["host_phases_ms_p50"]
        assert list(phases) == list(HOST_PHASES)
        assert all(v >= 0 for v in phases.values()), phases
        # the model runs eagerly inside infer() on the CPU: the launch phase carries it, and the
        # phases cover the call (medians of parts need not add up exactly: within a third)
        assert phases["launch"] > phases["before_infer"]
        assert 0.67 * wall["p50"] <= sum(phases.values()) <= 1.5 * wall["p50"], (phases, wall)
    # eager baseline in the same run, and the speedup rows that refer to it
    assert {b["views"] for b in doc["baselines"] if b["name"].endswith("eager")} == {1, 2}
    assert all("vs_eager" in s for s in doc["speedups"])


def test_bench_refuses_compile_views_outside_views():
    """The compiled baseline runs on the fast path's inputs: a view count the run does not build is
    refused before any work, with the fix in the message (it used to fail deep in the baseline)."""
    run = subprocess.run(
        [sys.executable, "-m", "flash_rt.cli", "bench", "--smoke", "--views", "1", "--precision", "bf16",
         "--compile", "default", "--compile-views", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode != 0
    assert "--compile-views 2 must be among --views 1" in run.stderr + run.stdout
    assert "--compile none" in run.stderr + run.stdout


def test_bench_camera_size_feeds_images_the_frontend_resizes(tmp_path):
    """--camera-size: predict() gets camera-size images (resized on the host, as a robot's are);
    the fp32 truth is computed from the same images, so the cosine still holds."""
    out = tmp_path / "cam.json"
    run = subprocess.run(
        [sys.executable, "-m", "flash_rt.cli", "bench", "--smoke", "--views", "2", "--precision", "bf16",
         "--compile", "none", "--no-eager", "--iters", "5", "--p99-iters", "5", "--camera-size", "90x120",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["camera_hw"] == [90, 120]
    assert doc["results"][0]["cosine_vs_fp32"] > 0.999
    bad = subprocess.run(
        [sys.executable, "-m", "flash_rt.cli", "bench", "--smoke", "--views", "1", "--compile", "none", "--camera-size", "640"],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0 and "HEIGHTxWIDTH" in bad.stderr + bad.stdout
