// Small fp32 linear: out[M, N] (= or +=) x[M, K] . w[N, K] + bias[N], w / bias fp32, x and out
// fp32 or bf16. For the few tiny GEMMs that stay fp32 next to the action state (a flow policy's
// action in / out projections: 50 x 32 -> 1024 and 50 x 1024 -> 32). cuBLAS runs those as split-K
// SGEMMs of 3-4 kernels (~15 us); here one warp computes one output, lanes striding K, in one
// kernel. With accumulate the result is added to out in place (the Euler step x_t += dt * v with
// dt folded into w), which saves the separate add.
#pragma once

#include "flashrt/common.cuh"

namespace flashrt {

struct SmallLinearParams {
  const void* x = nullptr;     // [M, K], fp32 or bf16
  const float* w = nullptr;    // [N, K]
  const float* bias = nullptr; // [N] or null
  void* out = nullptr;         // [M, N], fp32 or bf16
  int m = 0, n = 0, k = 0;
  bool x_bf16 = false, out_bf16 = false, accumulate = false;
};

__global__ void small_linear_kernel(SmallLinearParams p) {
  pdl_wait();
  const int64_t idx = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (idx >= int64_t(p.m) * p.n) return;
  const int row = int(idx / p.n), col = int(idx % p.n);
  const float* w = p.w + int64_t(col) * p.k;
  float acc = 0.0f;
  if (p.x_bf16) {
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + int64_t(row) * p.k;
    for (int i = lane; i < p.k; i += 32) acc += __bfloat162float(x[i]) * __ldg(w + i);
  } else {
    const float* x = static_cast<const float*>(p.x) + int64_t(row) * p.k;
    for (int i = lane; i < p.k; i += 32) acc += x[i] * __ldg(w + i);
  }
  acc = warp_sum(acc);
  if (lane != 0) return;
  if (p.bias) acc += __ldg(p.bias + col);
  if (p.out_bf16) {
    __nv_bfloat16* o = static_cast<__nv_bfloat16*>(p.out) + idx;
    *o = __float2bfloat16_rn(p.accumulate ? __bfloat162float(*o) + acc : acc);
  } else {
    float* o = static_cast<float*>(p.out) + idx;
    *o = p.accumulate ? *o + acc : acc;
  }
}

inline cudaError_t small_linear_launch(const SmallLinearParams& p, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if (p.k <= 0 || !p.x || !p.w || !p.out) return cudaErrorInvalidValue;
  const int warps = 8;
  const int64_t outputs = int64_t(p.m) * p.n;
  return launch_kernel(small_linear_kernel, dim3(unsigned(ceil_div(outputs, warps))), dim3(32 * warps), 0, stream, p);
}

}  // namespace flashrt
