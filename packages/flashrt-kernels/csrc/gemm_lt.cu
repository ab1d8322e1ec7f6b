#include "flashrt/api.h"
#include "flashrt/gemm_lt.h"

namespace flashrt::api {

const char* error_string(int code) { return gemm_error_string(code); }

int device_count(int* count) {
  *count = 0;
  return int(cudaGetDeviceCount(count));
}

int device_capability(int device, int* major, int* minor) {
  cudaError_t err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return int(err);
  return int(cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device));
}

int gemm(Addr x, Addr w, Addr d, Addr c, Addr bias, Addr x_scale, Addr w_scale, int64_t m, int64_t n, int64_t k,
         int dtype, int epilogue, float alpha, float beta, Addr workspace, size_t workspace_size, int autotune,
         Addr stream) {
  if (dtype < 0 || dtype > 1 || epilogue < 0 || epilogue > 1) return int(cudaErrorInvalidValue);
  GemmArgs g;
  g.x = reinterpret_cast<const void*>(x);
  g.w = reinterpret_cast<const void*>(w);
  g.d = reinterpret_cast<void*>(d);
  g.c = reinterpret_cast<const void*>(c);
  g.bias = reinterpret_cast<const void*>(bias);
  g.x_scale = reinterpret_cast<const float*>(x_scale);
  g.w_scale = reinterpret_cast<const float*>(w_scale);
  g.m = m;
  g.n = n;
  g.k = k;
  g.dtype = GemmDtype(dtype);
  g.epilogue = GemmEpilogue(epilogue);
  g.alpha = alpha;
  g.beta = beta;
  g.workspace = reinterpret_cast<void*>(workspace);
  g.workspace_size = workspace_size;
  g.autotune = autotune;
  return gemm_lt(g, reinterpret_cast<cudaStream_t>(stream));
}

void gemm_cache_clear() { flashrt::gemm_cache_clear(); }
size_t gemm_cache_size() { return flashrt::gemm_cache_size(); }

}  // namespace flashrt::api
