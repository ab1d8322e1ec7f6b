#include "flashrt/api.h"
#include "flashrt/rope.cuh"

namespace flashrt::api {

int rope_qkv(Addr qkv, Addr positions, Addr q_out, Addr k_cache, Addr v_cache, int tokens, int heads_q,
             int heads_kv, int head_dim, int64_t cache_offset, float theta, float q_scale, int64_t q_row_stride,
             Addr stream) {
  RopeQkvParams p;
  p.qkv = reinterpret_cast<const __nv_bfloat16*>(qkv);
  p.positions = reinterpret_cast<const int32_t*>(positions);
  p.q_out = reinterpret_cast<__nv_bfloat16*>(q_out);
  p.k_cache = reinterpret_cast<__nv_bfloat16*>(k_cache);
  p.v_cache = reinterpret_cast<__nv_bfloat16*>(v_cache);
  p.tokens = tokens;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.cache_offset = cache_offset;
  p.theta = theta;
  p.q_scale = q_scale;
  p.q_row_stride = q_row_stride;
  return int(rope_qkv_launch(p, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace flashrt::api
