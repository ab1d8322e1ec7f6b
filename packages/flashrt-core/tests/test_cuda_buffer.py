"""CudaBuffer / PinnedHostBuffer: dtypes and host conversions, errors without a device, the copy
plumbing against a host-memory stand-in for cuda-python, and real round trips on a GPU."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest
import torch

from flash_rt.core import cuda_buffer
from flash_rt.core.cuda_buffer import CudaBuffer, PinnedHostBuffer, host_decode, host_encode, resolve_dtype
from flash_rt.errors import ConfigError, HardwareError, InputError


def _cuda_python_sees_a_device() -> bool:
    try:
        from cuda.bindings import runtime
    except ImportError:
        return False
    err, count = runtime.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


HAS_DEVICE = _cuda_python_sees_a_device()
gpu = pytest.mark.skipif(not HAS_DEVICE, reason="needs a CUDA device visible to cuda-python")


# -- dtypes and host conversions ----------------------------------------------------------------


@pytest.mark.parametrize(
    "given, name, itemsize",
    [
        ("bf16", "bfloat16", 2),
        ("bfloat16", "bfloat16", 2),
        ("float8_e4m3fn", "float8_e4m3", 1),
        ("fp8", "float8_e4m3", 1),
        ("fp16", "float16", 2),
        (np.float32, "float32", 4),
        (np.dtype("int64"), "int64", 8),
        (torch.bfloat16, "bfloat16", 2),
        (torch.float8_e4m3fn, "float8_e4m3", 1),
        (torch.int32, "int32", 4),
    ],
)
def test_resolve_dtype(given, name, itemsize):
    dt = resolve_dtype(given)
    assert (dt.name, dt.itemsize) == (name, itemsize)


def test_unknown_dtype_lists_accepted():
    with pytest.raises(ConfigError, match="expected one of .*bfloat16.*float8_e4m3"):
        resolve_dtype("complex64")


def test_bf16_encoding_matches_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 4096),
        np.array([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -3.4e38, np.inf, -np.inf], dtype=np.float32),
    ])
    bits = host_encode(values, "bfloat16")
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected)  # includes the two round-to-even ties
    np.testing.assert_array_equal(host_decode(bits, "bfloat16"), torch.from_numpy(values).to(torch.bfloat16).float())
    nan_bits = host_encode(np.array([np.nan], dtype=np.float32), "bf16")
    assert np.isnan(host_decode(nan_bits, "bf16")).all()


def test_fp8_encoding_matches_torch():
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.standard_normal(4096).astype(np.float32) * 2.0 ** rng.integers(-12, 9, 4096),
        np.array([0.0, 448.0, -448.0, 1000.0, -1e9, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 1.0625, 1.1875],
                 dtype=np.float32),
    ])
    bits = host_encode(values, "float8_e4m3")
    expected = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(bits, expected)
    np.testing.assert_array_equal(host_decode(bits, "fp8"), torch.from_numpy(values).to(torch.float8_e4m3fn).float())
    assert np.isnan(host_decode(host_encode(np.array([np.nan]), "fp8"), "fp8")).all()


def test_raw_bits_pass_through():
    bits = np.array([0x3F80, 0xC000], dtype=np.uint16)
    np.testing.assert_array_equal(host_encode(bits, "bf16"), bits)
    np.testing.assert_array_equal(host_decode(bits, "bf16"), [1.0, -2.0])


# -- import and no-device behaviour -------------------------------------------------------------


def test_import_touches_no_cuda():
    code = (
        "import sys, flash_rt.core.cuda_buffer, flash_rt.core.cuda_graph; "
        "bad = [m for m in ('torch', 'cuda.bindings.runtime', 'cuda.cudart') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(HAS_DEVICE, reason="checks the no-device error")
@pytest.mark.parametrize("make", [
    lambda: CudaBuffer.empty((4, 4), "bf16"),
    lambda: CudaBuffer.zeros(8),
    lambda: CudaBuffer.from_numpy(np.ones(3, dtype=np.float32)),
    lambda: PinnedHostBuffer(16),
])
def test_no_device_is_a_hardware_error(make):
    with pytest.raises(HardwareError, match="no usable CUDA device.*cudaGetDeviceCount.*hardware='cpu'"):
        make()


def test_from_torch_rejects_cpu_tensors():
    with pytest.raises(InputError, match="needs a CUDA tensor"):
        CudaBuffer.from_torch(torch.ones(3))


# -- the copy plumbing on a host-memory stand-in for cuda.bindings.runtime -------------------------


class HostRuntime:
    """Implements the cuda-python calls CudaBuffer makes, on host memory, with real error enums."""

    def __init__(self, real):
        self.real = real
        self.cudaError_t, self.cudaMemcpyKind = real.cudaError_t, real.cudaMemcpyKind
        self.cudaHostAllocDefault, self.cudaEventDisableTiming = 0, 2
        self.cudaGetErrorName, self.cudaGetErrorString = real.cudaGetErrorName, real.cudaGetErrorString
        self.memory, self.log = {}, []
        self.fail = {}

    def _ok(self, name, *values):
        self.log.append(name)
        if name in self.fail:
            return (self.fail[name],) + tuple(None for _ in values)
        return (self.cudaError_t.cudaSuccess,) + values

    def cudaGetDeviceCount(self):
        return self._ok("cudaGetDeviceCount", 1)

    def cudaGetDevice(self):
        return self._ok("cudaGetDevice", 0)

    def cudaSetDevice(self, device):
        return self._ok("cudaSetDevice")

    def _alloc(self, name, nbytes):
        block = ctypes.create_string_buffer(b"\xab" * nbytes, nbytes)  # dirty, like fresh device memory
        ptr = ctypes.addressof(block)
        self.memory[ptr] = block
        return self._ok(name, ptr)

    def cudaMalloc(self, nbytes):
        return self._alloc("cudaMalloc", nbytes)

    def cudaHostAlloc(self, nbytes, flags):
        return self._alloc("cudaHostAlloc", nbytes)

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return self._ok("cudaFree")

    cudaFreeHost = cudaFree

    def cudaMemcpy(self, dst, src, nbytes, kind):
        ctypes.memmove(dst, src, nbytes)
        return self._ok(f"cudaMemcpy:{kind.name}")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return self._ok(f"cudaMemcpyAsync:{kind.name}:{stream}")

    def cudaMemset(self, ptr, value, nbytes):
        ctypes.memset(ptr, value, nbytes)
        return self._ok("cudaMemset")

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        ctypes.memset(ptr, value, nbytes)
        return self._ok("cudaMemsetAsync")

    def cudaStreamSynchronize(self, stream):
        return self._ok("cudaStreamSynchronize")

    def cudaEventCreateWithFlags(self, flags):
        return self._ok("cudaEventCreateWithFlags", object())

    def cudaEventRecord(self, event, stream):
        return self._ok("cudaEventRecord")

    def cudaEventSynchronize(self, event):
        return self._ok("cudaEventSynchronize")

    def cudaEventDestroy(self, event):
        return self._ok("cudaEventDestroy")


@pytest.fixture
def host_rt(monkeypatch):
    from cuda.bindings import runtime as real

    fake = HostRuntime(real)
    monkeypatch.setattr(cuda_buffer, "_rt", lambda: fake)
    monkeypatch.setattr(cuda_buffer, "_device_count", None)
    return fake


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "uint8", "bfloat16", "float8_e4m3"])
def test_round_trip_plumbing(host_rt, dtype):
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((3, 5, 7)) * 4).astype(np.float32)
    if dtype in ("int32", "uint8"):
        values = rng.integers(0, 200, (3, 5, 7)).astype(dtype)
    with CudaBuffer.from_numpy(values, dtype=dtype) as buf:
        assert buf.shape == (3, 5, 7) and buf.nbytes == 105 * resolve_dtype(dtype).itemsize
        out = buf.to_numpy()
        expected = host_decode(host_encode(values, dtype), dtype)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(buf.to_numpy(raw=True), host_encode(values, dtype))
    assert not host_rt.memory  # freed


def test_async_copy_goes_through_pinned_staging(host_rt):
    rng = np.random.default_rng(3)
    buf = CudaBuffer.empty((16, 4), "bf16")
    for _ in range(3):
        values = rng.standard_normal((16, 4)).astype(np.float32)
        buf.copy_from_numpy(values, stream=7)
        np.testing.assert_array_equal(buf.to_numpy(stream=7), host_decode(host_encode(values, "bf16"), "bf16"))
    assert host_rt.log.count("cudaHostAlloc") == 1  # one staging buffer, reused
    assert host_rt.log.count("cudaEventSynchronize") == 2  # waited before each reuse
    assert "cudaMemcpyAsync:cudaMemcpyHostToDevice:7" in host_rt.log
    with pytest.raises(InputError, match="does not fit buffer"):
        buf.copy_from_numpy(np.ones((4, 4), dtype=np.float32))
    buf.free()
    assert not host_rt.memory and buf.__repr__().endswith("freed)")
    with pytest.raises(ConfigError, match="freed"):
        _ = buf.ptr


def test_pinned_buffer_and_views(host_rt):
    with PinnedHostBuffer((2, 3), "float32") as pinned:
        host = pinned.numpy()
        host[:] = np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5
        dev = CudaBuffer.empty((2, 3), "float32")
        dev.copy_from_host(pinned)
        flat = dev.view((6,))
        np.testing.assert_array_equal(flat.to_numpy(), np.arange(6) + 0.5)
        assert flat.ptr == dev.ptr
        copy = CudaBuffer.zeros(6, "float32")
        copy.copy_from(flat)
        np.testing.assert_array_equal(copy.to_numpy(), np.arange(6) + 0.5)
        copy.fill_zero()
        np.testing.assert_array_equal(copy.to_numpy(), np.zeros(6))
        with pytest.raises(InputError, match="view"):
            dev.view((5,))
        cai = dev.__cuda_array_interface__
        assert cai["shape"] == (2, 3) and cai["typestr"] == "<f4" and cai["data"] == (dev.ptr, False)
    assert not hasattr(CudaBuffer.empty(2, "bf16"), "__cuda_array_interface__")


def test_cuda_errors_carry_the_error_string(host_rt):
    host_rt.fail["cudaMalloc"] = host_rt.cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(HardwareError, match=r"cudaMalloc\(64 bytes\) failed with cudaErrorMemoryAllocation: out of memory"):
        CudaBuffer.empty(16, "float32")


def test_device_out_of_range(host_rt):
    with pytest.raises(HardwareError, match="device 3 requested, but there are 1"):
        CudaBuffer.empty(4, device=3)


# -- on a GPU -----------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "uint8", "bfloat16", "float8_e4m3"])
def test_gpu_round_trip(dtype):
    rng = np.random.default_rng(4)
    values = (rng.standard_normal((37, 129)) * 3).astype(np.float32)
    if dtype in ("int32", "uint8"):
        values = rng.integers(0, 250, values.shape).astype(dtype)
    expected = host_decode(host_encode(values, dtype), dtype)
    with CudaBuffer.from_numpy(values, dtype=dtype) as buf:
        np.testing.assert_array_equal(buf.to_numpy(), expected)
        # async path, several times through the same staging buffer, on a private stream
        from cuda.bindings import runtime as rt

        _, stream = rt.cudaStreamCreate()
        for _ in range(3):
            values = (rng.standard_normal((37, 129)) * 3).astype(np.float32)
            if dtype in ("int32", "uint8"):
                values = rng.integers(0, 250, values.shape).astype(dtype)
            buf.fill_zero(stream)
            buf.copy_from_numpy(values, stream=stream)
            np.testing.assert_array_equal(buf.to_numpy(stream=stream), host_decode(host_encode(values, dtype), dtype))
        rt.cudaStreamDestroy(stream)


@gpu
@pytest.mark.gpu
def test_gpu_torch_interop():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    t = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
    buf = CudaBuffer.from_torch(t)
    assert buf.ptr == t.data_ptr() and buf.dtype.name == "bfloat16" and buf.shape == (8, 16)
    np.testing.assert_array_equal(buf.to_numpy(), t.float().cpu().numpy())
    own = CudaBuffer.from_numpy(np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32), dtype="bf16")
    view = own.torch()
    assert view.dtype == torch.bfloat16 and view.shape == (4, 6) and view.data_ptr() == own.ptr
    view.mul_(2)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(own.to_numpy(), view.float().cpu().numpy())
    fp8 = CudaBuffer.from_numpy(np.linspace(-3, 3, 12, dtype=np.float32), dtype="fp8")
    assert fp8.torch().dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(fp8.torch().float().cpu().numpy(), fp8.to_numpy())


@gpu
@pytest.mark.gpu
def test_gpu_pinned_copy_and_bad_device():
    rng = np.random.default_rng(6)
    with PinnedHostBuffer((64,), "float32") as pinned, CudaBuffer.empty(64, "float32") as dev:
        pinned.numpy()[:] = rng.standard_normal(64)
        dev.copy_from_host(pinned)
        np.testing.assert_array_equal(dev.to_numpy(), pinned.numpy())
    with pytest.raises(HardwareError, match="requested, but there are"):
        CudaBuffer.empty(4, device=64)
