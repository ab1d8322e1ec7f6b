#include "flashrt/activation.cuh"
#include "flashrt/api.h"

namespace flashrt::api {

int bias_act(Addr x, Addr bias, Addr out, int64_t rows, int64_t cols, int activation, Addr out_scale,
             Addr stream) {
  if (activation < 0 || activation > 3) return int(cudaErrorInvalidValue);
  return int(bias_act_launch(reinterpret_cast<const __nv_bfloat16*>(x), reinterpret_cast<const __nv_bfloat16*>(bias),
                             reinterpret_cast<void*>(out), rows, cols, Activation(activation),
                             reinterpret_cast<const float*>(out_scale), reinterpret_cast<cudaStream_t>(stream)));
}

int geglu(Addr gate_up, Addr out, int64_t rows, int64_t inter, Addr out_scale, bool interleaved, Addr stream) {
  return int(geglu_launch(reinterpret_cast<const __nv_bfloat16*>(gate_up), reinterpret_cast<void*>(out), rows, inter,
                          reinterpret_cast<const float*>(out_scale), interleaved,
                          reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace flashrt::api
