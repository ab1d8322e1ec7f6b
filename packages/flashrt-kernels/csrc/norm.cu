#include "flashrt/api.h"
#include "flashrt/norm.cuh"

namespace flashrt::api {

int norm(Addr x, Addr residual, Addr gate, Addr weight, float weight_offset, Addr bias, Addr mod_scale,
         Addr mod_shift, Addr out, Addr out_scale, int64_t rows, int hidden, float eps, bool layernorm, bool static_params,
         Addr stream) {
  NormParams p;
  p.x = reinterpret_cast<const __nv_bfloat16*>(x);
  p.residual = reinterpret_cast<__nv_bfloat16*>(residual);
  p.gate = reinterpret_cast<const __nv_bfloat16*>(gate);
  p.weight = reinterpret_cast<const __nv_bfloat16*>(weight);
  p.weight_offset = weight_offset;
  p.bias = reinterpret_cast<const __nv_bfloat16*>(bias);
  p.mod_scale = reinterpret_cast<const __nv_bfloat16*>(mod_scale);
  p.mod_shift = reinterpret_cast<const __nv_bfloat16*>(mod_shift);
  p.out = reinterpret_cast<void*>(out);
  p.out_scale = reinterpret_cast<const float*>(out_scale);
  p.rows = rows;
  p.hidden = hidden;
  p.eps = eps;
  p.static_params = static_params;
  return int(norm_launch(p, layernorm, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace flashrt::api
