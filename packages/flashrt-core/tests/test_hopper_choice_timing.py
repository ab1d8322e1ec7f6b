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
