// Elementwise activations with their fusions: bias + activation (a GEMM epilogue done as one pass),
// and GeGLU over a fused gate|up GEMM output. bf16 in; bf16 or FP8 E4M3 out; fp32 math.
#pragma once

#include <algorithm>

#include "flashrt/common.cuh"

namespace flashrt {

enum class Activation : int { kNone = 0, kGeluTanh = 1, kSilu = 2, kRelu = 3 };

__device__ __forceinline__ float activate(float x, Activation act) {
  switch (act) {
    case Activation::kGeluTanh: return gelu_tanh(x);
    case Activation::kSilu: return x / (1.0f + __expf(-x));
    case Activation::kRelu: return fmaxf(x, 0.0f);
    default: return x;
  }
}

// out[r, c] = act(x[r, c] + bias[c]); bias may be null. cols % 8 == 0.
__global__ void bias_act_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ bias,
                                void* __restrict__ out, int64_t rows, int64_t cols, Activation act,
                                const float* __restrict__ out_scale) {
  pdl_wait();
  const int64_t vec_per_row = cols / 8, n_vec = rows * vec_per_row;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < n_vec;
       v += int64_t(gridDim.x) * blockDim.x) {
    float a[8];
    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(x) + v), a);
    if (bias) {
      float b[8];
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(bias) + v % vec_per_row), b);
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] += b[e];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = activate(a[e], act);
    store_out8(out, v * 8, a, out_scale);
  }
}

// out[r, j] = gelu_tanh(gate_up[r, j]) * gate_up[r, inter + j]. inter % 8 == 0.
// interleaved: the row is (gate_0, up_0, gate_1, up_1, ...) instead (the expert's gate/up GEMM with
// its weight rows ordered for the fused skinny-GEMM epilogue, when cuBLASLt runs that GEMM instead).
__global__ void geglu_kernel(const __nv_bfloat16* __restrict__ gate_up, void* __restrict__ out,
                             int64_t rows, int64_t inter, const float* __restrict__ out_scale, bool interleaved) {
  pdl_wait();
  const int64_t vec_per_row = inter / 8, n_vec = rows * vec_per_row;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < n_vec;
       v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = v / vec_per_row, j = v - r * vec_per_row;
    float g[8], u[8];
    if (interleaved) {
      const __nv_bfloat16* src = gate_up + r * 2 * inter + j * 16;
      float a[8], b[8];
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(src)), a);
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(src + 8)), b);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        g[e] = a[2 * e], u[e] = a[2 * e + 1];
        g[e + 4] = b[2 * e], u[e + 4] = b[2 * e + 1];
      }
    } else {
      const __nv_bfloat16* src = gate_up + r * 2 * inter + j * 8;
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(src)), g);
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(src + inter)), u);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) g[e] = gelu_tanh(g[e]) * u[e];
    store_out8(out, v * 8, g, out_scale);
  }
}

inline int elementwise_grid(int64_t n_vec, int threads) {
  // Enough blocks to fill any current GPU several times; the kernels stride over the rest.
  return int(std::min<int64_t>(ceil_div(n_vec, threads), 132 * 16));
}

inline cudaError_t bias_act_launch(const __nv_bfloat16* x, const __nv_bfloat16* bias, void* out,
                                   int64_t rows, int64_t cols, Activation act, const float* out_scale,
                                   cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (cols % 8 != 0) return cudaErrorInvalidValue;
  const int threads = 256;
  return launch_kernel(bias_act_kernel, dim3(elementwise_grid(rows * cols / 8, threads)), dim3(threads), 0, stream,
                       x, bias, out, rows, cols, act, out_scale);
}

inline cudaError_t geglu_launch(const __nv_bfloat16* gate_up, void* out, int64_t rows, int64_t inter,
                                const float* out_scale, bool interleaved, cudaStream_t stream) {
  if (rows <= 0 || inter <= 0) return cudaSuccess;
  if (inter % 8 != 0) return cudaErrorInvalidValue;
  const int threads = 256;
  return launch_kernel(geglu_kernel, dim3(elementwise_grid(rows * inter / 8, threads)), dim3(threads), 0, stream,
                       gate_up, out, rows, inter, out_scale, interleaved);
}

}  // namespace flashrt
