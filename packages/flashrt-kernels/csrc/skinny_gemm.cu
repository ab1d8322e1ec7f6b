#include "flashrt/api.h"
#include "flashrt/skinny_gemm.cuh"

namespace flashrt::api {

int skinny_gemm(Addr x, Addr w, Addr y, Addr bias, Addr residual, float alpha, int m, int n, int k, int split,
                bool fp8, Addr x_scale, Addr w_scale, bool pdl, Addr stream) {
  SkinnyGemmParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const void*>(w);
  p.fp8 = fp8;
  p.pdl = pdl;
  p.x_scale = reinterpret_cast<const float*>(x_scale);
  p.w_scale = reinterpret_cast<const float*>(w_scale);
  p.y = reinterpret_cast<__nv_bfloat16*>(y);
  p.bias = reinterpret_cast<const __nv_bfloat16*>(bias);
  p.residual = reinterpret_cast<const __nv_bfloat16*>(residual);
  p.alpha = alpha;
  p.m = m;
  p.n = n;
  p.k = k;
  return int(skinny_gemm_launch(p, split, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace flashrt::api
