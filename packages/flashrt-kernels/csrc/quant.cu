#include "flashrt/api.h"
#include "flashrt/quant.cuh"

namespace flashrt::api {

int quantize_fp8(Addr x, Addr out, int64_t n, Addr scale, Addr stream) {
  return int(quantize_fp8_launch(reinterpret_cast<const __nv_bfloat16*>(x), reinterpret_cast<uint8_t*>(out), n,
                                 reinterpret_cast<const float*>(scale), reinterpret_cast<cudaStream_t>(stream)));
}

int amax(Addr x, int64_t n, Addr out, bool accumulate, Addr stream) {
  return int(amax_launch(reinterpret_cast<const __nv_bfloat16*>(x), n, reinterpret_cast<float*>(out), accumulate,
                         reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace flashrt::api
