// Skinny GEMM for M <= 64:  Y[M, N] = alpha * X[M, K] @ W[N, K]^T (+ bias[N]) (+ residual[M, N]), bf16 out.
// X and W bf16, or both E4M3 with per-tensor scales (W8A8, sm_89+: half the weight bytes).
//
// Fused epilogues (each saves a kernel per use, and at these sizes a kernel costs more than its work):
// - GeGLU: W's rows are [gate; up] interleaved row by row (gate_0, up_0, gate_1, up_1, ...), so a
//   thread's 4 consecutive outputs hold two (gate, up) pairs; writes gelu_tanh(gate) * up, [M, N / 2],
//   in bf16 or as E4M3 at a static scale (the input of the down projection).
// - RoPE + QKV split + KV-cache write: the q and k heads' rows are ordered (0, D/2, 1, D/2 + 1, ...)
//   within each head, so a thread's 4 outputs are two split-half RoPE pairs; q goes to q_out
//   [M, Hq, D] and k / v to cache rows cache_offset + m, in the natural order (as rope_qkv does).
//
// With 50 rows of X the weight is read once and used 50 times: the kernel is a weight stream, and
// the goal is HBM speed. Why it is built the way it is:
// - Tensor cores with the roles swapped: W rows are the MMA's M side (m16n8k16), X rows its N side,
//   so 50 rows pad to 56/64 instead of 64/128.
// - K is a reduction, so any permutation of k applied to both operands is free: each thread loads
//   16 contiguous bytes of W (and of X) and feeds them straight into its fragment registers, no
//   shared memory staging and no shuffles. A warp's two loads per row cover 128 contiguous bytes.
// - Split-K inside the block (warps interleave 64-wide k chunks) and across a thread-block cluster
//   (sm_90: the partial tiles are summed through distributed shared memory, in a fixed order, so
//   the result is deterministic and needs no workspace). Before sm_90 the cluster split is 1.
#pragma once

#include <cooperative_groups.h>

#include <algorithm>

#include "flashrt/common.cuh"

namespace flashrt {

struct SkinnyGemmParams {
  const void* x = nullptr;                  // [M, K] bf16, or E4M3 when fp8
  const void* w = nullptr;                  // [N, K] bf16, or E4M3 when fp8
  __nv_bfloat16* y = nullptr;               // [M, N]
  const __nv_bfloat16* bias = nullptr;      // [N] or null
  const __nv_bfloat16* residual = nullptr;  // [M, N] or null (may equal y)
  const float* x_scale = nullptr;           // fp8: device scalars (null = 1)
  const float* w_scale = nullptr;
  float alpha = 1.0f;
  int m = 0, n = 0, k = 0;
  bool fp8 = false;                         // W8A8 E4M3 (sm_89+): half the weight bytes
  bool pdl = true;                          // sm_90: stream the weights while the previous kernel ends
  int epilogue = 0;                         // kSkinnyStore / kSkinnyGeglu / kSkinnyRopeQkv
  void* out = nullptr;                      // GeGLU: [M, N / 2] bf16, or E4M3 with out_scale
  const float* out_scale = nullptr;         // GeGLU: device scalar, E4M3 out = value / scale
  // RoPE epilogue: N = (heads_q + 2 heads_kv) * head_dim
  const int32_t* positions = nullptr;       // [M], or null: row m at position cache_offset + m
  __nv_bfloat16* q_out = nullptr;           // [M, heads_q, head_dim]
  __nv_bfloat16* k_cache = nullptr;         // [rows, heads_kv, head_dim]
  __nv_bfloat16* v_cache = nullptr;
  int heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t cache_offset = 0;
  float theta = 10000.0f;
};

constexpr int kSkinnyStore = 0;
constexpr int kSkinnyGeglu = 1;
constexpr int kSkinnyRopeQkv = 2;

namespace skinny {

constexpr int kWarps = 8;        // per block
// A warp step ("chunk") is 128 bytes of k per W row (two 16-byte loads per thread and row):
// 64 bf16 or 128 E4M3 values. The kernel works in bytes, so both dtypes share the code.
constexpr int kChunkBytes = 128;
template <bool FP8>
constexpr int kChunkK = FP8 ? 128 : 64;
constexpr int kMaxSplit = 16;

// Block shape: RG 16-row MMA tiles of W (RG = 4: 64 rows, 2 warps split k; RG = 8: 128 rows, each
// warp all of k). More rows per block = fewer X bytes per W byte (X is re-read by every block).
// X is staged in shared memory one "stage" of k at a time; every W load of a stage is issued
// before the first MMA of that stage: 4 chunks a warp (64 registers a thread) in bf16. On sm_90
// the E4M3 MMA is emulated (E4M3 -> f16 unpacks + f16 MMAs), which costs registers: 2 there.
template <int RG, bool FP8>
struct Shape {
  static constexpr int kRowGroups = RG;
  static constexpr int kKWarps = kWarps / RG;
  static constexpr int kRows = 16 * RG;
  static constexpr int kChunksPerWarp = FP8 ? 2 : 4;
  static constexpr int kStage = kChunksPerWarp * kKWarps;  // chunks per stage
  // X rows in shared memory: stride = stage bytes + 64, so the 8 rows x 4 16-byte columns one
  // quarter-warp reads fall into distinct banks.
  static constexpr int kXStride = kStage * kChunkBytes + 64;
  static constexpr int kPartLd = kRows + 4;  // floats; (2 * kPartLd) % 32 == 8
};

// Shared memory: [X stage | k-warp partials (aliased)] then the receive buffer of the cluster
// reduction (one slice per rank: at most MT * 8 + kMaxSplit rows of kRows + 4 floats).
template <int MT, int RG, bool FP8>
__host__ __device__ constexpr int recv_offset() {
  using S = Shape<RG, FP8>;
  constexpr int x = MT * 8 * S::kXStride;
  constexpr int part = S::kKWarps * MT * 8 * S::kPartLd * 4;
  return x > part ? x : part;
}
template <int MT, int RG, bool FP8>
__host__ __device__ constexpr int smem_bytes() {
  return recv_offset<MT, RG, FP8>() + (MT * 8 + kMaxSplit) * Shape<RG, FP8>::kPartLd * 4;
}

// bf16: m16n8k16; E4M3: m16n8k32. In both, a 32-bit register holds the k-consecutive values a
// thread owns, so 16 contiguous bytes feed two MMAs the same way (see the kernel).
template <bool FP8>
__device__ __forceinline__ void mma_step(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (FP8) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // the launcher refuses FP8 below sm_89
#endif
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 E4M3 bytes -> 8 f16x2 registers (byte pair i -> register i).
__device__ __forceinline__ void e4m3x16_to_f16(const uint4& v, uint32_t (&out)[8]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n"
        " cvt.rn.f16x2.e4m3x2 %1, hi;\n}\n"
        : "=r"(out[2 * i]), "=r"(out[2 * i + 1])
        : "r"(w[i]));
  }
#else
  __trap();
#endif
}

// Programmatic dependent launch (sm_90): wait until the preceding kernel of the stream has
// completed and its writes are visible. A no-op when the kernel was launched without PDL.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel of the stream (if launched with PDL) start its prologue: it still waits
// for this grid's completion before touching anything this grid writes.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Streams W past the SM: no reuse, so keep it out of L1. Volatile, so the compiler keeps a whole
// stage of these where they are written: ahead of griddepcontrol.wait and of the X copies (a
// non-volatile version was sunk below both to save registers, losing the prefetch).
__device__ __forceinline__ uint4 load_stream_or_zero(const uint8_t* p, bool ok) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (ok) {
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  }
  return v;
}

__device__ __forceinline__ void cp_async_16_or_zero(void* smem, const void* gmem, bool ok) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait_group_n() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Waits until at most n groups are pending; n folds to a constant in unrolled loops.
__device__ __forceinline__ void cp_async_wait_pending(int n) {
  switch (n) {
    case 0: cp_async_wait_group_n<0>(); break;
    case 1: cp_async_wait_group_n<1>(); break;
    case 2: cp_async_wait_group_n<2>(); break;
    case 3: cp_async_wait_group_n<3>(); break;
    case 4: cp_async_wait_group_n<4>(); break;
    case 5: cp_async_wait_group_n<5>(); break;
    case 6: cp_async_wait_group_n<6>(); break;
    default: cp_async_wait_group_n<7>(); break;
  }
}

__device__ __forceinline__ uint4 lds128(const uint8_t* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// GeGLU epilogue: v = (gate_j, up_j, gate_j+1, up_j+1) of output row m, j = n / 2.
__device__ __forceinline__ void store_geglu(const SkinnyGemmParams& p, int m, int n, const float (&v)[4]) {
  const float o0 = gelu_tanh(v[0]) * v[1], o1 = gelu_tanh(v[2]) * v[3];
  const int64_t idx = int64_t(m) * (p.n / 2) + n / 2;
  if (p.out_scale) {
    const float inv = 1.0f / __ldg(p.out_scale);
    *reinterpret_cast<uint16_t*>(static_cast<uint8_t*>(p.out) + idx) = fp8x2(o0, o1, inv);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + idx) = __floats2bfloat162_rn(o0, o1);
  }
}

// RoPE epilogue: columns n .. n + 3 of output row m (n % 4 == 0). In a q or k head they are the
// pairs (i, i + D/2) and (i + 1, i + 1 + D/2), i = (n % D) / 2; in a v head, 4 consecutive values.
// Angles as rope_qkv computes them (same formula, fp32).
__device__ __forceinline__ void store_rope_qkv(const SkinnyGemmParams& p, int m, int n, const float (&v)[4]) {
  const int d = p.head_dim, half = d / 2;
  const int head = n / d, c = n - head * d;
  const int64_t cache_row = (p.cache_offset + m) * int64_t(p.heads_kv) * d;
  if (head >= p.heads_q + p.heads_kv) {
    __nv_bfloat16* dst = p.v_cache + cache_row + (head - p.heads_q - p.heads_kv) * d + c;
    uint2 raw;
    auto* h2 = reinterpret_cast<__nv_bfloat162*>(&raw);
    h2[0] = __floats2bfloat162_rn(v[0], v[1]);
    h2[1] = __floats2bfloat162_rn(v[2], v[3]);
    *reinterpret_cast<uint2*>(dst) = raw;
    return;
  }
  const int i = c / 2;
  // positions null (the pipeline's case): no dependent load here, at the end of the kernel
  const float pos = float(p.positions ? __ldg(p.positions + m) : p.cache_offset + m);
  const float log2_theta = log2f(p.theta);
  float lo[2], hi[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float sn, cs;
    sincosf(rope_angle(pos, i + e, d, log2_theta), &sn, &cs);
    const float a = v[2 * e], b = v[2 * e + 1];
    lo[e] = a * cs - b * sn;
    hi[e] = b * cs + a * sn;
  }
  __nv_bfloat16* dst = head < p.heads_q ? p.q_out + (int64_t(m) * p.heads_q + head) * d
                                         : p.k_cache + cache_row + (head - p.heads_q) * d;
  *reinterpret_cast<__nv_bfloat162*>(dst + i) = __floats2bfloat162_rn(lo[0], lo[1]);
  *reinterpret_cast<__nv_bfloat162*>(dst + i + half) = __floats2bfloat162_rn(hi[0], hi[1]);
}

// Two blocks per SM keep enough weight bytes in flight; at MT = 8 that register cap (128) spills,
// so the rare M > 56 case runs one block per SM instead.
template <int MT, int RG, bool FP8>
__global__ void __launch_bounds__(kWarps * 32, MT >= 8 ? 1 : 2) skinny_gemm_kernel(SkinnyGemmParams p) {
  using S = Shape<RG, FP8>;
  constexpr int kRowGroups = S::kRowGroups, kKWarps = S::kKWarps, kRows = S::kRows;
  constexpr int kElem = FP8 ? 1 : 2;    // bytes per value
  constexpr int kCols = MT * 8;         // padded X rows handled by this instantiation
  constexpr int kStage = S::kStage;
  constexpr int kChunksPerWarp = S::kChunksPerWarp;
  constexpr int kXStr = S::kXStride;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* xs = smem;                               // [kCols][kXStr] bytes, one stage of X
  float* tile = reinterpret_cast<float*>(smem);     // k-warp partials after the main loop (aliases xs)
  float* recv = reinterpret_cast<float*>(smem + recv_offset<MT, RG, FP8>());  // pushed partials (own region)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int rg = warp % kRowGroups, kw = warp / kRowGroups;
  const int n0 = blockIdx.x * kRows;

  int split = 1, rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  split = int(cluster.num_blocks());
  rank = int(cluster.block_rank());
#endif
  const int k_bytes = p.k * kElem;
  // The next kernel of the stream may launch now: its blocks take the SM room this grid leaves and
  // start their own weight stream (which never depends on us) while we run; everything they read
  // from us waits behind their griddepcontrol.wait, i.e. this grid's completion.
  allow_dependents();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // DSMEM may be written only once every block of the cluster runs: arrive now, wait before the
  // first push (long after, so the wait is free).
  if (split > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
  const int n_chunks = (k_bytes + kChunkBytes - 1) / kChunkBytes;
  const int per_split = (n_chunks + split - 1) / split;
  const int c_begin = rank * per_split;
  const int c_end = min(n_chunks, c_begin + per_split);

  const int row_lo = n0 + rg * 16 + g, row_hi = row_lo + 8;
  const uint8_t* w_bytes = static_cast<const uint8_t*>(p.w);
  const uint8_t* w_lo = w_bytes + int64_t(min(row_lo, p.n - 1)) * k_bytes + q * 16;
  const uint8_t* w_hi = w_bytes + int64_t(min(row_hi, p.n - 1)) * k_bytes + q * 16;
  const bool ok_lo = row_lo < p.n, ok_hi = row_hi < p.n;
  const uint8_t* x_bytes = static_cast<const uint8_t*>(p.x);

  static_assert(kCols * 4 <= kWarps * 32, "one X row per 4 threads");
  float acc[MT][4];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

  bool waited = false;
#pragma unroll 1
  for (int s0 = c_begin; s0 < c_end; s0 += kStage) {
    const int s1 = min(c_end, s0 + kStage);
    // 1. This warp's W bytes of the stage, all in flight at once (chunks s0 + kw + j * kKWarps).
    uint4 a[kChunksPerWarp][2][2];  // [chunk][half][row lo / hi]
#pragma unroll
    for (int j = 0; j < kChunksPerWarp; ++j) {
      const int c = s0 + kw + j * kKWarps;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int off = c * kChunkBytes + h * 64;  // + q * 16 folded into the row pointers
        const bool in = c < s1 && off + q * 16 < k_bytes;
        a[j][h][0] = load_stream_or_zero(w_lo + off, in && ok_lo);
        a[j][h][1] = load_stream_or_zero(w_hi + off, in && ok_hi);
      }
    }
    // 2. X of the stage into shared memory. Weights are constant, so they may be read before the
    // previous kernel in the stream is done (programmatic dependent launch); X only after this.
    if (!waited) {
      grid_dependency_wait();
      waited = true;
    } else {
      __syncthreads();  // every warp is done reading the previous stage
    }
    // One cp.async group per chunk, so the MMAs of the first chunks start while later ones land.
    {
      // Thread t copies X row t / 4, granules 2 (t % 4) and 2 (t % 4) + 1 of every chunk (rows >= m
      // are zero-filled). Set up here, not before the W loads: registers live across those made
      // the compiler sink the W loads below the dependency wait.
      const int x_r = threadIdx.x >> 2, x_g = (threadIdx.x & 3) * 32;
      const bool x_mine = x_r < kCols, x_row_ok = x_r < p.m;
      const uint8_t* x_src = x_bytes + int64_t(min(x_r, p.m - 1)) * k_bytes + x_g;
      uint8_t* x_dst = xs + x_r * kXStr + x_g;
      const uint8_t* src = x_src + s0 * kChunkBytes;
      const int lim = k_bytes - s0 * kChunkBytes - x_g;  // bytes of this row left from src
#pragma unroll
      for (int cc = 0; cc < kStage; ++cc) {
        if (x_mine && s0 + cc < s1) {
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int off = cc * kChunkBytes + u * 16;
            const bool ok = x_row_ok && off < lim;
            cp_async_16_or_zero(x_dst + off, ok ? src + off : x_bytes, ok);
          }
        }
        cp_async_commit();
      }
    }
    // 3. MMAs. bf16: physical k (kk + 0..3) plays logical k (2q, 2q+1, 2q+8, 2q+9) of the first MMA
    // and kk + 4..7 the same of the second. E4M3: kk + 0..7 plays (4q..4q+3, 16+4q..16+4q+3) of the
    // first, kk + 8..15 of the second. A (W) and B (X) use the same map.
#pragma unroll
    for (int j = 0; j < kChunksPerWarp; ++j) {
      const int c = s0 + kw + j * kKWarps;
      cp_async_wait_pending(kStage - kKWarps * (j + 1));  // chunks s0 .. s0 + kKWarps * (j + 1) - 1
      __syncthreads();
      if (c < s1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint8_t* xrow = xs + g * kXStr + (c - s0) * kChunkBytes + h * 64 + q * 16;
          const uint4& lo = a[j][h][0];
          const uint4& hi = a[j][h][1];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
          constexpr bool kUnpack = FP8;
#else
          constexpr bool kUnpack = false;
#endif
          if constexpr (kUnpack) {
            // sm_90 has no E4M3 mma.sync: unpack W once per fragment (not once per n-tile, as the
            // compiler's emulation of the E4M3 MMA would), X per n-tile, and run f16 MMAs (exact:
            // every E4M3 value is an f16 value). Byte pairs map to k the same way in A and B.
            uint32_t wl[8], wh[8];
            e4m3x16_to_f16(lo, wl);
            e4m3x16_to_f16(hi, wh);
#pragma unroll
            for (int t = 0; t < MT; ++t) {
              uint32_t xb[8];
              e4m3x16_to_f16(lds128(xrow + t * 8 * kXStr), xb);
#pragma unroll
              for (int i = 0; i < 4; ++i)
                mma_f16(acc[t], wl[2 * i], wh[2 * i], wl[2 * i + 1], wh[2 * i + 1], xb[2 * i], xb[2 * i + 1]);
            }
          } else {
#pragma unroll
            for (int t = 0; t < MT; ++t) {
              const uint4 b = lds128(xrow + t * 8 * kXStr);
              mma_step<FP8>(acc[t], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
              mma_step<FP8>(acc[t], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
            }
          }
        }
      }
    }
  }
  if (!waited) grid_dependency_wait();  // (blocks without chunks) before any global write

  // Reduction, all in [x row m][W row r] layouts (r fastest, 16-byte vectors along r):
  // 1. each k-warp writes its partial tile to part[kw] (aliases the X stage: sync first);
  // 2. the k-warps are summed in order and each X-row slice is pushed (16-byte DSMEM stores, no
  //    round trip) into recv[rank] of the rank that owns those rows;
  // 3. after one cluster barrier every rank sums recv[0..split) in rank order (deterministic),
  //    applies the epilogue and stores its rows.
  constexpr int kPartLd = S::kPartLd;  // (2 * kPartLd) % 32 == 8: fragment stores conflict-free
  constexpr int kPart = kCols * kPartLd;
  float* part = tile;                         // [kKWarps][kCols][kPartLd]
  // recv: [split][rows per rank][kPartLd], a region of its own, so other ranks may push into it
  // while this block still reads its X stage.
  __syncthreads();
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    float* base = part + kw * kPart + (t * 8 + 2 * q) * kPartLd + rg * 16 + g;
    base[0] = acc[t][0];
    base[kPartLd] = acc[t][1];
    base[8] = acc[t][2];
    base[kPartLd + 8] = acc[t][3];
  }
  __syncthreads();

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
#endif
  const int rows_per_rank = (p.m + split - 1) / split;  // X rows each rank finishes
  constexpr int kVec = kRows / 4;                        // float4 per row
  for (int i = threadIdx.x; i < p.m * kVec; i += kWarps * 32) {
    const int m = i / kVec, v4 = (i - m * kVec) * 4;
    float4 sum = *reinterpret_cast<const float4*>(part + m * kPartLd + v4);
#pragma unroll
    for (int w = 1; w < kKWarps; ++w) {
      const float4 o = *reinterpret_cast<const float4*>(part + w * kPart + m * kPartLd + v4);
      sum.x += o.x; sum.y += o.y; sum.z += o.z; sum.w += o.w;
    }
    const int owner = m / rows_per_rank;
    float* dst = recv + (rank * rows_per_rank + (m - owner * rows_per_rank)) * kPartLd + v4;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (split > 1) dst = cluster.map_shared_rank(dst, owner);
#endif
    *reinterpret_cast<float4*>(dst) = sum;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) {
    cluster.sync();  // every push has landed
  } else {
    __syncthreads();
  }
#else
  __syncthreads();
#endif

  float alpha = p.alpha;
  if (FP8) {
    if (p.x_scale) alpha *= __ldg(p.x_scale);
    if (p.w_scale) alpha *= __ldg(p.w_scale);
  }
  const int m_lo = rank * rows_per_rank, m_hi = min(p.m, m_lo + rows_per_rank);
  const bool vec_ok = (p.n & 3) == 0;
  for (int i = threadIdx.x; i < (m_hi - m_lo) * kVec; i += kWarps * 32) {
    const int ml = i / kVec, v4 = (i - ml * kVec) * 4;
    const int m = m_lo + ml, n = n0 + v4;
    if (n >= p.n) continue;
    float4 sum = *reinterpret_cast<const float4*>(recv + ml * kPartLd + v4);
    for (int s = 1; s < split; ++s) {
      const float4 o = *reinterpret_cast<const float4*>(recv + (s * rows_per_rank + ml) * kPartLd + v4);
      sum.x += o.x; sum.y += o.y; sum.z += o.z; sum.w += o.w;
    }
    float v[4] = {sum.x * alpha, sum.y * alpha, sum.z * alpha, sum.w * alpha};
    if (p.epilogue != kSkinnyStore) {  // n % 4 == 0 and no residual (checked by the launcher)
      if (p.bias) {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] += __bfloat162float(p.bias[n + j]);
      }
      if (p.epilogue == kSkinnyGeglu) {
        store_geglu(p, m, n, v);
      } else {
        store_rope_qkv(p, m, n, v);
      }
      continue;
    }
    const int64_t o = int64_t(m) * p.n + n;
    if (vec_ok && n + 3 < p.n) {
      if (p.bias) {
        const uint2 braw = *reinterpret_cast<const uint2*>(p.bias + n);
        const auto* bh = reinterpret_cast<const __nv_bfloat162*>(&braw);
        const float2 b0 = __bfloat1622float2(bh[0]), b1 = __bfloat1622float2(bh[1]);
        v[0] += b0.x; v[1] += b0.y; v[2] += b1.x; v[3] += b1.y;
      }
      if (p.residual) {
        const uint2 rraw = *reinterpret_cast<const uint2*>(p.residual + o);
        const auto* rh = reinterpret_cast<const __nv_bfloat162*>(&rraw);
        const float2 r0 = __bfloat1622float2(rh[0]), r1 = __bfloat1622float2(rh[1]);
        v[0] += r0.x; v[1] += r0.y; v[2] += r1.x; v[3] += r1.y;
      }
      uint2 out;
      auto* oh = reinterpret_cast<__nv_bfloat162*>(&out);
      oh[0] = __floats2bfloat162_rn(v[0], v[1]);
      oh[1] = __floats2bfloat162_rn(v[2], v[3]);
      *reinterpret_cast<uint2*>(p.y + o) = out;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (n + j >= p.n) break;
        float x = v[j];
        if (p.bias) x += __bfloat162float(p.bias[n + j]);
        if (p.residual) x += __bfloat162float(p.residual[o + j]);
        p.y[o + j] = __float2bfloat16_rn(x);
      }
    }
  }
}

}  // namespace skinny

// Cluster split along K: about one block per SM (each with a whole stage of W in flight), at
// least one chunk per warp.
inline int skinny_gemm_split(int n, int k, bool fp8, int num_sms, bool clusters_ok, int rows) {
  if (!clusters_ok) return 1;
  const int row_blocks = int(ceil_div(n, rows));
  const int k_warps = skinny::kWarps * 16 / rows;
  const int n_chunks = int(ceil_div(k, fp8 ? skinny::kChunkK<true> : skinny::kChunkK<false>));
  int limit = std::min({skinny::kMaxSplit, std::max(1, num_sms / std::max(1, row_blocks)),
                        std::max(1, n_chunks / k_warps)});
  int split = 1;
  while (split * 2 <= limit) split *= 2;
  return split;
}

template <int MT, int RG, bool FP8>
inline cudaError_t skinny_gemm_launch_mt(const SkinnyGemmParams& p, int split, bool pdl, cudaStream_t stream) {
  auto kernel = skinny::skinny_gemm_kernel<MT, RG, FP8>;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(ceil_div(p.n, 16 * RG)), unsigned(split), 1);
  cfg.blockDim = dim3(skinny::kWarps * 32, 1, 1);
  constexpr int kSmem = skinny::smem_bytes<MT, RG, FP8>();
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n_attr = 0;
  if (split > 1) {
    attr[n_attr].id = cudaLaunchAttributeClusterDimension;
    attr[n_attr].val.clusterDim.x = 1;
    attr[n_attr].val.clusterDim.y = unsigned(split);
    attr[n_attr].val.clusterDim.z = 1;
    ++n_attr;
  }
  if (pdl) {
    attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n_attr].val.programmaticStreamSerializationAllowed = 1;
    ++n_attr;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n_attr;
  static bool smem_set = false;  // function attributes: set once, not on every launch
  if (kSmem > 48 * 1024 && !smem_set) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    smem_set = true;
  }
  static bool non_portable_set = false;
  if (split > 8 && !non_portable_set) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
    non_portable_set = true;
  }
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

struct SkinnyDeviceInfo {
  int num_sms = 0;
  int cc = 0;  // 10 * major + minor
  bool clusters = false;
  int max_cluster = 1;
};

// Device facts, read once per device (cheap lookups afterwards; safe during graph capture).
inline cudaError_t skinny_device_info(SkinnyDeviceInfo* info) {
  static SkinnyDeviceInfo cache[64];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (cache[dev].num_sms == 0) {
    int sms = 0, major = 0, minor = 0;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess) return err;
    SkinnyDeviceInfo d;
    d.num_sms = sms;
    d.cc = 10 * major + minor;
    d.clusters = major >= 9;
    d.max_cluster = 1;
    if (d.clusters) {
      // Largest cluster split the device accepts for this kernel (16 needs the non-portable opt-in).
      d.max_cluster = 8;
      // Probed with the largest variant (one block per SM, the most shared memory).
      auto kernel = skinny::skinny_gemm_kernel<8, 4, false>;
      constexpr int kSmem = skinny::smem_bytes<8, 4, false>();
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess &&
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) == cudaSuccess) {
        cudaLaunchConfig_t cfg = {};
        cfg.dynamicSmemBytes = kSmem;
        cfg.gridDim = dim3(1, 16, 1);
        cfg.blockDim = dim3(skinny::kWarps * 32, 1, 1);
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = 1;
        attr[0].val.clusterDim.y = 16;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        int clusters = 0;
        if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0) d.max_cluster = 16;
      }
      cudaGetLastError();
    }
    cache[dev] = d;
  }
  *info = cache[dev];
  return cudaSuccess;
}

// M in [1, 64]; K % 8 == 0 (bf16) or % 16 == 0 (E4M3, sm_89+); x, w 16-byte aligned.
// split = 0 chooses; otherwise a power of two (> 1 needs sm_90 clusters).
inline cudaError_t skinny_gemm_launch(const SkinnyGemmParams& p, int split, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if (p.m > 64 || p.k <= 0 || p.k % (p.fp8 ? 16 : 8) != 0) return cudaErrorInvalidValue;
  if (p.epilogue == kSkinnyStore) {
    if (!p.y) return cudaErrorInvalidValue;
  } else if (p.epilogue == kSkinnyGeglu) {
    if (p.n % 4 != 0 || p.residual || !p.out) return cudaErrorInvalidValue;
  } else if (p.epilogue == kSkinnyRopeQkv) {
    if (p.residual || !p.q_out || !p.k_cache || !p.v_cache || p.heads_q <= 0 || p.heads_kv <= 0 ||
        p.head_dim <= 0 || p.head_dim % 4 != 0 || p.n != (p.heads_q + 2 * p.heads_kv) * p.head_dim)
      return cudaErrorInvalidValue;
  } else {
    return cudaErrorInvalidValue;
  }
  SkinnyDeviceInfo info;
  cudaError_t err = skinny_device_info(&info);
  if (err != cudaSuccess) return err;
  if (p.fp8 && info.cc < 89) return cudaErrorNotSupported;
  // 64 W rows per block. (128 rows, RG = 8, halves the X traffic but measured no faster on the
  // H100 at the expert's shapes, so it is not instantiated.)
  constexpr int rg = 4;
  if (split <= 0) {
    split = skinny_gemm_split(p.n, p.k, p.fp8, info.num_sms, info.clusters, 16 * rg);
    split = std::min(split, info.max_cluster);
  }
  if (split > 1 && (!info.clusters || split > skinny::kMaxSplit || (split & (split - 1)) != 0))
    return cudaErrorInvalidValue;
  const bool pdl = p.pdl && info.cc >= 90;
  // MT = n-tiles of 8 rows of X: 1, 2, 7 (the action expert's 50 / 51 rows), 8.
  const int mt = p.m <= 8 ? 1 : p.m <= 16 ? 2 : p.m <= 56 ? 7 : 8;
#define FLASHRT_SKINNY_CASE(MT, FP8) \
  if (mt == MT && p.fp8 == FP8) return skinny_gemm_launch_mt<MT, rg, FP8>(p, split, pdl, stream);
  FLASHRT_SKINNY_CASE(1, false) FLASHRT_SKINNY_CASE(2, false) FLASHRT_SKINNY_CASE(7, false)
  FLASHRT_SKINNY_CASE(8, false) FLASHRT_SKINNY_CASE(1, true) FLASHRT_SKINNY_CASE(2, true)
  FLASHRT_SKINNY_CASE(7, true) FLASHRT_SKINNY_CASE(8, true)
#undef FLASHRT_SKINNY_CASE
  return cudaErrorInvalidValue;
}

}  // namespace flashrt
