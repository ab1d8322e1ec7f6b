#include "flashrt/api.h"
#include "flashrt/small_linear.cuh"

namespace flashrt::api {

int small_linear(Addr x, Addr w, Addr bias, Addr out, int m, int n, int k, bool x_bf16, bool out_bf16,
                 bool accumulate, Addr stream) {
  SmallLinearParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const float*>(w);
  p.bias = reinterpret_cast<const float*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.m = m;
  p.n = n;
  p.k = k;
  p.x_bf16 = x_bf16;
  p.out_bf16 = out_bf16;
  p.accumulate = accumulate;
  return int(small_linear_launch(p, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace flashrt::api
