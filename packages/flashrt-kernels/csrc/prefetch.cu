#include "flashrt/api.h"
#include "flashrt/prefetch.cuh"

namespace flashrt::api {

// Ranges beyond kPrefetchMaxRanges go out in further launches of the same kernel.
int prefetch_l2(const std::vector<Addr>& ptrs, const std::vector<int64_t>& bytes, Addr stream) {
  if (ptrs.size() != bytes.size()) return int(cudaErrorInvalidValue);
  for (size_t first = 0; first < ptrs.size(); first += kPrefetchMaxRanges) {
    PrefetchRanges r = {};
    for (size_t j = first; j < ptrs.size() && r.count < kPrefetchMaxRanges; ++j, ++r.count) {
      r.ptr[r.count] = reinterpret_cast<const char*>(ptrs[j]);
      r.bytes[r.count] = bytes[j];
    }
    cudaError_t err = prefetch_l2_launch(r, reinterpret_cast<cudaStream_t>(stream));
    if (err != cudaSuccess) return int(err);
  }
  return 0;
}

}  // namespace flashrt::api
