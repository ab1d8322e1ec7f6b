// GEMM through cuBLASLt:  D[M, N] = epi(alpha * sa * sb * (X[M, K] @ W[N, K]^T) + bias[N]) + beta * C[M, N]
// X, W row-major bf16 or FP8 E4M3 (both the same), D and C bf16, fp32 accumulation.
// sa / sb are optional device scalars (the FP8 per-tensor scales of X and W): device pointers so a
// captured CUDA graph picks up a recalibrated scale without being captured again.
//
// Row-major X @ W^T is the column-major product W^T(col) ... which cuBLASLt sees as the "TN" case
// (the only layout FP8 supports on Hopper): A = W as a K x N column-major matrix, transposed;
// B = X as a K x M column-major matrix; D as N x M column-major (= M x N row-major).
//
// Plans (descriptors + chosen algorithm) are cached per shape and options. Autotune levels:
// 0 = cuBLASLt's first heuristic choice; 3 = time the first 8 candidates; 5 = time up to 32 (the
// heuristic lists 6-8 at the Pi0.5 shapes; their split-K / CTA-swizzle variants were never faster
// on the H100: docs/kernels.md, "Thirteenth pass"). FLASHRT_GEMM_TUNE_LOG=1 prints what was timed.
// Timing runs write into a scratch buffer, never into D, and are skipped while the stream is being
// captured into a CUDA graph (the heuristic choice is used; tune before capturing).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace flashrt {

enum class GemmDtype : int { kBf16 = 0, kFp8E4M3 = 1 };
enum class GemmEpilogue : int { kNone = 0, kGeluTanh = 1 };

struct GemmArgs {
  const void* x = nullptr;      // [M, K]
  const void* w = nullptr;      // [N, K]
  void* d = nullptr;            // [M, N] bf16
  const void* c = nullptr;      // [M, N] bf16 or null; may equal d (in-place residual add)
  const void* bias = nullptr;   // [N] bf16 or null
  const float* x_scale = nullptr;
  const float* w_scale = nullptr;
  int64_t m = 0, n = 0, k = 0;
  GemmDtype dtype = GemmDtype::kBf16;
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  float alpha = 1.0f, beta = 1.0f;  // beta is used only when c is set
  void* workspace = nullptr;
  size_t workspace_size = 0;
  int autotune = 0;
};

// Errors of cuBLASLt are reported as these cudaError_t-sized codes (decoded by gemm_error_string).
constexpr int kCublasErrorBase = 100000;

namespace detail {

struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  int tuned_level = -1;
  ~GemmPlan() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (d) cublasLtMatrixLayoutDestroy(d);
  }
};

using GemmKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, bool, bool, bool, size_t>;

struct GemmState {
  std::mutex mutex;
  std::map<int, cublasLtHandle_t> handles;  // per device
  std::map<GemmKey, std::unique_ptr<GemmPlan>> plans;
};

inline GemmState& gemm_state() {
  static GemmState* state = new GemmState();  // never destroyed: outlives module teardown order
  return *state;
}

inline int blas_error(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS ? 0 : kCublasErrorBase + int(s); }

}  // namespace detail

inline const char* gemm_error_string(int code) {
  if (code < kCublasErrorBase) return cudaGetErrorString(cudaError_t(code));
  return cublasLtGetStatusString(cublasStatus_t(code - kCublasErrorBase));
}

inline void gemm_cache_clear() {
  auto& st = detail::gemm_state();
  std::lock_guard<std::mutex> lock(st.mutex);
  st.plans.clear();
}

inline size_t gemm_cache_size() {
  auto& st = detail::gemm_state();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.plans.size();
}

namespace detail {

#define FLASHRT_LT(call)                                 \
  do {                                                   \
    cublasStatus_t _s = (call);                          \
    if (_s != CUBLAS_STATUS_SUCCESS) return blas_error(_s); \
  } while (0)

inline int build_plan(cublasLtHandle_t handle, const GemmArgs& g, GemmPlan& plan) {
  const cudaDataType_t in_type = g.dtype == GemmDtype::kFp8E4M3 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  FLASHRT_LT(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  FLASHRT_LT(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  FLASHRT_LT(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  if (g.epilogue == GemmEpilogue::kGeluTanh) epi = g.bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  else if (g.bias) epi = CUBLASLT_EPILOGUE_BIAS;
  FLASHRT_LT(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (g.bias) {
    const cudaDataType_t bias_type = CUDA_R_16BF;
    FLASHRT_LT(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                              sizeof(bias_type)));
  }
  FLASHRT_LT(cublasLtMatrixLayoutCreate(&plan.a, in_type, uint64_t(g.k), uint64_t(g.n), int64_t(g.k)));
  FLASHRT_LT(cublasLtMatrixLayoutCreate(&plan.b, in_type, uint64_t(g.k), uint64_t(g.m), int64_t(g.k)));
  FLASHRT_LT(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_16BF, uint64_t(g.n), uint64_t(g.m), int64_t(g.n)));
  FLASHRT_LT(cublasLtMatrixLayoutCreate(&plan.d, CUDA_R_16BF, uint64_t(g.n), uint64_t(g.m), int64_t(g.n)));
  return 0;
}

// Per-call pointers live in the descriptor: set them before every matmul.
inline int set_call_pointers(GemmPlan& plan, const GemmArgs& g) {
  if (g.bias) {
    FLASHRT_LT(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                              sizeof(g.bias)));
  }
  if (g.dtype == GemmDtype::kFp8E4M3) {
    // cuBLASLt's A is our W, its B our X. A null pointer means a scale of 1.
    FLASHRT_LT(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g.w_scale,
                                              sizeof(g.w_scale)));
    FLASHRT_LT(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g.x_scale,
                                              sizeof(g.x_scale)));
  }
  return 0;
}

inline int run_matmul(cublasLtHandle_t handle, GemmPlan& plan, const GemmArgs& g, const cublasLtMatmulAlgo_t& algo,
                      void* d, cudaStream_t stream) {
  const float beta = g.c ? g.beta : 0.0f;
  const void* c = g.c ? g.c : d;
  FLASHRT_LT(cublasLtMatmul(handle, plan.op, &g.alpha, g.w, plan.a, g.x, plan.b, &beta, c, plan.c, d, plan.d,
                            &algo, g.workspace, g.workspace_size, stream));
  return 0;
}

// Times each candidate on the caller's stream into a scratch output; returns the fastest index and,
// per call, its time and the first (the heuristic's pick) candidate's, in ms.
inline int time_candidates(cublasLtHandle_t handle, GemmPlan& plan, const GemmArgs& g,
                           const std::vector<cublasLtMatmulHeuristicResult_t>& cands, int reps,
                           cudaStream_t stream, int* best, float* best_ms, float* first_ms) {
  void* scratch = nullptr;
  cudaError_t err = cudaMalloc(&scratch, size_t(g.m) * size_t(g.n) * 2);
  if (err != cudaSuccess) return int(err);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  *best_ms = *first_ms = 1e30f;
  *best = 0;
  for (size_t i = 0; i < cands.size(); ++i) {
    if (run_matmul(handle, plan, g, cands[i].algo, scratch, stream) != 0) continue;  // warm-up / validity
    cudaEventRecord(start, stream);
    bool ok = true;
    for (int r = 0; r < reps && ok; ++r) ok = run_matmul(handle, plan, g, cands[i].algo, scratch, stream) == 0;
    cudaEventRecord(stop, stream);
    if (cudaEventSynchronize(stop) != cudaSuccess || !ok) continue;
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    ms /= float(reps);
    if (i == 0) *first_ms = ms;
    if (ms < *best_ms) {
      *best_ms = ms;
      *best = int(i);
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(scratch);
  cudaGetLastError();  // a candidate that failed to launch must not poison the next launch's check
  return 0;
}

}  // namespace detail

inline int gemm_lt(const GemmArgs& g, cudaStream_t stream) {
  using namespace detail;
  if (g.m <= 0 || g.n <= 0 || g.k <= 0) return int(cudaErrorInvalidValue);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return int(err);

  auto& st = gemm_state();
  std::lock_guard<std::mutex> lock(st.mutex);
  cublasLtHandle_t& handle = st.handles[device];
  if (!handle) FLASHRT_LT(cublasLtCreate(&handle));

  const GemmKey key{device, g.m, g.n, g.k, int(g.dtype), int(g.epilogue), g.bias != nullptr, g.c != nullptr,
                    g.c != nullptr && g.c == g.d, g.workspace_size};
  auto& slot = st.plans[key];
  if (!slot) {
    auto plan = std::make_unique<GemmPlan>();
    if (int rc = build_plan(handle, g, *plan)) return rc;
    slot = std::move(plan);
  }
  GemmPlan& plan = *slot;
  if (int rc = set_call_pointers(plan, g)) return rc;

  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(stream, &capture);
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  const int want = std::clamp(g.autotune, 0, 5);
  if (plan.tuned_level < 0 || (want > plan.tuned_level && !capturing)) {
    cublasLtMatmulPreference_t pref;
    FLASHRT_LT(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = g.workspace_size;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    const int requested = capturing || want == 0 ? 1 : want <= 3 ? 8 : 32;
    std::vector<cublasLtMatmulHeuristicResult_t> cands(requested);
    int returned = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle, plan.op, plan.a, plan.b, plan.c, plan.d, pref,
                                                      requested, cands.data(), &returned);
    cublasLtMatmulPreferenceDestroy(pref);
    if (s != CUBLAS_STATUS_SUCCESS) return blas_error(s);
    if (returned == 0) return blas_error(CUBLAS_STATUS_NOT_SUPPORTED);
    cands.resize(returned);
    int best = 0;
    if (returned > 1) {
      float best_ms = 0.0f, first_ms = 0.0f;
      const int reps = want <= 3 ? 3 : 10;
      if (int rc = time_candidates(handle, plan, g, cands, reps, stream, &best, &best_ms, &first_ms)) return rc;
      if (const char* log = std::getenv("FLASHRT_GEMM_TUNE_LOG"); log && log[0] && log[0] != '0') {
        std::fprintf(stderr,
                     "[flashrt gemm] m=%lld n=%lld k=%lld %s autotune %d: best of %d %.2f us (#%d), first %.2f us\n",
                     (long long)g.m, (long long)g.n, (long long)g.k,
                     g.dtype == GemmDtype::kFp8E4M3 ? "fp8" : "bf16", want, returned, best_ms * 1e3, best,
                     first_ms * 1e3);
      }
    }
    plan.algo = cands[best].algo;
    plan.tuned_level = capturing ? 0 : want;
  }
  return run_matmul(handle, plan, g, plan.algo, g.d, stream);
}

#undef FLASHRT_LT

}  // namespace flashrt
