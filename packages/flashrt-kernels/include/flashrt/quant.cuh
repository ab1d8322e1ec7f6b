// FP8 E4M3 quantisation at a static per-tensor scale (q = sat(x / scale)) and the amax reduction
// that calibration uses to choose that scale.
#pragma once

#include <algorithm>

#include "flashrt/common.cuh"

namespace flashrt {

__global__ void quantize_fp8_kernel(const __nv_bfloat16* __restrict__ x, uint8_t* __restrict__ out,
                                    int64_t n, const float* __restrict__ scale) {
  pdl_wait();
  const float inv = 1.0f / __ldg(scale);
  const int64_t n_vec = n / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t v = tid; v < n_vec; v += stride) {
    float a[8];
    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(x) + v), a);
    reinterpret_cast<uint2*>(out)[v] = pack_fp8x8(a, inv);
  }
  for (int64_t i = n_vec * 8 + tid; i < n; i += stride) out[i] = to_fp8(__bfloat162float(x[i]), inv);
}

// out[0] = max(out[0], max |x|). Non-negative floats order like their bit patterns as ints.
__global__ void amax_kernel(const __nv_bfloat16* __restrict__ x, int64_t n, float* __restrict__ out) {
  pdl_wait();
  __shared__ float scratch[32];
  const int64_t n_vec = n / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  float m = 0.0f;
  for (int64_t v = tid; v < n_vec; v += stride) {
    float a[8];
    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(x) + v), a);
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(a[e]));
  }
  for (int64_t i = n_vec * 8 + tid; i < n; i += stride) m = fmaxf(m, fabsf(__bfloat162float(x[i])));
  m = block_max(m, scratch);
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));
}

inline cudaError_t quantize_fp8_launch(const __nv_bfloat16* x, uint8_t* out, int64_t n, const float* scale,
                                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n / 8 + 1, threads), 132 * 16)));
  return launch_kernel(quantize_fp8_kernel, dim3(blocks), dim3(threads), 0, stream, x, out, n, scale);
}

inline cudaError_t amax_launch(const __nv_bfloat16* x, int64_t n, float* out, bool accumulate,
                               cudaStream_t stream) {
  if (!accumulate) {
    cudaError_t err = cudaMemsetAsync(out, 0, sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  if (n <= 0) return cudaSuccess;
  const int threads = 512;
  const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n / 8 + 1, threads), 132 * 4)));
  return launch_kernel(amax_kernel, dim3(blocks), dim3(threads), 0, stream, x, n, out);
}

}  // namespace flashrt
