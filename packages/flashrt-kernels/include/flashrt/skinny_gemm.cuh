// Skinny GEMM for M <= 64:  Y[M, N] = alpha * X[M, K] @ W[N, K]^T (+ bias[N]) (+ residual[M, N]), bf16 out.
// X and W bf16, or both E4M3 with per-tensor scales (W8A8, sm_89+: half the weight bytes).
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
};

namespace skinny {

constexpr int kWarps = 8;        // per block
constexpr int kRowGroups = 4;    // 16-row MMA tiles of W per block -> 64 W rows per block
constexpr int kKWarps = kWarps / kRowGroups;  // warps splitting k inside the block
constexpr int kRows = 16 * kRowGroups;
// A warp step ("chunk") is two 16-byte loads per W row: 64 bf16 or 128 E4M3 values of k.
template <bool FP8>
constexpr int kChunkK = FP8 ? 128 : 64;
constexpr int kUnroll = 2;       // chunks loaded before the first MMA of a round
constexpr int kMaxSplit = 16;

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

// Programmatic dependent launch (sm_90): wait until the preceding kernel of the stream has
// completed and its writes are visible. A no-op when the kernel was launched without PDL.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// X fragments: reused by every warp, so cached in L1. asm volatile keeps each load next to its MMA
// (also volatile) instead of letting the compiler hoist a whole round of them into registers.
__device__ __forceinline__ uint4 load_or_zero(const uint8_t* p, bool ok) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (ok) {
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  }
  return v;
}

// Streams W past the SM: no reuse, so keep it out of L1 (X, reused by every warp, stays there).
__device__ __forceinline__ uint4 load_stream_or_zero(const uint8_t* p, bool ok) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (ok) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  }
  return v;
}

// Two blocks per SM keep enough weight bytes in flight; at MT = 8 that register cap (128) spills,
// so the rare M > 56 case runs one block per SM instead.
template <int MT, bool FP8>
__global__ void __launch_bounds__(kWarps * 32, MT >= 8 ? 1 : 2) skinny_gemm_kernel(SkinnyGemmParams p) {
  constexpr int kElem = FP8 ? 1 : 2;            // bytes per value
  constexpr int kPer16B = 16 / kElem;           // values per 16-byte load
  constexpr int kCK = kChunkK<FP8>;
  constexpr int kCols = MT * 8;         // padded X rows handled by this instantiation
  constexpr int kLd = kCols + 1;        // smem row stride (odd: spreads the banks)
  __shared__ float tile[kRows * kLd];

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
  const int n_chunks = (p.k + kCK - 1) / kCK;
  const int per_split = (n_chunks + split - 1) / split;
  const int c_begin = rank * per_split;
  const int c_end = min(n_chunks, c_begin + per_split);

  const int row_lo = n0 + rg * 16 + g, row_hi = row_lo + 8;
  const uint8_t* w_bytes = static_cast<const uint8_t*>(p.w);
  const uint8_t* w_lo = w_bytes + int64_t(min(row_lo, p.n - 1)) * p.k * kElem;
  const uint8_t* w_hi = w_bytes + int64_t(min(row_hi, p.n - 1)) * p.k * kElem;
  const bool ok_lo = row_lo < p.n, ok_hi = row_hi < p.n;

  // X row g of n-tile t is x_g + t * 8 * K (read only when that row exists).
  const uint8_t* x_g = static_cast<const uint8_t*>(p.x) + int64_t(g) * p.k * kElem;
  const int x_tile_stride = 8 * p.k * kElem;  // bytes

  float acc[MT][4];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

#pragma unroll 1
  for (int c0 = c_begin + kw; c0 < c_end; c0 += kKWarps * kUnroll) {
    // Offsets inside a round are compile-time constants from one base per round, so the compiler
    // keeps a handful of pointers instead of one per (chunk, half, n-tile) load.
    const int k_base = c0 * kCK + q * kPer16B;  // in values
    const uint8_t* w_lo_r = w_lo + int64_t(k_base) * kElem;
    const uint8_t* w_hi_r = w_hi + int64_t(k_base) * kElem;
    const uint8_t* x_r = x_g + int64_t(k_base) * kElem;
    // Issue every W load of the round first: these are the bytes that must be in flight.
    uint4 a[kUnroll][2][2];  // [chunk][half][row lo / hi]
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int off = u * kKWarps * kCK + h * (kCK / 2);
        const bool in = c0 + u * kKWarps < c_end && k_base + off < p.k;
        a[u][h][0] = load_stream_or_zero(w_lo_r + off * kElem, in && ok_lo);
        a[u][h][1] = load_stream_or_zero(w_hi_r + off * kElem, in && ok_hi);
      }
    }
    // Weights are constant, so they may be read before the previous kernel in the stream is done
    // (programmatic dependent launch); X / residual / Y only after this point.
    grid_dependency_wait();  // returns at once after the first round
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int off = u * kKWarps * kCK + h * (kCK / 2);
        const bool in = c0 + u * kKWarps < c_end && k_base + off < p.k;
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          const int xr = t * 8 + g;
          const uint4 b = load_or_zero(x_r + t * x_tile_stride + off * kElem, in && xr < p.m);
          const uint4& lo = a[u][h][0];
          const uint4& hi = a[u][h][1];
          // bf16: physical k (kk + 0..3) plays logical k (2q, 2q+1, 2q+8, 2q+9) of the first MMA
          // and kk + 4..7 the same of the second. E4M3: kk + 0..7 plays (4q..4q+3, 16+4q..16+4q+3)
          // of the first, kk + 8..15 of the second. A and B use the same map.
          mma_step<FP8>(acc[t], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
          mma_step<FP8>(acc[t], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
        }
      }
    }
  }

  grid_dependency_wait();  // (warps without chunks) before any global write

  // Sum the k-warps of the block into the tile, in warp order (deterministic).
  for (int s = 0; s < kKWarps; ++s) {
    if (kw == s) {
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        float* r_lo = tile + (rg * 16 + g) * kLd + t * 8 + 2 * q;
        float* r_hi = r_lo + 8 * kLd;
        if (s == 0) {
          r_lo[0] = acc[t][0]; r_lo[1] = acc[t][1]; r_hi[0] = acc[t][2]; r_hi[1] = acc[t][3];
        } else {
          r_lo[0] += acc[t][0]; r_lo[1] += acc[t][1]; r_hi[0] += acc[t][2]; r_hi[1] += acc[t][3];
        }
      }
    }
    __syncthreads();
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) cluster.sync();  // every block's tile is complete and visible cluster-wide
#endif

  float alpha = p.alpha;
  if (FP8) {
    if (p.x_scale) alpha *= __ldg(p.x_scale);
    if (p.w_scale) alpha *= __ldg(p.w_scale);
  }

  // Each rank finishes a slice of the tile: sum over ranks in rank order, epilogue, store.
  // Element e -> (x row m, W row r), r fastest so stores along N coalesce.
  const int n_elems = p.m * kRows;
  const int per_rank = (n_elems + split - 1) / split;
  const int e_end = min(n_elems, (rank + 1) * per_rank);
  for (int e = rank * per_rank + threadIdx.x; e < e_end; e += blockDim.x) {
    const int m = e / kRows, r = e - m * kRows;
    const int n = n0 + r;
    if (n >= p.n) continue;
    float v = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (split > 1) {
      for (int s = 0; s < split; ++s) v += cluster.map_shared_rank(tile, s)[r * kLd + m];
    } else {
      v = tile[r * kLd + m];
    }
#else
    v = tile[r * kLd + m];
#endif
    v *= alpha;
    if (p.bias) v += __bfloat162float(p.bias[n]);
    const int64_t o = int64_t(m) * p.n + n;
    if (p.residual) v += __bfloat162float(p.residual[o]);
    p.y[o] = __float2bfloat16_rn(v);
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) cluster.sync();  // keep this block's tile alive until every rank has read it
#endif
}

}  // namespace skinny

// Cluster split along K: as many blocks as fill the GPU twice, at least one chunk per warp.
inline int skinny_gemm_split(int n, int k, bool fp8, int num_sms, bool clusters_ok) {
  if (!clusters_ok) return 1;
  const int row_blocks = int(ceil_div(n, skinny::kRows));
  const int n_chunks = int(ceil_div(k, fp8 ? skinny::kChunkK<true> : skinny::kChunkK<false>));
  int limit = std::min({skinny::kMaxSplit, std::max(1, 2 * num_sms / std::max(1, row_blocks)),
                        std::max(1, n_chunks / skinny::kKWarps)});
  int split = 1;
  while (split * 2 <= limit) split *= 2;
  return split;
}

template <int MT, bool FP8>
inline cudaError_t skinny_gemm_launch_mt(const SkinnyGemmParams& p, int split, bool pdl, cudaStream_t stream) {
  auto kernel = skinny::skinny_gemm_kernel<MT, FP8>;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(ceil_div(p.n, skinny::kRows)), unsigned(split), 1);
  cfg.blockDim = dim3(skinny::kWarps * 32, 1, 1);
  cfg.dynamicSmemBytes = 0;
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
  static bool non_portable_set = false;  // a function attribute: set once, not on every launch
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
      auto kernel = skinny::skinny_gemm_kernel<8, false>;
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
        cudaLaunchConfig_t cfg = {};
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
  SkinnyDeviceInfo info;
  cudaError_t err = skinny_device_info(&info);
  if (err != cudaSuccess) return err;
  if (p.fp8 && info.cc < 89) return cudaErrorNotSupported;
  if (split <= 0) {
    split = skinny_gemm_split(p.n, p.k, p.fp8, info.num_sms, info.clusters);
    split = std::min(split, info.max_cluster);
  }
  if (split > 1 && (!info.clusters || split > skinny::kMaxSplit || (split & (split - 1)) != 0))
    return cudaErrorInvalidValue;
  const bool pdl = p.pdl && info.cc >= 90;
  // MT = n-tiles of 8 rows of X: 1, 2, 7 (the action expert's 50 / 51 rows), 8.
  if (p.fp8) {
    if (p.m <= 8) return skinny_gemm_launch_mt<1, true>(p, split, pdl, stream);
    if (p.m <= 16) return skinny_gemm_launch_mt<2, true>(p, split, pdl, stream);
    if (p.m <= 56) return skinny_gemm_launch_mt<7, true>(p, split, pdl, stream);
    return skinny_gemm_launch_mt<8, true>(p, split, pdl, stream);
  }
  if (p.m <= 8) return skinny_gemm_launch_mt<1, false>(p, split, pdl, stream);
  if (p.m <= 16) return skinny_gemm_launch_mt<2, false>(p, split, pdl, stream);
  if (p.m <= 56) return skinny_gemm_launch_mt<7, false>(p, split, pdl, stream);
  return skinny_gemm_launch_mt<8, false>(p, split, pdl, stream);
}

}  // namespace flashrt
