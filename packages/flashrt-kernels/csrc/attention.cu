#include "flashrt/api.h"
#include "flashrt/attention.cuh"

// The kernels themselves are instantiated in attention_bf16.cu / attention_fp16.cu (two TUs build
// in parallel); this file holds the entry points.
namespace flashrt {
cudaError_t attention_bf16(const AttnParams& p, int head_dim, cudaStream_t stream);
cudaError_t attention_fp16(const AttnParams& p, int head_dim, cudaStream_t stream);
}  // namespace flashrt

namespace flashrt::api {

int attention(int dtype, Addr q, Addr k, Addr v, Addr o, Strides3 q_strides, Strides3 k_strides,
              Strides3 v_strides, Strides3 o_strides, int batch, int seqlen_q, int seqlen_k, int heads_q,
              int heads_kv, int head_dim, float scale, Addr mask, int64_t mask_batch_stride,
              int64_t mask_row_stride, Addr lse, Addr lse_accum, Addr o_accum, int num_splits, Addr o_scale,
              int static_keys, Addr stream) {
  AttnParams p;
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(o);
  p.q_sb = q_strides[0], p.q_sr = q_strides[1], p.q_sh = q_strides[2];
  p.k_sb = k_strides[0], p.k_sr = k_strides[1], p.k_sh = k_strides[2];
  p.v_sb = v_strides[0], p.v_sr = v_strides[1], p.v_sh = v_strides[2];
  p.o_sb = o_strides[0], p.o_sr = o_strides[1], p.o_sh = o_strides[2];
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.scale = scale;
  p.mask = reinterpret_cast<const uint8_t*>(mask);
  p.mask_sb = mask_batch_stride;
  p.mask_sr = mask_row_stride;
  p.lse = reinterpret_cast<float*>(lse);
  p.lse_accum = reinterpret_cast<float*>(lse_accum);
  p.o_accum = reinterpret_cast<float*>(o_accum);
  p.num_splits = num_splits;
  p.o_scale = reinterpret_cast<const float*>(o_scale);
  p.static_keys = static_keys;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0) return int(attention_bf16(p, head_dim, s));
  if (dtype == 1) return int(attention_fp16(p, head_dim, s));
  return int(cudaErrorInvalidValue);
}

int attention_num_splits(int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int head_dim,
                         int num_sms, int* splits) {
  *splits = 1;
  if (num_sms <= 0) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return int(err);
  }
  *splits = flashrt::attention_num_splits(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, num_sms);
  return 0;
}

int attention_max_splits() { return kAttnMaxSplits; }

}  // namespace flashrt::api
