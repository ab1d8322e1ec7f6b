// L2 prefetch of weights a later kernel will stream. In the action expert every GEMM runs on 50
// rows and is a latency chain: its weight loads pay DRAM latency on the critical path. Weights do
// not depend on any earlier kernel, so a pipeline can ask for a layer's weights while the previous
// layer runs (from a side stream of the same CUDA graph); when its GEMMs start, their loads hit L2.
// Fire and forget: the copy engine of each SM fetches the lines after the kernel has exited, and
// nothing here is written anywhere. Two ways in: a standalone kernel (for a side stream), or in the
// prologue of a kernel that runs anyway (NormParams::prefetch: no extra kernel in the chain).
#pragma once

#include <algorithm>
#include <cstdint>

#include "flashrt/common.cuh"

namespace flashrt {

constexpr int kPrefetchMaxRanges = 8;
constexpr int64_t kPrefetchChunk = 16 * 1024;  // one bulk request; spread over SMs, not queued on one

struct PrefetchRanges {
  const char* ptr[kPrefetchMaxRanges];
  int64_t bytes[kPrefetchMaxRanges];
  int count;
};

// Thread `thread` of `num_threads` asks for every num_threads-th chunk of the ranges. Used by the
// standalone kernel below and by kernels that prefetch in their prologue (the norms).
__device__ __forceinline__ void prefetch_l2_ranges(const PrefetchRanges& r, int64_t thread, int64_t num_threads) {
  int64_t chunk = thread;
  int64_t first = 0;  // chunk index where range j starts
  for (int j = 0; j < r.count; ++j) {
    const int64_t n = (r.bytes[j] + kPrefetchChunk - 1) / kPrefetchChunk;
    for (; chunk < first + n; chunk += num_threads) {
      const int64_t off = (chunk - first) * kPrefetchChunk;
      const char* a = r.ptr[j] + off;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      // the size must be a multiple of 16: a range's last < 16 bytes are left out (it is a hint)
      const uint32_t size = uint32_t(min(kPrefetchChunk, r.bytes[j] - off) & ~int64_t(15));
      if (size) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(a), "r"(size) : "memory");
#else
      const int64_t end = min(kPrefetchChunk, r.bytes[j] - off);
      for (int64_t line = 0; line < end; line += 128) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(a + line));
#endif
    }
    first += n;
  }
}

// static: this header is included by several translation units (the norms use the device function)
static __global__ void prefetch_l2_kernel(PrefetchRanges r) {
  prefetch_l2_ranges(r, blockIdx.x * int64_t(blockDim.x) + threadIdx.x, int64_t(gridDim.x) * blockDim.x);
  // Last, not first: under PDL a kernel launched after this one in its stream must still find
  // everything before it complete.
  pdl_wait();
}

inline cudaError_t prefetch_l2_launch(const PrefetchRanges& r, cudaStream_t stream) {
  int64_t chunks = 0;
  for (int j = 0; j < r.count; ++j) chunks += ceil_div(r.bytes[j], kPrefetchChunk);
  if (chunks == 0) return cudaSuccess;
  const int threads = 32;  // a warp per block, a block per ~SM: few requests per SM's copy engine
  const int blocks = int(std::min<int64_t>(ceil_div(chunks, threads), 132));
  return launch_kernel(prefetch_l2_kernel, dim3(blocks), dim3(threads), 0, stream, r);
}

}  // namespace flashrt
