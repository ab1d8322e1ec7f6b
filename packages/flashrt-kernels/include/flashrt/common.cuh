// Shared device helpers: 16-byte vectors of bf16, fp8 E4M3 packing, warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <utility>

namespace flashrt {

// Largest finite E4M3 value; quantised values saturate here instead of becoming NaN.
constexpr float kFp8E4M3Max = 448.0f;

// Eight bf16 values moved as one 16-byte access.
struct alignas(16) Bf16x8 {
  __nv_bfloat162 h[4];
};

__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&v)[8]) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&v)[8]) {
  uint4 raw;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return raw;
}

// Rounds to bf16 and back: what a bf16 tensor would hold after storing v.
__device__ __forceinline__ float round_bf16(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// Two floats times inv_scale -> two saturated E4M3 bytes (a in the low byte).
__device__ __forceinline__ uint16_t fp8x2(float a, float b, float inv_scale) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a * inv_scale, b * inv_scale), __NV_SATFINITE, __NV_E4M3);
}

// Eight floats times inv_scale -> eight saturated E4M3 bytes (one 8-byte store).
__device__ __forceinline__ uint2 pack_fp8x8(const float (&v)[8], float inv_scale) {
  uint2 raw;
  uint16_t p[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = fp8x2(v[2 * i], v[2 * i + 1], inv_scale);
  raw.x = uint32_t(p[0]) | (uint32_t(p[1]) << 16);
  raw.y = uint32_t(p[2]) | (uint32_t(p[3]) << 16);
  return raw;
}

__device__ __forceinline__ uint8_t to_fp8(float v, float inv_scale) {
  return __nv_cvt_float_to_fp8(v * inv_scale, __NV_SATFINITE, __NV_E4M3);
}

// Writes eight results either as bf16 (16 bytes) or as E4M3 (8 bytes) at element offset idx.
__device__ __forceinline__ void store_out8(void* out, int64_t idx, const float (&v)[8],
                                           const float* out_scale) {
  if (out_scale) {
    const float inv = 1.0f / __ldg(out_scale);
    *reinterpret_cast<uint2*>(static_cast<uint8_t*>(out) + idx) = pack_fp8x8(v, inv);
  } else {
    *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(out) + idx) = pack_bf16x8(v);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.0f;
  return warp_max(v);
}

__device__ __forceinline__ float gelu_tanh(float x) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation Gemma and SigLIP use.
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  return 0.5f * x * (1.0f + tanhf(k0 * (x + k1 * x * x * x)));
}

// Split-half RoPE angle of pair i (of D / 2) at a position: position * theta^(-2i / D), the
// frequency as exp2(-(2i / D) log2 theta) (ex2.approx, ~2 ulp) rather than powf and its
// special-case branches: the RoPE epilogue cost the expert's QKV GEMM 1.1 of its 7.6 us (H100).
__device__ __forceinline__ float rope_angle(float position, int i, int head_dim, float log2_theta) {
  return position * exp2f(-(2.0f * float(i) / float(head_dim)) * log2_theta);
}

inline cudaError_t last_launch_error() { return cudaGetLastError(); }

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+). Every kernel here calls pdl_wait() before it touches
// anything an earlier kernel writes, so it may be launched before the previous kernel in the stream
// has finished. Once the wait returns, the kernel lets the NEXT one launch: that kernel's blocks are
// scheduled and run their prologue (constant loads: the skinny GEMM's weight stream, a norm's
// weights) while this one works, and they wait in turn for this grid's completion before reading
// what it writes. Triggering after the wait, not before, keeps the run-ahead to one kernel.
// Without the launch attribute (older GPUs, FLASHRT_PDL=0) both instructions are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

inline bool pdl_allowed_by_env() {
  static const bool allowed = [] {
    const char* v = std::getenv("FLASHRT_PDL");
    return !(v && v[0] == '0');
  }();
  return allowed;
}

// Compute capability (10 * major + minor) of the current device, cached per device.
inline cudaError_t current_device_cc(int* cc) {
  static int cache[64] = {0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (cache[dev] == 0) {
    int major = 0, minor = 0;
    if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess) return err;
    cache[dev] = 10 * major + minor;
  }
  *cc = cache[dev];
  return cudaSuccess;
}

// kernel<<<grid, block, smem, stream>>>(args...) with the PDL attribute where the device has it.
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, Args&&... args) {
  int cc = 0;
  cudaError_t err = current_device_cc(&cc);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = (cc >= 90 && pdl_allowed_by_env()) ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace flashrt
