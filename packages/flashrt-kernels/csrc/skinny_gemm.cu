#include "flashrt/api.h"
#include "flashrt/skinny_gemm.cuh"

namespace flashrt::api {

namespace {
SkinnyGemmParams operands(Addr x, Addr w, Addr bias, int m, int n, int k, bool fp8, Addr x_scale, Addr w_scale,
                          bool pdl) {
  SkinnyGemmParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const void*>(w);
  p.bias = reinterpret_cast<const __nv_bfloat16*>(bias);
  p.fp8 = fp8;
  p.pdl = pdl;
  p.x_scale = reinterpret_cast<const float*>(x_scale);
  p.w_scale = reinterpret_cast<const float*>(w_scale);
  p.m = m;
  p.n = n;
  p.k = k;
  return p;
}
}  // namespace

int skinny_gemm(Addr x, Addr w, Addr y, Addr bias, Addr residual, float alpha, int m, int n, int k, int split,
                bool fp8, Addr x_scale, Addr w_scale, bool pdl, Addr stream) {
  SkinnyGemmParams p = operands(x, w, bias, m, n, k, fp8, x_scale, w_scale, pdl);
  p.y = reinterpret_cast<__nv_bfloat16*>(y);
  p.residual = reinterpret_cast<const __nv_bfloat16*>(residual);
  p.alpha = alpha;
  return int(skinny_gemm_launch(p, split, reinterpret_cast<cudaStream_t>(stream)));
}

int skinny_gemm_geglu(Addr x, Addr w, Addr out, Addr bias, int m, int n, int k, int split, bool fp8, Addr x_scale,
                      Addr w_scale, Addr out_scale, bool pdl, Addr stream) {
  SkinnyGemmParams p = operands(x, w, bias, m, n, k, fp8, x_scale, w_scale, pdl);
  p.epilogue = kSkinnyGeglu;
  p.out = reinterpret_cast<void*>(out);
  p.out_scale = reinterpret_cast<const float*>(out_scale);
  return int(skinny_gemm_launch(p, split, reinterpret_cast<cudaStream_t>(stream)));
}

int skinny_gemm_rope_qkv(Addr x, Addr w, Addr bias, Addr positions, Addr q_out, Addr k_cache, Addr v_cache, int m,
                         int k, int heads_q, int heads_kv, int head_dim, int64_t cache_offset, float theta,
                         int split, bool fp8, Addr x_scale, Addr w_scale, bool pdl, Addr stream) {
  SkinnyGemmParams p = operands(x, w, bias, m, (heads_q + 2 * heads_kv) * head_dim, k, fp8, x_scale, w_scale, pdl);
  p.epilogue = kSkinnyRopeQkv;
  p.positions = reinterpret_cast<const int32_t*>(positions);
  p.q_out = reinterpret_cast<__nv_bfloat16*>(q_out);
  p.k_cache = reinterpret_cast<__nv_bfloat16*>(k_cache);
  p.v_cache = reinterpret_cast<__nv_bfloat16*>(v_cache);
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.cache_offset = cache_offset;
  p.theta = theta;
  return int(skinny_gemm_launch(p, split, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace flashrt::api
