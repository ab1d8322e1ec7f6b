"""The timing behind KernelOps' measured choices (skinny GEMM or cuBLASLt, SDPA or our attention)
must measure the GPU, not the host: the stream sleeps while the host enqueues the timed calls, so
they run back to back. Here a simulated stream (host clock, GPU clock, in-order queue) stands in
for CUDA, so the arithmetic is checked without a GPU: whatever a call costs the host, the measured
time is the call's GPU time. (A fixed ~1 ms sleep failed this for host costs above ~50 us a call:
the time measured for torch's SDPA on the H100 was at times the host's.)"""

from __future__ import annotations

import pytest
import torch

import flash_rt.models.hopper_kernel_ops as hko

CYCLES_PER_MS = 1.7e6  # the simulated GPU's clock


class _Sim:
    """One CUDA stream: ops start when the GPU is free and the host has issued them."""

    def __init__(self):
        self.host_ms = 0.0
        self.gpu_free_ms = 0.0

    def enqueue(self, gpu_ms: float, host_ms: float) -> float:
        self.host_ms += host_ms
        start = max(self.gpu_free_ms, self.host_ms)
        self.gpu_free_ms = start + gpu_ms
        return self.gpu_free_ms


@pytest.fixture
def sim(monkeypatch):
    s = _Sim()

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = s.enqueue(0.0, 0.002)

        def synchronize(self):
            s.host_ms = max(s.host_ms, self.t)

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: s.enqueue(cycles / CYCLES_PER_MS, 0.005))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(hko.time, "perf_counter", lambda: s.host_ms / 1e3)
    monkeypatch.setattr(hko, "_SLEEP_RATE", {})
    return s


@pytest.mark.parametrize("host_us", [5.0, 50.0, 120.0, 400.0])
@pytest.mark.parametrize("gpu_us", [4.0, 21.0, 60.0])
def test_measured_time_is_the_gpu_time_whatever_the_host_cost(sim, host_us, gpu_us):
    def call():
        sim.enqueue(gpu_us / 1e3, host_us / 1e3)

    measured = hko._median_us(call)
    assert measured == pytest.approx(gpu_us, rel=0.01), (
        f"a call of {gpu_us} us on the GPU and {host_us} us on the host measured {measured:.2f} us"
    )


def test_the_sleep_rate_is_calibrated_from_the_device(sim):
    assert hko._sleep_cycles_per_ms() == pytest.approx(CYCLES_PER_MS, rel=0.01)


def _ops(autotune: int) -> hko.KernelOps:
    """A KernelOps with only the state its measured choices use (no kernels, no GPU)."""
    ops = object.__new__(hko.KernelOps)
    ops.autotune, ops._choice, ops.gemm_choices = autotune, {}, {}
    return ops


def test_fastest_of_several_candidates_is_measured_once_and_kept(sim, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gpu_us = {"splits_2_us": 9.0, "splits_4_us": 6.5, "splits_10_us": 7.5, "splits_auto_us": 7.5}
    timed = []

    def candidate(label):
        def call():
            timed.append(label)
            sim.enqueue(gpu_us[label] / 1e3, 0.03)
        return call

    ops = _ops(autotune=3)
    candidates = {label: candidate(label) for label in gpu_us}
    assert ops._fastest(("attention_splits", 400), candidates, "splits_auto_us") == "splits_4_us"
    assert ops.gemm_choices[("attention_splits", 400)]["splits_2_us"] == pytest.approx(9.0, rel=0.01)
    calls = len(timed)
    assert ops._fastest(("attention_splits", 400), candidates, "splits_auto_us") == "splits_4_us"
    assert len(timed) == calls, "a shape's choice is measured once, then remembered"


@pytest.mark.parametrize(("autotune", "capturing"), [(0, False), (3, True)])
def test_fastest_unmeasured_falls_back_without_timing(monkeypatch, autotune, capturing):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)

    def never():
        raise AssertionError("nothing is timed below autotune 3 or inside a capture")

    ops = _ops(autotune)
    assert ops._fastest(("k",), {"a_us": never, "b_us": never}, "b_us") == "b_us"
    # the same fallback for the two-way choice: the default below autotune 3, the second in a capture
    assert ops._first_is_faster(("k2",), never, never, default=True) is (not capturing)
