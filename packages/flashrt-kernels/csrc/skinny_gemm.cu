#include "flashrt/api.h"
#include "flashrt/skinny_gemm.cuh"

namespace flashrt::api {

int skinny_gemm(Addr x, Addr w, Addr y, Addr bias, Addr residual, float alpha, int m, int n, int k, int split,
                Addr stream) {
  SkinnyGemmParams p;
  p.x = reinterpret_cast<const __nv_bfloat16*>(x);
  p.w = reinterpret_cast<const __nv_bfloat16*>(w);
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
