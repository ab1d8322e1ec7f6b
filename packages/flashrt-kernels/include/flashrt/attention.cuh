// Attention forward (no dropout), bf16 / fp16 in and out, softmax in fp32, on mma.sync tensor cores.
//   O[b, i, h] = softmax_j(scale * Q[b, i, h] . K[b, j, h / G]) V[b, j, h / G],  G = Hq / Hkv
// masked where mask[b, i, j] == 0 (a key-padding mask is the same with a zero row stride) or j >= Sk.
// Rows whose every key is masked get O = 0 and lse = -inf. With o_scale, O is stored as E4M3 at that
// static scale (the input format of an FP8 output projection: no separate quantisation pass).
//
// Layout: the last dimension is contiguous; batch / row / head strides are in elements (as in the
// FA2-style interface). The G query heads that share a KV head are packed into the rows of one
// tile (row r -> query r / G, head r % G), so MQA with few queries still fills tiles and K/V tiles
// are shared by all of them.
//
// Split-KV: with num_splits > 1 each split handles a contiguous key range and writes an fp32
// partial O and its log-sum-exp; a second kernel combines them (decode-style: few query tiles).
//
// static_keys: keys [0, static_keys) were written before the previous kernel of the stream (a
// denoise step's cached prefix; only its own block is the previous kernel's output). A block whose
// first key tile lies there copies that tile's K and V before griddepcontrol.wait, so the copies
// overlap the previous kernel's tail instead of following it.
//
// Two "halves" of 4 warps per block share the 64 query rows and split the key tiles (half h takes
// tiles h, h + 2, ...): twice the warps per SM on prefix grids of ~100 blocks, with Q loaded once.
// Each half pipelines its own tiles (one K and one V buffer each, its own barrier): V_j loads while
// S = Q K_j^T and the softmax run; K_{j+2} loads while O += P V_j runs. At the end the halves
// swap (m, l) and half of O's columns through shared memory; each merges and stores its half.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "flashrt/common.cuh"

namespace flashrt {

struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  int64_t q_sb = 0, q_sr = 0, q_sh = 0;
  int64_t k_sb = 0, k_sr = 0, k_sh = 0;
  int64_t v_sb = 0, v_sr = 0, v_sh = 0;
  int64_t o_sb = 0, o_sr = 0, o_sh = 0;
  int batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0;
  float scale = 1.0f;
  const uint8_t* mask = nullptr;  // attend where != 0; null: every key < seqlen_k
  int64_t mask_sb = 0, mask_sr = 0;
  float* lse = nullptr;        // [B, Hq, Sq] or null (natural log of the scaled logits' sum-exp)
  float* lse_accum = nullptr;  // [splits, B, Hq, Sq]
  float* o_accum = nullptr;    // [splits, B, Hq, Sq, D]
  const float* o_scale = nullptr;  // non-null: O is written as E4M3 at this scale (O / scale), same strides
  int static_keys = 0;  // keys [0, static_keys) do not depend on the previous kernel (see above)
  int num_splits = 1;
  int keys_per_split = 0;
};

constexpr int kAttnMaxSplits = 16;
constexpr int kAttnBlockM = 64;
constexpr int kAttnHalfThreads = 128;  // 4 warps x 16 rows = kAttnBlockM

namespace attn {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Barrier of one half (4 warps); ids 1 and 2 (0 is __syncthreads).
__device__ __forceinline__ void half_sync(int half) {
  if (half == 0) {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kAttnHalfThreads) : "memory");
  } else {
    asm volatile("bar.sync 2, %0;\n" ::"n"(kAttnHalfThreads) : "memory");
  }
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    r = *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(a, b);
    r = *reinterpret_cast<uint32_t*>(&h);
  }
  return r;
}

template <int D>
struct Shape {
  static constexpr int kDp = (D + 15) / 16 * 16;  // QK^T reduction width (zero-padded in smem)
  static constexpr int kLd = kDp + 8;             // smem row stride: odd multiple of 16 bytes
  static constexpr int kDt = D / 8;               // n-tiles of O
  static constexpr int kChunks = D / 8;           // 16-byte chunks per row
  static constexpr int kBlockN = D > 128 ? 32 : 64;
  template <typename T, int H>
  __host__ __device__ static constexpr size_t smem_bytes() {
    return size_t(kAttnBlockM + 2 * H * kBlockN) * kLd * sizeof(T);  // Q, then K and V of each half
  }
};

// H = 1 or 2 halves (2 where the grid alone leaves SMs short of warps).
template <typename T, int D, int H>
__global__ void __launch_bounds__(H * kAttnHalfThreads) attn_fwd_kernel(AttnParams p) {
  constexpr int kAttnThreads = H * kAttnHalfThreads;
  using S = Shape<D>;
  constexpr int BM = kAttnBlockM, BN = S::kBlockN, LD = S::kLd, DP = S::kDp;
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  const int half = H == 1 ? 0 : threadIdx.x / kAttnHalfThreads;
  T* sK = sQ + BM * LD + half * 2 * BN * LD;
  T* sV = sK + BN * LD;

  const int tid = threadIdx.x % kAttnHalfThreads, lane = tid & 31, warp = tid >> 5;  // within the half
  const int g = lane >> 2, q4 = lane & 3;
  const int group = p.heads_q / p.heads_kv;
  const int rows_total = p.seqlen_q * group;
  const int row0 = blockIdx.x * BM;
  const int b = blockIdx.y / p.heads_kv, kvh = blockIdx.y % p.heads_kv;
  const int split = blockIdx.z;
  const int k_begin = split * p.keys_per_split;
  const int k_end = min(p.seqlen_k, k_begin + p.keys_per_split);
  const int n_tiles_all = k_end > k_begin ? (k_end - k_begin + BN - 1) / BN : 0;
  const int n_tiles = H == 1 ? n_tiles_all : (n_tiles_all - half + 1) / 2;  // tiles half, half + H, ...

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  if constexpr (DP > D) {  // zero the reduction padding once; cp.async never writes it
    for (int i = threadIdx.x; i < (BM + 2 * H * BN) * (DP - D); i += kAttnThreads)
      sQ[(i / (DP - D)) * LD + D + i % (DP - D)] = T(0.0f);
  }

  // K or V rows key0 .. key0 + BN - 1 -> dst, zero past k_end. Same scheme: a fixed chunk per
  // thread, and each further row is one pointer step.
  constexpr int kKvStep = kAttnHalfThreads / S::kChunks;
  auto load_kv = [&](T* dst, const T* src, int64_t row_stride, int key0) {
    if constexpr (kAttnHalfThreads % S::kChunks == 0 && BN % kKvStep == 0) {
      const int ch = tid % S::kChunks, r0 = tid / S::kChunks;
      const T* from = src + int64_t(key0 + r0) * row_stride + ch * 8;
      T* to = dst + r0 * LD + ch * 8;
#pragma unroll
      for (int i = 0; i < BN / kKvStep; ++i) {
        const bool ok = key0 + r0 + i * kKvStep < k_end;
        cp_async_16(to + i * kKvStep * LD, ok ? from + i * kKvStep * row_stride : src, ok);
      }
    } else {
      for (int i = tid; i < BN * S::kChunks; i += kAttnHalfThreads) {
        const int r = i / S::kChunks, ch = i % S::kChunks;
        const bool ok = key0 + r < k_end;
        cp_async_16(dst + r * LD + ch * 8, src + (ok ? key0 + r : 0) * row_stride + ch * 8, ok);
      }
    }
  };
  // This half's first K and V tiles, before the wait where no key in them is the previous kernel's.
  // Only at wide heads (the decode calls: head_dim 256): at d = 32 and 72 the extra path made ptxas spill.
  const bool early = D >= 128 && n_tiles > 0 && k_begin + (half + 1) * BN <= p.static_keys;
  if (early) {
    load_kv(sK, k, p.k_sr, k_begin + half * BN);
    load_kv(sV, v, p.v_sr, k_begin + half * BN);
    cp_async_commit();
  }
  pdl_wait();  // Q (and the keys past static_keys) belong to the previous kernel

  // Q tile -> shared memory. Where the row's 16-byte chunk count divides the thread count, a thread
  // copies one fixed chunk of every kQStep-th row, so a row costs a compare and a multiply-add; the
  // generic index loop (a division per copy to find the row, two more for the packed head) cost
  // ~60 instructions a copy, a quarter of a decode block's instructions.
  auto q_src = [&](int pr, int ch, auto unit_group) -> const T* {
    const int qi = decltype(unit_group)::value ? pr : pr / group;  // group 1: MHA, or MQA folded into rows
    const int h = decltype(unit_group)::value ? kvh : kvh * group + (pr - qi * group);
    return q + b * p.q_sb + qi * p.q_sr + h * p.q_sh + ch * 8;
  };
  constexpr int kQStep = kAttnThreads / S::kChunks;
  if constexpr (kAttnThreads % S::kChunks == 0 && BM % kQStep == 0) {
    auto load_q = [&](auto unit_group) {
      const int ch = threadIdx.x % S::kChunks, r0 = threadIdx.x / S::kChunks;
#pragma unroll
      for (int i = 0; i < BM / kQStep; ++i) {
        const int r = r0 + i * kQStep, pr = row0 + r;
        const bool ok = pr < rows_total;
        cp_async_16(sQ + r * LD + ch * 8, ok ? q_src(pr, ch, unit_group) : q, ok);
      }
    };
    if (group == 1) {
      load_q(std::true_type{});
    } else {
      load_q(std::false_type{});
    }
  } else {
    for (int i = threadIdx.x; i < BM * S::kChunks; i += kAttnThreads) {
      const int r = i / S::kChunks, ch = i % S::kChunks;
      const int pr = row0 + r;
      const bool ok = pr < rows_total;
      cp_async_16(sQ + r * LD + ch * 8, ok ? q_src(pr, ch, std::false_type{}) : q, ok);
    }
  }
  if (n_tiles > 0 && !early) load_kv(sK, k, p.k_sr, k_begin + half * BN);  // in flight with Q: one wait
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();  // Q (loaded by both halves), K_0 and the zeroed padding are visible to all

  // This thread's two rows (g and g + 8 of the warp's 16) and their mask rows.
  const int wrow = warp * 16;
  const int pr_lo = row0 + wrow + g, pr_hi = pr_lo + 8;
  const uint8_t* mrow[2] = {nullptr, nullptr};
  if (p.mask) {
    mrow[0] = p.mask + b * p.mask_sb + int64_t(min(pr_lo, rows_total - 1) / group) * p.mask_sr;
    mrow[1] = p.mask + b * p.mask_sb + int64_t(min(pr_hi, rows_total - 1) / group) * p.mask_sr;
  }

  float acc_o[S::kDt][4];
#pragma unroll
  for (int t = 0; t < S::kDt; ++t) acc_o[t][0] = acc_o[t][1] = acc_o[t][2] = acc_o[t][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const float scale_log2 = p.scale * kLog2e;

  for (int j = 0; j < n_tiles; ++j) {
    const int key0 = k_begin + (H * j + half) * BN;
    cp_async_wait_all();
    half_sync(half);  // K_j landed; every warp of the half is done with V_{j-1}
    if (j > 0 || !early) load_kv(sV, v, p.v_sr, key0);
    cp_async_commit();

    float s[BN / 8][4];
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
      uint32_t a[4];
      ldsm_x4(a, sQ + (wrow + (lane & 15)) * LD + ks * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bk[4];
        ldsm_x4(bk, sK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
        mma16816<T>(s[2 * np], a, bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    // Scale into the log2 domain and mask.
    const bool full = key0 + BN <= k_end && p.mask == nullptr;
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[t][e] * scale_log2;
        if (!full) {
          const int key = key0 + t * 8 + 2 * q4 + (e & 1);
          bool ok = key < k_end;
          if (ok && p.mask) ok = mrow[e >> 1][key] != 0;
          if (!ok) x = -INFINITY;
        }
        s[t][e] = x;
      }
    }

    // Online softmax, rows g (e = 0, 1) and g + 8 (e = 2, 3); a row lives in one quad of lanes.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int t = 0; t < BN / 8; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.0f : mx;  // all masked so far: keep exp2 finite
      const float corr = exp2f(m_run[r] - base);
      m_run[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int t = 0; t < BN / 8; ++t) {
        s[t][2 * r] = exp2f(s[t][2 * r] - base);
        s[t][2 * r + 1] = exp2f(s[t][2 * r + 1] - base);
        sum += s[t][2 * r] + s[t][2 * r + 1];
      }
      l_run[r] = l_run[r] * corr + sum;
      // O is still zero on the first tile (a decode split often has just that one). Only at wide
      // heads: at d = 16 and 72 the branch made ptxas spill.
      if (S::kDt < 16 || j > 0) {
#pragma unroll
        for (int t = 0; t < S::kDt; ++t) {
          acc_o[t][2 * r] *= corr;
          acc_o[t][2 * r + 1] *= corr;
        }
      }
    }

    cp_async_wait_all();
    half_sync(half);  // V_j landed; every warp of the half is done with K_j
    if (j + 1 < n_tiles) load_kv(sK, k, p.k_sr, key0 + H * BN);
    cp_async_commit();

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      // The S accumulators of n-tiles 2kk, 2kk+1 are exactly the A fragment of P for keys 16kk..+15.
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* vrow = sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD;
#pragma unroll
      for (int dp = 0; dp < S::kDt / 2; ++dp) {
        uint32_t bv[4];
        ldsm_x4_t(bv, vrow + dp * 16 + (lane >> 4) * 8);
        mma16816<T>(acc_o[2 * dp], pa, bv[0], bv[1]);
        mma16816<T>(acc_o[2 * dp + 1], pa, bv[2], bv[3]);
      }
      if constexpr (S::kDt % 2 == 1) {
        uint32_t bv[2];
        ldsm_x2_t(bv, vrow + (S::kDt - 1) * 8);
        mma16816<T>(acc_o[S::kDt - 1], pa, bv[0], bv[1]);
      }
    }
  }
  cp_async_wait_all();

  // Merge the halves, and split the epilogue between them: half 0 finishes O's column tiles
  // [0, kLo), half 1 tiles [kLo, kDt). Each writes the tiles it hands over and its (m, l) to shared
  // memory (all of it is free now), then rescales both parts to the common max and adds. Layout
  // [slot][thread] of float4: conflict-free. Both halves then store, so each warp issues half of
  // the (for a split, fp32) output stores.
  constexpr int kLo = S::kDt / 2;
  auto mine = [&](int t) { return H == 1 || (t < kLo) == (half == 0); };
  if constexpr (H == 2) {
    static_assert((S::kDt + 2) * kAttnHalfThreads * 16 <= S::template smem_bytes<T, 2>(), "merge buffer too small");
    __syncthreads();  // every warp is done with Q and every K/V buffer
    float4* to_half0 = reinterpret_cast<float4*>(smem_raw);          // kLo tiles, then (m, l)
    float4* to_half1 = to_half0 + (kLo + 1) * kAttnHalfThreads;      // kDt - kLo tiles, then (m, l)
    float4* out = half == 0 ? to_half1 : to_half0;
    const int first = half == 0 ? kLo : 0;  // the first tile this half hands over
#pragma unroll
    for (int t = 0; t < S::kDt; ++t)
      if (!mine(t))
        out[(t - first) * kAttnHalfThreads + tid] = make_float4(acc_o[t][0], acc_o[t][1], acc_o[t][2], acc_o[t][3]);
    const int handed = half == 0 ? S::kDt - kLo : kLo;
    out[handed * kAttnHalfThreads + tid] = make_float4(m_run[0], m_run[1], l_run[0], l_run[1]);
    __syncthreads();
    const float4* in = half == 0 ? to_half0 : to_half1;
    const int own_first = half == 0 ? 0 : kLo, kept = half == 0 ? kLo : S::kDt - kLo;
    const float4 o = in[kept * kAttnHalfThreads + tid];
    const float m1[2] = {o.x, o.y}, l1[2] = {o.z, o.w};
    float c0[2], c1[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mx = fmaxf(m_run[r], m1[r]);
      const float base = mx == -INFINITY ? 0.0f : mx;
      c0[r] = exp2f(m_run[r] - base);
      c1[r] = exp2f(m1[r] - base);
      m_run[r] = mx;
      l_run[r] = l_run[r] * c0[r] + l1[r] * c1[r];
    }
#pragma unroll
    for (int t = 0; t < S::kDt; ++t) {
      if (!mine(t)) continue;
      const float4 a1 = in[(t - own_first) * kAttnHalfThreads + tid];
      acc_o[t][0] = acc_o[t][0] * c0[0] + a1.x * c1[0];
      acc_o[t][1] = acc_o[t][1] * c0[0] + a1.y * c1[0];
      acc_o[t][2] = acc_o[t][2] * c0[1] + a1.z * c1[1];
      acc_o[t][3] = acc_o[t][3] * c0[1] + a1.w * c1[1];
    }
  }

  // Finish: quad-sum l, normalise, store this half's tiles (O directly, or the split's fp32
  // partial); half 0 stores the log-sum-exp.
  const bool store_lse = q4 == 0 && half == 0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int pr = r == 0 ? pr_lo : pr_hi;
    if (pr >= rows_total) continue;
    const int qi = pr / group, h = kvh * group + pr % group;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = l > 0.0f ? (m_run[r] + log2f(l)) * kLn2 : -INFINITY;
    const int64_t lse_idx = (int64_t(b) * p.heads_q + h) * p.seqlen_q + qi;
    if (p.num_splits > 1) {
      const int64_t rows_all = int64_t(p.batch) * p.heads_q * p.seqlen_q;
      float* dst = p.o_accum + (int64_t(split) * rows_all + lse_idx) * D;
#pragma unroll
      for (int t = 0; t < S::kDt; ++t)
        if (mine(t))
          *reinterpret_cast<float2*>(dst + t * 8 + 2 * q4) =
              make_float2(acc_o[t][2 * r] * inv, acc_o[t][2 * r + 1] * inv);
      if (store_lse) p.lse_accum[int64_t(split) * rows_all + lse_idx] = lse;
    } else {
      const int64_t o_idx = b * p.o_sb + qi * p.o_sr + h * p.o_sh;
      if (p.o_scale) {
        const float inv8 = inv / __ldg(p.o_scale);
        uint8_t* dst = static_cast<uint8_t*>(p.o) + o_idx;
#pragma unroll
        for (int t = 0; t < S::kDt; ++t)
          if (mine(t))
            *reinterpret_cast<uint16_t*>(dst + t * 8 + 2 * q4) = fp8x2(acc_o[t][2 * r], acc_o[t][2 * r + 1], inv8);
      } else {
        T* dst = static_cast<T*>(p.o) + o_idx;
#pragma unroll
        for (int t = 0; t < S::kDt; ++t)
          if (mine(t))
            *reinterpret_cast<uint32_t*>(dst + t * 8 + 2 * q4) =
                pack2<T>(acc_o[t][2 * r] * inv, acc_o[t][2 * r + 1] * inv);
      }
      if (p.lse && store_lse) p.lse[lse_idx] = lse;
    }
  }
}

// One warp per (b, h, query) row and 128-column chunk of it. Lane s holds split s's log-sum-exp, so
// the weights exp(lse_s - lse) come from two warp reductions; each lane then owns 4 consecutive
// outputs and loads them from every split before the first multiply-add. The loads are
// unconditional (a split past num_splits re-reads the last one and gets weight 0): under an
// `if (s < splits)` the compiler emitted one branch, load and wait per split, and Nsight Compute
// showed the kernel at one L2 round trip per split (10 us at 10 splits, 61% of its stall samples
// on the multiply-adds waiting for their loads).
template <typename T>
__global__ void attn_combine_kernel(AttnParams p, int head_dim) {
  static_assert(kAttnMaxSplits <= 32, "one lane per split");
  pdl_wait();
  // 32-bit index math (the launcher checks that the partials fit): 64-bit divisions and multiplies
  // here sat in front of the loads.
  const int rows_all = p.batch * p.heads_q * p.seqlen_q;
  const int chunks = head_dim > 128 ? 2 : 1;
  const int warp_id = int(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int row = warp_id / chunks;
  const int lane = threadIdx.x & 31;
  if (row >= rows_all) return;  // whole warps: every shuffle below has all 32 lanes
  const int d0 = (warp_id - row * chunks) * 128 + 4 * lane;
  const int splits = p.num_splits;
  const bool mine = d0 < head_dim;  // head_dim % 4 == 0 (every supported size)
  const float* src = p.o_accum + row * head_dim + (mine ? d0 : 0);
  const int split_stride = rows_all * head_dim;
  float4 x[kAttnMaxSplits];
#pragma unroll
  for (int s = 0; s < kAttnMaxSplits; ++s)
    x[s] = *reinterpret_cast<const float4*>(src + min(s, splits - 1) * split_stride);

  const float lse_s = lane < splits ? p.lse_accum[int64_t(lane) * rows_all + row] : -INFINITY;
  float lmax = lse_s;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) lmax = fmaxf(lmax, __shfl_xor_sync(0xffffffffu, lmax, o));
  float w = 0.0f, lse = -INFINITY;  // w: this lane's split weight
  if (lmax != -INFINITY) {
    const float e = lane < splits ? expf(lse_s - lmax) : 0.0f;
    float sum = e;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    lse = lmax + logf(sum);
    w = e / sum;
  }
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
  for (int s = 0; s < kAttnMaxSplits; ++s) {
    const float ws = __shfl_sync(0xffffffffu, w, s);  // 0 past num_splits and for splits with no mass
    acc.x += ws * x[s].x;
    acc.y += ws * x[s].y;
    acc.z += ws * x[s].z;
    acc.w += ws * x[s].w;
  }
  if (mine) {
    const int qi = row % p.seqlen_q, h = (row / p.seqlen_q) % p.heads_q, b = row / (p.seqlen_q * p.heads_q);
    const int64_t o_idx = b * p.o_sb + qi * p.o_sr + h * p.o_sh + d0;
    if (p.o_scale) {
      const float inv8 = 1.0f / __ldg(p.o_scale);
      *reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(p.o) + o_idx) =
          uint32_t(fp8x2(acc.x, acc.y, inv8)) | (uint32_t(fp8x2(acc.z, acc.w, inv8)) << 16);
    } else {
      T* dst = static_cast<T*>(p.o) + o_idx;
      dst[0] = T(acc.x);
      dst[1] = T(acc.y);
      dst[2] = T(acc.z);
      dst[3] = T(acc.w);
    }
  }
  if (p.lse && lane == 0 && d0 == 0) p.lse[row] = lse;
}

}  // namespace attn

// Splits that bring the grid closest to whole waves over the SMs, preferring fewer: each split
// costs an fp32 partial round trip through memory, so a grid that already covers half the SMs
// (a prefix: ~100 blocks of 64 rows) is left alone; decode-style grids (a few row tiles) split.
inline int attention_num_splits(int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int head_dim,
                                int num_sms) {
  if (num_sms <= 0 || seqlen_k <= 0 || heads_kv <= 0) return 1;
  const int block_n = head_dim > 128 ? 32 : 64;
  const int64_t blocks =
      ceil_div(int64_t(seqlen_q) * (heads_q / heads_kv), kAttnBlockM) * int64_t(batch) * heads_kv;
  if (2 * blocks >= num_sms) return 1;
  const int key_tiles = int(ceil_div(seqlen_k, block_n));
  const int max_splits = std::min<int>(kAttnMaxSplits, std::max(1, key_tiles / 2));
  double best_eff = 0.0;
  std::vector<double> eff(max_splits + 1, 0.0);
  for (int s = 1; s <= max_splits; ++s) {
    const int64_t n = blocks * s;
    eff[s] = double(n) / double(ceil_div(n, num_sms) * num_sms);
    best_eff = std::max(best_eff, eff[s]);
  }
  for (int s = 1; s <= max_splits; ++s)
    if (eff[s] >= 0.85 * best_eff) return s;
  return 1;
}

template <typename T, int D, int H>
inline cudaError_t attention_launch_dh(AttnParams p, cudaStream_t stream) {
  using S = attn::Shape<D>;
  auto kernel = attn::attn_fwd_kernel<T, D, H>;
  const size_t smem = S::template smem_bytes<T, H>();
  static int smem_set_for_device = -1;  // the attribute is per device; set it once (not per launch)
  if (smem > 48 * 1024) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (smem_set_for_device != dev) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
      smem_set_for_device = dev;
    }
  }
  // A split's keys are a whole number of tiles per half, so the halves finish together (with an odd
  // tile count one half idles through the other's last tile and waits at the merge): the requested
  // keys per split, rounded to the nearest such unit, within the scratch buffers' split limit.
  p.static_keys = std::max(0, std::min(p.static_keys, p.seqlen_k));
  const int splits = std::max(1, std::min(p.num_splits, kAttnMaxSplits));
  const int unit = H * S::kBlockN;
  const int64_t want = ceil_div(int64_t(p.seqlen_k), splits);
  int64_t per = std::max<int64_t>(unit, splits == 1 ? ceil_div(want, unit) * unit : (want + unit / 2) / unit * unit);
  while (ceil_div(int64_t(p.seqlen_k), per) > kAttnMaxSplits) per += unit;
  p.keys_per_split = int(per);
  p.num_splits = std::max(1, int(ceil_div(int64_t(p.seqlen_k), per)));
  if (p.num_splits > 1 && (!p.lse_accum || !p.o_accum)) return cudaErrorInvalidValue;
  const int64_t rows_all = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  if (p.num_splits > 1 && rows_all * D * p.num_splits >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;  // the combine's offsets are 32-bit
  const int64_t rows_total = int64_t(p.seqlen_q) * (p.heads_q / p.heads_kv);
  const dim3 grid(unsigned(ceil_div(rows_total, kAttnBlockM)), unsigned(p.batch * p.heads_kv),
                  unsigned(p.num_splits));
  cudaError_t err = launch_kernel(kernel, grid, dim3(H * kAttnHalfThreads), smem, stream, p);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t warps = rows_all * (D > 128 ? 2 : 1);  // one per row and 128-column chunk
  return launch_kernel(attn::attn_combine_kernel<T>, dim3(unsigned(ceil_div(warps, 4))), dim3(128), 0, stream, p,
                       int(D));
}

// Two halves per block when the grid has fewer blocks than SMs (prefix attention: ~100 blocks of
// 4 warps would leave each SM with one block), else one.
template <typename T, int D>
inline cudaError_t attention_launch_d(const AttnParams& p, cudaStream_t stream) {
  static int sms[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (sms[dev] == 0) {
    err = cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
  }
  const int splits = std::max(1, std::min(p.num_splits, kAttnMaxSplits));
  const int64_t blocks = ceil_div(int64_t(p.seqlen_q) * (p.heads_q / p.heads_kv), kAttnBlockM) *
                         int64_t(p.batch) * p.heads_kv * splits;
  // FLASHRT_ATTN_HALVES=1 or 2 forces the block shape (for measurements).
  static const int force = getenv("FLASHRT_ATTN_HALVES") ? atoi(getenv("FLASHRT_ATTN_HALVES")) : 0;
  const bool two = force ? force == 2 : blocks <= sms[dev];
  return two ? attention_launch_dh<T, D, 2>(p, stream) : attention_launch_dh<T, D, 1>(p, stream);
}

// head_dim in {16, 32, 48, 64, 72, 96, 128, 256}; p.num_splits as requested (1 = no split).
template <typename T>
inline cudaError_t attention_launch(const AttnParams& p, int head_dim, cudaStream_t stream) {
  if (p.batch <= 0 || p.seqlen_q <= 0) return cudaSuccess;
  if (p.heads_q <= 0 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0 || p.seqlen_k < 0)
    return cudaErrorInvalidValue;
  switch (head_dim) {
    case 16: return attention_launch_d<T, 16>(p, stream);
    case 32: return attention_launch_d<T, 32>(p, stream);
    case 48: return attention_launch_d<T, 48>(p, stream);
    case 64: return attention_launch_d<T, 64>(p, stream);
    case 72: return attention_launch_d<T, 72>(p, stream);
    case 96: return attention_launch_d<T, 96>(p, stream);
    case 128: return attention_launch_d<T, 128>(p, stream);
    case 256: return attention_launch_d<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flashrt
