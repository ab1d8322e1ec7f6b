#include "flashrt/attention.cuh"

namespace flashrt {

cudaError_t attention_fp16(const AttnParams& p, int head_dim, cudaStream_t stream) {
  return attention_launch<__half>(p, head_dim, stream);
}

}  // namespace flashrt
