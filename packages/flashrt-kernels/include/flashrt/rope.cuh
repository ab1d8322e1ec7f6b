// RoPE fused with the QKV split and the KV-cache write, in one pass over the fused QKV GEMM output.
//   qkv      [T, (Hq + 2 Hkv) * D]   (q heads, then k heads, then v heads)
//   q_out    [T, Hq, D]              rotated (and multiplied by q_scale); rows q_row_stride apart, so
//                                    q_out may be the q part of qkv itself (rotation in place)
//   k_cache  [rows, Hkv, D]          row cache_offset + t <- rotated k
//   v_cache  [rows, Hkv, D]          row cache_offset + t <- v
//   positions [T] int32, or null: token t at position cache_offset + t (no load)
// Split-half rotation as in Gemma / openpi: for i < D/2, with x1 = x[i], x2 = x[i + D/2],
//   timescale_i = theta ** (2 i / D), angle = position / timescale_i (fp32),
//   out[i] = x1 cos - x2 sin,  out[i + D/2] = x2 cos + x1 sin.
#pragma once

#include <algorithm>

#include "flashrt/common.cuh"

namespace flashrt {

struct RopeQkvParams {
  const __nv_bfloat16* qkv = nullptr;
  const int32_t* positions = nullptr;  // [T], or null: position cache_offset + t
  __nv_bfloat16* q_out = nullptr;
  __nv_bfloat16* k_cache = nullptr;
  __nv_bfloat16* v_cache = nullptr;
  int tokens = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t cache_offset = 0;  // in tokens
  int64_t q_row_stride = 0;  // elements between q_out rows; 0 = Hq * D (contiguous)
  float theta = 10000.0f;
  float q_scale = 1.0f;
};

template <int VEC>
__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float (&v)[VEC]) {
  if constexpr (VEC == 8) {  // 16-byte aligned: head_dim % 16 == 0 whenever VEC is 8
    unpack_bf16x8(*reinterpret_cast<const uint4*>(p), v);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; e += 2) {
      float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p + e));
      v[e] = f.x;
      v[e + 1] = f.y;
    }
  }
}

template <int VEC>
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    *reinterpret_cast<uint4*>(p) = pack_bf16x8(v);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; e += 2)
      *reinterpret_cast<__nv_bfloat162*>(p + e) = __floats2bfloat162_rn(v[e], v[e + 1]);
  }
}

// One block per token; each thread item is VEC pairs (i, i + D/2) of one head. The angles depend
// only on the position, so the block computes each pair's sin / cos once (not once per head) into
// shared memory, and before the wait: the trigonometry overlaps the previous kernel.
template <int VEC>
__global__ void rope_qkv_kernel(RopeQkvParams p) {
  extern __shared__ float trig[];  // [D/2] sin, then [D/2] cos
  const int t = blockIdx.x;
  const int half = p.head_dim / 2, items_per_head = half / VEC;
  // positions are not written by earlier kernels: read before the wait
  const float pos = float(p.positions ? __ldg(p.positions + t) : p.cache_offset + t);
  const float log2_theta = log2f(p.theta);
  for (int i = threadIdx.x; i < half; i += blockDim.x)
    sincosf(rope_angle(pos, i, p.head_dim, log2_theta), &trig[i], &trig[half + i]);
  __syncthreads();
  pdl_wait();
  const int heads = p.heads_q + 2 * p.heads_kv;
  const __nv_bfloat16* src_row = p.qkv + int64_t(t) * heads * p.head_dim;
  const int64_t cache_row = (p.cache_offset + t) * int64_t(p.heads_kv) * p.head_dim;

  for (int item = threadIdx.x; item < heads * items_per_head; item += blockDim.x) {
    const int h = item / items_per_head, i0 = (item - h * items_per_head) * VEC;
    const __nv_bfloat16* src = src_row + h * p.head_dim + i0;
    float x1[VEC], x2[VEC];
    load_vec<VEC>(src, x1);
    load_vec<VEC>(src + half, x2);
    __nv_bfloat16* dst;
    if (h >= p.heads_q + p.heads_kv) {  // v: copied as is
      dst = p.v_cache + cache_row + (h - p.heads_q - p.heads_kv) * p.head_dim + i0;
    } else {
      const float out_scale = h < p.heads_q ? p.q_scale : 1.0f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float s = trig[i0 + e], c = trig[half + i0 + e];
        const float a = x1[e], b = x2[e];
        x1[e] = (a * c - b * s) * out_scale;
        x2[e] = (b * c + a * s) * out_scale;
      }
      const int64_t q_stride = p.q_row_stride ? p.q_row_stride : int64_t(p.heads_q) * p.head_dim;
      dst = h < p.heads_q ? p.q_out + int64_t(t) * q_stride + h * p.head_dim + i0
                          : p.k_cache + cache_row + (h - p.heads_q) * p.head_dim + i0;
    }
    store_vec<VEC>(dst, x1);
    store_vec<VEC>(dst + half, x2);
  }
}

// head_dim even and >= 4; pointers 4-byte aligned (wider vectors are used when D/2 allows).
// A thread per item up to 256 (Gemma's 8 + 2 heads of 256: 160 threads, one item each).
inline cudaError_t rope_qkv_launch(const RopeQkvParams& p, cudaStream_t stream) {
  if (p.tokens <= 0) return cudaSuccess;
  if (p.head_dim < 4 || p.head_dim % 4 != 0 || p.heads_q <= 0 || p.heads_kv <= 0) return cudaErrorInvalidValue;
  const int half = p.head_dim / 2;
  const int vec = half % 8 == 0 ? 8 : half % 4 == 0 ? 4 : 2;
  const int64_t items = int64_t(p.heads_q + 2 * p.heads_kv) * (half / vec);
  const int threads = int(std::min<int64_t>(256, ceil_div(items, 32) * 32));
  const dim3 grid(unsigned(p.tokens)), block(threads);
  const size_t smem = size_t(p.head_dim) * sizeof(float);
  if (vec == 8) return launch_kernel(rope_qkv_kernel<8>, grid, block, smem, stream, p);
  if (vec == 4) return launch_kernel(rope_qkv_kernel<4>, grid, block, smem, stream, p);
  return launch_kernel(rope_qkv_kernel<2>, grid, block, smem, stream, p);
}

}  // namespace flashrt
