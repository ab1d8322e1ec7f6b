// The C++ entry points the Python binding calls: device addresses and streams as integers, every
// function returns a status code (0 = success, a cudaError_t, or kCublasErrorBase + cublasStatus_t).
// Kept free of CUDA headers so the binding file compiles as plain C++.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace flashrt::api {

using Addr = std::uintptr_t;  // a device pointer or a cudaStream_t, as an integer
using Strides3 = std::array<int64_t, 3>;  // (batch, row, head), in elements

const char* error_string(int code);
int device_count(int* count);
int device_capability(int device, int* major, int* minor);

int norm(Addr x, Addr residual, Addr gate, Addr weight, float weight_offset, Addr bias, Addr mod_scale,
         Addr mod_shift, Addr out, Addr out_scale, int64_t rows, int hidden, float eps, bool layernorm, bool static_params,
         Addr stream);
int bias_act(Addr x, Addr bias, Addr out, int64_t rows, int64_t cols, int activation, Addr out_scale,
             Addr stream);
int geglu(Addr gate_up, Addr out, int64_t rows, int64_t inter, Addr out_scale, bool interleaved, Addr stream);
int quantize_fp8(Addr x, Addr out, int64_t n, Addr scale, Addr stream);
int amax(Addr x, int64_t n, Addr out, bool accumulate, Addr stream);

int gemm(Addr x, Addr w, Addr d, Addr c, Addr bias, Addr x_scale, Addr w_scale, int64_t m, int64_t n, int64_t k,
         int dtype, int epilogue, float alpha, float beta, Addr workspace, size_t workspace_size, int autotune,
         Addr stream);
void gemm_cache_clear();
size_t gemm_cache_size();

int skinny_gemm(Addr x, Addr w, Addr y, Addr bias, Addr residual, float alpha, int m, int n, int k, int split,
                bool fp8, Addr x_scale, Addr w_scale, bool pdl, Addr stream);
int small_linear(Addr x, Addr w, Addr bias, Addr out, int m, int n, int k, bool x_bf16, bool out_bf16,
                 bool accumulate, Addr stream);
int skinny_gemm_geglu(Addr x, Addr w, Addr out, Addr bias, int m, int n, int k, int split, bool fp8, Addr x_scale,
                      Addr w_scale, Addr out_scale, bool pdl, Addr stream);
int skinny_gemm_rope_qkv(Addr x, Addr w, Addr bias, Addr positions, Addr q_out, Addr k_cache, Addr v_cache, int m,
                         int k, int heads_q, int heads_kv, int head_dim, int64_t cache_offset, float theta,
                         int split, bool fp8, Addr x_scale, Addr w_scale, bool pdl, Addr stream);

int rope_qkv(Addr qkv, Addr positions, Addr q_out, Addr k_cache, Addr v_cache, int tokens, int heads_q,
             int heads_kv, int head_dim, int64_t cache_offset, float theta, float q_scale, int64_t q_row_stride,
             Addr stream);

int attention(int dtype, Addr q, Addr k, Addr v, Addr o, Strides3 q_strides, Strides3 k_strides,
              Strides3 v_strides, Strides3 o_strides, int batch, int seqlen_q, int seqlen_k, int heads_q,
              int heads_kv, int head_dim, float scale, Addr mask, int64_t mask_batch_stride,
              int64_t mask_row_stride, Addr lse, Addr lse_accum, Addr o_accum, int num_splits, Addr o_scale,
              int static_keys, Addr stream);
int attention_num_splits(int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int head_dim,
                         int num_sms, int* splits);
int attention_max_splits();

}  // namespace flashrt::api
