// Per-SM instruction throughput of the operations the FP8 skinny GEMM's inner loop is made of, on
// the card it runs on: sm_90 has no E4M3 mma.sync, so the kernel unpacks E4M3 to f16 (cvt) and runs
// f16 MMAs. Each kernel runs independent chains (8 per thread, so latency is hidden), one block of
// 256 threads per SM; the result is thread-level operations per clock per SM at the reported clock.
// Also checks that an integer-instruction unpack (prmt + shift + add) equals cvt / 256 on every
// finite E4M3 pair. H100, 2026-12-07: cvt 53 per clock, the integer unpack 21, so cvt stays
// (docs/kernels.md, tenth pass).
//
//   nvcc -O3 -std=c++17 -arch=sm_90a scripts/sm_throughput.cu -o /tmp/sm_throughput && /tmp/sm_throughput
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

constexpr int kIters = 4096;
constexpr int kChains = 8;

// cvt.rn.f16x2.e4m3x2: one instruction, 2 values (the low two bytes of x).
__device__ __forceinline__ uint32_t unpack_cvt(uint32_t x) {
  uint32_t r;
  asm volatile("{\n .reg .b16 lo;\n mov.b32 {lo, _}, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n}\n" : "=r"(r) : "r"(x));
  return r;
}

// The integer version of the same unpack: bytes to the high byte of each 16-bit lane (prmt), down
// one bit, the sign from bit 14 to 15 (add bit 14 to itself): 2 values in 4 instructions, exact for
// finite E4M3, which it yields times 2^-8 (the exponent biases differ by 8; subnormals included).
__device__ __forceinline__ uint32_t unpack_int(uint32_t x) {
  uint32_t z;
  asm volatile("prmt.b32 %0, %1, 0, 0x1404;\n" : "=r"(z) : "r"(x));  // [b1 0 b0 0]
  const uint32_t a = z >> 1;
  return a + (a & 0x40004000u);
}

// Throughput of one unpack: kChains independent chains a thread, each feeding the next.
template <uint32_t (*Unpack)(uint32_t)>
__global__ void unpack_kernel(uint32_t* out, uint32_t seed) {
  uint32_t v[kChains];
  for (int c = 0; c < kChains; ++c) v[c] = seed + threadIdx.x * 7 + c;
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) v[c] = Unpack(v[c]);
  }
  uint32_t acc = 0;
  for (int c = 0; c < kChains; ++c) acc ^= v[c];
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// mma.sync m16n8k16 f16 -> f32 (the emulated E4M3 MMA's instruction).
__global__ void mma_kernel(float* out, uint32_t seed) {
  float c[kChains][4] = {};
  const uint32_t a0 = seed ^ threadIdx.x, a1 = a0 * 3, a2 = a0 * 5, a3 = a0 * 7, b0 = a0 * 11, b1 = a0 * 13;
  for (int i = 0; i < kIters / 4; ++i) {
#pragma unroll
    for (int k = 0; k < kChains; ++k) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[k][0]), "+f"(c[k][1]), "+f"(c[k][2]), "+f"(c[k][3])
          : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
  }
  float acc = 0;
  for (int k = 0; k < kChains; ++k) acc += c[k][0] + c[k][1] + c[k][2] + c[k][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// ld.shared.v4 (16 bytes a thread, conflict-free addresses).
__global__ void lds_kernel(uint32_t* out) {
  __shared__ uint4 buf[1024];
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) buf[i] = make_uint4(i, i + 1, i + 2, i + 3);
  __syncthreads();
  uint32_t acc = 0;
  int idx = threadIdx.x;
  for (int i = 0; i < kIters / 4; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {
      const uint4 v = buf[(idx + c * 32) & 1023];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    idx = (idx + (acc & 1) * 32 + 256) & 1023;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// The integer unpack against cvt for every byte pair: bits * 256 == cvt (NaN encodings skipped).
__global__ void check_bits_kernel(int* mismatches) {
  const uint32_t x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= 65536u) return;
  if ((x & 0x7F) == 0x7F || ((x >> 8) & 0x7F) == 0x7F) return;
  const uint32_t r = unpack_cvt(x), b = unpack_int(x);
  const __half2 hc = *reinterpret_cast<const __half2*>(&r), hb = *reinterpret_cast<const __half2*>(&b);
  const float2 fc = __half22float2(hc), fb = __half22float2(hb);
  if (fb.x * 256.0f != fc.x || fb.y * 256.0f != fc.y) atomicAdd(mismatches, 1);
}

template <typename F>
float time_ms(F launch) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  launch();
  cudaEventRecord(a);
  for (int r = 0; r < 5; ++r) launch();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms / 5;
}

int main() {
  int sms = 0, clock_khz = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  const int threads = 256, blocks = sms;
  void* buf = nullptr;
  cudaMalloc(&buf, size_t(blocks) * threads * 4);
  const double per_sm_thread_ops = double(threads) * kIters * kChains;  // per block
  const double clocks_per_ms = clock_khz;                                  // at the reported clock
  auto report = [&](const char* what, float ms, double ops_per_block, const char* unit) {
    const double per_clk = ops_per_block / (ms * clocks_per_ms);
    printf("%-44s %8.3f ms  %8.1f %s per clock per SM\n", what, ms, per_clk, unit);
  };
  printf("%s: %d SMs, clock %.0f MHz (reported; per-clock numbers assume it)\n", prop.name, sms, clock_khz / 1e3);
  float ms = time_ms([&] { unpack_kernel<unpack_cvt><<<blocks, threads>>>(static_cast<uint32_t*>(buf), 1); });
  report("cvt.rn.f16x2.e4m3x2 (2 values each)", ms, per_sm_thread_ops, "instr");
  ms = time_ms([&] { unpack_kernel<unpack_int><<<blocks, threads>>>(static_cast<uint32_t*>(buf), 1); });
  report("prmt + shift/and/or unpack (2 values each)", ms, per_sm_thread_ops, "unpacks");
  ms = time_ms([&] { mma_kernel<<<blocks, threads>>>(static_cast<float*>(buf), 1); });
  report("mma.sync m16n8k16 f16->f32 (4096 MAC each)", ms, double(threads / 32) * (kIters / 4) * kChains,
         "mma");
  ms = time_ms([&] { lds_kernel<<<blocks, threads>>>(static_cast<uint32_t*>(buf)); });
  report("ld.shared.v4 (16 bytes a thread)", ms, double(threads) * (kIters / 4) * kChains * 16, "bytes");
  int* bad = nullptr;
  cudaMalloc(&bad, sizeof(int));
  cudaMemset(bad, 0, sizeof(int));
  check_bits_kernel<<<256, 256>>>(bad);
  int host_bad = -1;
  cudaMemcpy(&host_bad, bad, sizeof(int), cudaMemcpyDeviceToHost);
  printf("integer unpack == cvt / 256 on every finite E4M3 pair: %s (%d mismatches)\n",
         host_bad == 0 ? "yes" : "NO", host_bad);
  const cudaError_t err = cudaDeviceSynchronize();
  printf("status: %s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
