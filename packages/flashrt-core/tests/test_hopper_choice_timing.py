"""The timing behind KernelOps' measured choices (skinny GEMM or cuBLASLt, SDPA or our attention)
must measure the GPU, not the host: the timed calls are captured into a CUDA graph and replayed
behind a sleep on the stream, so they run back to back. Here a simulated stream (host clock, GPU
clock, in-order queue, graph capture) stands in for CUDA, so the arithmetic is checked without a
GPU: whatever a call costs the host, the measured time is the call's GPU time, also where the
sleep's rate was measured at a lower clock, and also without the graph where capture fails.
(A fixed ~1 ms sleep failed this for host costs above ~50 us a call: the time measured for torch's
SDPA on the H100 was at times the host's; Python-enqueued calls behind a sleep of twice their
enqueue time failed it in the first process on a fresh H100, SDPA measured at 59-68 us.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

import flash_rt.models.hopper_kernel_ops as hko

CYCLES_PER_MS = 1.7e6  # the simulated GPU's clock


class _Sim:
    """One CUDA stream: ops start when the GPU is free and the host has issued them; while a graph
    is captured, ops are recorded into it instead (their host cost is paid at capture)."""

    def __init__(self):
        self.host_ms = 0.0
        self.gpu_free_ms = 0.0
        self.cycles_per_ms = CYCLES_PER_MS  # the GPU's clock now
        self.capturing: list[float] | None = None
        self.capture_fails = False

    def enqueue(self, gpu_ms: float, host_ms: float) -> float:
        self.host_ms += host_ms
        if self.capturing is not None:
            self.capturing.append(gpu_ms)
            return self.gpu_free_ms
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

    class CUDAGraph:
        def __init__(self):
            self.ops: list[float] = []

        def replay(self):  # one launch: the host pays a few us, the GPU runs the ops back to back
            s.enqueue(sum(self.ops), 0.008)

    @contextlib.contextmanager
    def graph(g):
        s.capturing = g.ops
        try:
            yield
            if s.capture_fails:
                raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            s.capturing = None

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: s.enqueue(cycles / s.cycles_per_ms, 0.005))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(hko.time, "perf_counter", lambda: s.host_ms / 1e3)
    monkeypatch.setattr(hko, "_SLEEP_RATE", {})
    return s


@pytest.mark.parametrize("capture_fails", [False, True], ids=["graph", "eager"])
@pytest.mark.parametrize("host_us", [5.0, 50.0, 120.0, 400.0])
@pytest.mark.parametrize("gpu_us", [4.0, 21.0, 60.0])
def test_measured_time_is_the_gpu_time_whatever_the_host_cost(sim, host_us, gpu_us, capture_fails):
    sim.capture_fails = capture_fails

    def call():
        sim.enqueue(gpu_us / 1e3, host_us / 1e3)

    measured = hko._median_us(call)
    assert measured == pytest.approx(gpu_us, rel=0.01), (
        f"a call of {gpu_us} us on the GPU and {host_us} us on the host measured {measured:.2f} us"
    )


@pytest.mark.parametrize("host_us", [50.0, 400.0])
def test_a_sleep_rate_measured_at_a_low_clock_does_not_leak_the_host_time_in(sim, host_us):
    """A GPU just out of idle runs its clock low: the sleep's rate measured then is too low for
    the boost clock later, every sleep ends early, and Python-enqueued calls would be timed at the
    host's pace. The graph's one launch still hides behind the shortened sleep."""
    sim.cycles_per_ms = CYCLES_PER_MS / 4
    hko._sleep_cycles_per_ms()
    sim.cycles_per_ms = CYCLES_PER_MS

    def call():
        sim.enqueue(21.0 / 1e3, host_us / 1e3)

    assert hko._median_us(call) == pytest.approx(21.0, rel=0.01)


def test_the_sleep_rate_is_calibrated_from_the_device(sim):
    assert hko._sleep_cycles_per_ms() == pytest.approx(CYCLES_PER_MS, rel=0.01)
