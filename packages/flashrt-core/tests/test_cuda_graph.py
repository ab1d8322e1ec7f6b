"""CUDAGraph: argument checks and no-device errors here; capture/replay on a GPU (marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flash_rt.core.cuda_buffer import CudaBuffer
from flash_rt.core.cuda_graph import CUDAGraph, capture_callable
from flash_rt.errors import ConfigError, HardwareError


def _cuda_python_sees_a_device() -> bool:
    try:
        from cuda.bindings import runtime
    except ImportError:
        return False
    err, count = runtime.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


HAS_DEVICE = _cuda_python_sees_a_device()
gpu = pytest.mark.skipif(not HAS_DEVICE, reason="needs a CUDA device visible to cuda-python")
torch_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU")


def test_backend_choice():
    assert CUDAGraph().backend == "torch"  # torch is imported by this test module
    assert CUDAGraph("cuda").backend == "cuda"
    with pytest.raises(ConfigError, match="auto, torch, cuda"):
        CUDAGraph("jax")


def test_replay_before_capture_is_an_error():
    with pytest.raises(ConfigError, match="before capture"):
        CUDAGraph("cuda").replay()


def test_bad_capture_arguments():
    with pytest.raises(ConfigError, match="thread_local, global, relaxed"):
        with CUDAGraph("cuda").capture(mode="strict"):
            pass
    with pytest.raises(HardwareError, match="legacy default stream"):
        with CUDAGraph("cuda").capture(stream=0):
            pass
    with pytest.raises(ConfigError, match="warmup"):
        capture_callable(lambda: None, warmup=-1)


@pytest.mark.skipif(HAS_DEVICE, reason="checks the no-device error")
def test_cuda_backend_without_device():
    with pytest.raises(HardwareError, match="no usable CUDA device"):
        with CUDAGraph("cuda").capture():
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device error")
def test_torch_backend_without_device():
    with pytest.raises(HardwareError, match="no CUDA device"):
        with CUDAGraph("torch").capture():
            pass
    with pytest.raises(HardwareError, match="no CUDA device"):
        capture_callable(lambda: None, backend="torch")


# -- on a GPU -----------------------------------------------------------------------------------


@torch_gpu
@pytest.mark.gpu
def test_torch_graph_replays_with_new_inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 128, device="cuda", generator=gen)
    w = torch.randn(128, 32, device="cuda", generator=gen)
    out = torch.full((64, 32), float("nan"), device="cuda")
    graph = CUDAGraph("torch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (cuBLAS workspace, etc.)
        torch.matmul(x, w, out=out)
    torch.cuda.current_stream().wait_stream(side)
    with graph.capture(side) as stream:
        assert stream == side.cuda_stream
        torch.matmul(x, w, out=out)
        out.add_(1.0).tanh_()
    for _ in range(3):
        x.copy_(torch.randn(64, 128, device="cuda", generator=gen))
        out.fill_(float("nan"))
        graph.replay()  # on torch's current stream, after the copies above
        graph.synchronize()
        torch.testing.assert_close(out, torch.tanh(x @ w + 1.0))
    # an explicit stream (torch object or int handle) works too
    x.copy_(torch.randn(64, 128, device="cuda", generator=gen))
    out.fill_(float("nan"))
    side.wait_stream(torch.cuda.current_stream())
    graph.replay(side.cuda_stream)
    side.synchronize()
    torch.testing.assert_close(out, torch.tanh(x @ w + 1.0))


@torch_gpu
@pytest.mark.gpu
def test_capture_callable_torch():
    x = torch.randn(1000, device="cuda")
    y = torch.empty_like(x)

    def step():
        torch.mul(x, 3.0, out=y)
        y.sub_(x.square())

    graph = capture_callable(step, warmup=2)
    for _ in range(2):
        x.copy_(torch.randn(1000, device="cuda"))
        y.fill_(float("nan"))
        graph.replay()
        graph.synchronize()
        torch.testing.assert_close(y, 3.0 * x - x.square())


@gpu
@pytest.mark.gpu
def test_cuda_backend_memcpy_graph_without_torch_ops():
    rng = np.random.default_rng(0)
    src = CudaBuffer.from_numpy(rng.standard_normal(4096).astype(np.float32))
    dst = CudaBuffer.zeros(4096, "float32")
    graph = CUDAGraph("cuda")
    with graph.capture() as stream:
        dst.copy_from(src, stream)
    assert graph.captured
    for _ in range(3):
        values = rng.standard_normal(4096).astype(np.float32)
        src.copy_from_numpy(values, stream=graph.stream)
        dst.copy_from_numpy(np.full(4096, np.nan, dtype=np.float32), stream=graph.stream)
        graph.replay()
        np.testing.assert_array_equal(dst.to_numpy(stream=graph.stream), values)
    graph.reset()
    assert not graph.captured
    with pytest.raises(ConfigError, match="before capture"):
        graph.replay()
    graph.free()


@gpu
@pytest.mark.gpu
def test_cuda_backend_capture_callable_and_error_in_block():
    src = CudaBuffer.from_numpy(np.arange(256, dtype=np.float32))
    dst = CudaBuffer.zeros(256, "float32")
    graph = CUDAGraph("cuda")
    with pytest.raises(ValueError, match="boom"):
        with graph.capture() as stream:
            dst.copy_from(src, stream)
            raise ValueError("boom")
    assert not graph.captured  # the failed capture left nothing behind; capture again
    with graph.capture() as stream:
        dst.copy_from(src, stream)
    graph.replay()
    np.testing.assert_array_equal(dst.to_numpy(stream=graph.stream), np.arange(256))

    calls = []
    graph2 = capture_callable(lambda s: (calls.append(s), dst.fill_zero(s)), warmup=2, backend="cuda")
    assert len(calls) == 3  # two warmups and the captured call
    dst.copy_from_numpy(np.ones(256, dtype=np.float32), stream=graph2.stream)
    graph2.replay()
    np.testing.assert_array_equal(dst.to_numpy(stream=graph2.stream), np.zeros(256))


@gpu
@pytest.mark.gpu
def test_cuda_backend_synchronising_inside_capture_is_a_hardware_error():
    buf = CudaBuffer.zeros(16, "float32")
    graph = CUDAGraph("cuda")
    with pytest.raises(HardwareError, match="cudaStreamSynchronize"):
        with graph.capture() as stream:
            buf.fill_zero(stream)
            graph.synchronize()  # waiting on a stream that is being captured is illegal
    assert not graph.captured
