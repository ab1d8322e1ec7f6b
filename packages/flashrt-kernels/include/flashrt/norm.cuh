// RMSNorm / LayerNorm over the last dimension, one block per row, with the fusions the Pi0 family
// needs in one pass over memory:
//   residual-add (optionally gated:  residual += x * gate) before the norm,
//   Gemma's (offset + w) weight, LayerNorm bias, adaRMS modulation  y * (1 + scale) + shift,
//   bf16 or FP8 E4M3 output (x / out_scale, saturated).
// All arithmetic is fp32; a residual written back is rounded to bf16 and the norm is taken of the
// rounded value, so the output matches a framework that stores the residual stream in bf16.
#pragma once

#include "flashrt/common.cuh"

namespace flashrt {

struct NormParams {
  const __nv_bfloat16* x = nullptr;      // [rows, hidden]
  __nv_bfloat16* residual = nullptr;     // [rows, hidden] or null; updated in place when set
  const __nv_bfloat16* gate = nullptr;   // [hidden] or null: residual += x * gate
  const __nv_bfloat16* weight = nullptr; // [hidden] or null
  float weight_offset = 0.0f;            // 1.0 for Gemma's (1 + w)
  const __nv_bfloat16* bias = nullptr;   // [hidden] or null (LayerNorm)
  const __nv_bfloat16* mod_scale = nullptr;  // [hidden] or null: y * (1 + mod_scale)
  const __nv_bfloat16* mod_shift = nullptr;  // [hidden] or null: + mod_shift
  void* out = nullptr;                   // bf16 [rows, hidden], or E4M3 when out_scale is set
  const float* out_scale = nullptr;      // device scalar or null
  int64_t rows = 0;
  int hidden = 0;
  float eps = 1e-6f;
  // gate / weight / bias / mod_scale / mod_shift do not change while the stream's previous kernels
  // run (prepared at load): they may be read before pdl_wait(). False when an earlier kernel of
  // the same stream computes them.
  bool static_params = true;
};

// The row-independent vectors of one 8-wide slice (bf16 x 8 each; zero where absent).
struct NormConsts {
  uint4 gate, weight, bias, scale, shift;
};

__device__ __forceinline__ NormConsts load_norm_consts(const NormParams& p, int idx) {
  NormConsts c{};
  const int64_t off = int64_t(idx) * 8;
  if (p.gate) c.gate = *reinterpret_cast<const uint4*>(p.gate + off);
  if (p.weight) c.weight = *reinterpret_cast<const uint4*>(p.weight + off);
  if (p.bias) c.bias = *reinterpret_cast<const uint4*>(p.bias + off);
  if (p.mod_scale) c.scale = *reinterpret_cast<const uint4*>(p.mod_scale + off);
  if (p.mod_shift) c.shift = *reinterpret_cast<const uint4*>(p.mod_shift + off);
  return c;
}

template <int VPT, bool LAYERNORM>
__global__ void __launch_bounds__(1024) norm_kernel(NormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = p.hidden / 8;
  const int64_t base = row * p.hidden;
  // With one slice per thread (hidden <= 4096: every Pi0 / SigLIP norm) the parameter vectors are
  // loaded up front, static ones before pdl_wait() while the previous kernel still runs: one memory
  // round trip fewer after it. Wider rows load them where used (registers are capped at 64 here).
  constexpr bool kPrefetch = VPT == 1;
  NormConsts pre{};
  if constexpr (kPrefetch) {
    if (p.static_params && int(threadIdx.x) < nvec) pre = load_norm_consts(p, threadIdx.x);
  }
  pdl_wait();
  if constexpr (kPrefetch) {
    if (!p.static_params && int(threadIdx.x) < nvec) pre = load_norm_consts(p, threadIdx.x);
  }

  float v[VPT][8];
  float local = 0.0f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
#pragma unroll
    for (int e = 0; e < 8; ++e) v[i][e] = 0.0f;
    if (idx < nvec) {
      const int64_t off = base + int64_t(idx) * 8;
      unpack_bf16x8(*reinterpret_cast<const uint4*>(p.x + off), v[i]);
      if (p.residual) {
        float r[8];
        unpack_bf16x8(*reinterpret_cast<const uint4*>(p.residual + off), r);
        if (p.gate) {
          float g[8];
          unpack_bf16x8(kPrefetch ? pre.gate : *reinterpret_cast<const uint4*>(p.gate + idx * 8), g);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[i][e] = round_bf16(r[e] + v[i][e] * g[e]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[i][e] = round_bf16(r[e] + v[i][e]);
        }
        *reinterpret_cast<uint4*>(p.residual + off) = pack_bf16x8(v[i]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) local += LAYERNORM ? v[i][e] : v[i][e] * v[i][e];
    }
  }

  float mean = 0.0f, rstd;
  if constexpr (LAYERNORM) {
    mean = block_sum(local, scratch) / float(p.hidden);
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (threadIdx.x + i * blockDim.x < nvec) {
#pragma unroll
        for (int e = 0; e < 8; ++e) sq += (v[i][e] - mean) * (v[i][e] - mean);
      }
    }
    rstd = rsqrtf(block_sum(sq, scratch) / float(p.hidden) + p.eps);
  } else {
    rstd = rsqrtf(block_sum(local, scratch) / float(p.hidden) + p.eps);
  }

#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx >= nvec) continue;
    float y[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = (v[i][e] - mean) * rstd;
    const NormConsts c = kPrefetch ? pre : load_norm_consts(p, idx);
    float t[8];
    if (p.weight) {
      unpack_bf16x8(c.weight, t);
#pragma unroll
      for (int e = 0; e < 8; ++e) y[e] *= t[e] + p.weight_offset;
    }
    if (p.bias) {
      unpack_bf16x8(c.bias, t);
#pragma unroll
      for (int e = 0; e < 8; ++e) y[e] += t[e];
    }
    if (p.mod_scale) {
      unpack_bf16x8(c.scale, t);
#pragma unroll
      for (int e = 0; e < 8; ++e) y[e] *= 1.0f + t[e];
    }
    if (p.mod_shift) {
      unpack_bf16x8(c.shift, t);
#pragma unroll
      for (int e = 0; e < 8; ++e) y[e] += t[e];
    }
    store_out8(p.out, base + int64_t(idx) * 8, y, p.out_scale);
  }
}

// Launcher. hidden % 8 == 0 and hidden <= 32768; pointers 16-byte aligned (8 for FP8 out).
inline cudaError_t norm_launch(const NormParams& p, bool layernorm, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden % 8 != 0 || p.rows > 2147483647LL) return cudaErrorInvalidValue;
  const int nvec = p.hidden / 8;
  int vpt = nvec <= 512 ? 1 : nvec <= 1024 ? 2 : nvec <= 4096 ? 4 : 0;
  if (vpt == 0) return cudaErrorInvalidValue;
  int threads = int(ceil_div(ceil_div(nvec, vpt), 32) * 32);
  const dim3 grid(unsigned(p.rows));
#define FLASHRT_NORM_CASE(V)                                                           \
  if (vpt == V) {                                                                      \
    return layernorm ? launch_kernel(norm_kernel<V, true>, grid, dim3(threads), 0, stream, p)  \
                     : launch_kernel(norm_kernel<V, false>, grid, dim3(threads), 0, stream, p); \
  }
  FLASHRT_NORM_CASE(1)
  FLASHRT_NORM_CASE(2)
  FLASHRT_NORM_CASE(4)
#undef FLASHRT_NORM_CASE
  return cudaErrorInvalidValue;
}

}  // namespace flashrt
