// Small fp32 linear: out[M, N] (= or +=) x[M, K] . w[N, K] + bias[N], w / bias fp32, x and out
// fp32 or bf16. For the few tiny GEMMs that stay fp32 next to the action state (a flow policy's
// action in / out projections: 50 x 32 -> 1024 and 50 x 1024 -> 32). cuBLAS runs those as split-K
// SGEMMs of 3-4 kernels (~15 us); here they are one kernel each. With accumulate the result is
// added to out in place (the Euler step x_t += dt * v with dt folded into w), which saves the
// separate add.
//
// The weights never depend on an earlier kernel, so each thread holds its slice of w (and bias) in
// registers before pdl_wait(): under PDL that load overlaps the previous kernel, and after the wait
// only x (from L2) stands between the kernel and its result. Plain (coherent) loads: ptxas may sink
// the non-coherent __ldg form below griddepcontrol.wait (see skinny_gemm.cuh). Two shapes of work:
// - K <= 64 (the in-projection): a thread per output column, its w row in registers, a few x rows
//   of the block in shared memory, read as broadcasts;
// - larger K (the out-projection): a warp per output, lanes striding K, up to 1024 values of its w
//   row in registers (32 a lane); K beyond that streams from global.
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

constexpr int kSmallRows = 4;          // column path: x rows per block
constexpr int kSmallColThreads = 128;  // column path: output columns per block
constexpr int kSmallColMaxK = 64;      // column path: the w row held in registers
constexpr int kSmallWarpRegs = 32;     // warp path: w values per lane in registers (K <= 1024)

__device__ __forceinline__ float small_x(const SmallLinearParams& p, int64_t idx) {
  return p.x_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.x)[idx])
                  : static_cast<const float*>(p.x)[idx];
}

__device__ __forceinline__ void small_store(const SmallLinearParams& p, int64_t idx, float v) {
  if (p.out_bf16) {
    __nv_bfloat16* o = static_cast<__nv_bfloat16*>(p.out) + idx;
    *o = __float2bfloat16_rn(p.accumulate ? __bfloat162float(*o) + v : v);
  } else {
    float* o = static_cast<float*>(p.out) + idx;
    *o = p.accumulate ? *o + v : v;
  }
}

// grid (ceil(N / 128), ceil(M / kSmallRows)), 128 threads; K <= kSmallColMaxK.
__global__ void __launch_bounds__(kSmallColThreads) small_linear_cols_kernel(SmallLinearParams p) {
  __shared__ float xs[kSmallRows][kSmallColMaxK];
  const int col = blockIdx.x * kSmallColThreads + threadIdx.x;
  const int row0 = blockIdx.y * kSmallRows;
  const bool own = col < p.n;
  float w[kSmallColMaxK];
  const float* wrow = p.w + int64_t(own ? col : 0) * p.k;
#pragma unroll
  for (int i = 0; i < kSmallColMaxK; ++i) w[i] = (own && i < p.k) ? wrow[i] : 0.0f;
  const float bias = (own && p.bias) ? p.bias[col] : 0.0f;
  pdl_wait();
  for (int e = threadIdx.x; e < kSmallRows * kSmallColMaxK; e += kSmallColThreads) {
    const int r = e / kSmallColMaxK, i = e % kSmallColMaxK;
    xs[r][i] = (row0 + r < p.m && i < p.k) ? small_x(p, int64_t(row0 + r) * p.k + i) : 0.0f;
  }
  __syncthreads();
  if (!own) return;
#pragma unroll
  for (int r = 0; r < kSmallRows; ++r) {
    if (row0 + r >= p.m) break;
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < kSmallColMaxK; ++i) acc += xs[r][i] * w[i];  // w[i] = 0 past K
    small_store(p, int64_t(row0 + r) * p.n + col, acc + bias);
  }
}

// A warp per output, 8 warps a block over consecutive columns of a row. (A warp per column and 4
// rows ran the rows one L2 round trip after another: 6.9 us at 50 x 1024 -> 32, H100.)
__global__ void __launch_bounds__(256) small_linear_warp_kernel(SmallLinearParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t idx = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (idx >= int64_t(p.m) * p.n) return;  // whole warps only: the warp_sum below has all 32 lanes
  const int row = int(idx / p.n), col = int(idx % p.n);
  const float* wrow = p.w + int64_t(col) * p.k;
  float w[kSmallWarpRegs];
#pragma unroll
  for (int j = 0; j < kSmallWarpRegs; ++j) {
    const int i = lane + 32 * j;
    w[j] = i < p.k ? wrow[i] : 0.0f;
  }
  const float bias = p.bias ? p.bias[col] : 0.0f;
  pdl_wait();
  const int64_t xrow = int64_t(row) * p.k;
  const int held = min(p.k, 32 * kSmallWarpRegs);
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < kSmallWarpRegs; ++j) {
    const int i = lane + 32 * j;
    if (i < held) acc += small_x(p, xrow + i) * w[j];
  }
  for (int i = held + lane; i < p.k; i += 32) acc += small_x(p, xrow + i) * __ldg(wrow + i);
  acc = warp_sum(acc);
  if (lane == 0) small_store(p, idx, acc + bias);
}

inline cudaError_t small_linear_launch(const SmallLinearParams& p, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if (p.k <= 0 || !p.x || !p.w || !p.out) return cudaErrorInvalidValue;
  if (p.k <= kSmallColMaxK && ceil_div(p.m, kSmallRows) <= 65535) {  // grid.y's limit; past it, the warp path
    const dim3 grid(unsigned(ceil_div(p.n, kSmallColThreads)), unsigned(ceil_div(p.m, kSmallRows)));
    return launch_kernel(small_linear_cols_kernel, grid, dim3(kSmallColThreads), 0, stream, p);
  }
  return launch_kernel(small_linear_warp_kernel, dim3(unsigned(ceil_div(int64_t(p.m) * p.n, 8))), dim3(256), 0,
                       stream, p);
}

}  // namespace flashrt
