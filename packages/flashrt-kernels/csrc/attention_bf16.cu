#include "flashrt/attention.cuh"

namespace flashrt {

cudaError_t attention_bf16(const AttnParams& p, int head_dim, cudaStream_t stream) {
  return attention_launch<__nv_bfloat16>(p, head_dim, stream);
}

}  // namespace flashrt
