// The one binding file: integers in (device addresses, sizes, streams), status codes out.
// Argument checking and error raising live in the Python layer (flashrt_kernels/ops.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "flashrt/api.h"

namespace py = pybind11;
using namespace flashrt::api;

#ifndef FLASHRT_BUILT_ARCHS
#define FLASHRT_BUILT_ARCHS ""
#endif
#ifndef FLASHRT_VERSION
#define FLASHRT_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "FlashRT CUDA kernels (raw binding; use flashrt_kernels.ops)";
  m.attr("BUILT_ARCHS") = FLASHRT_BUILT_ARCHS;
  m.attr("VERSION") = FLASHRT_VERSION;

  m.def("error_string", &error_string, py::arg("code"));
  m.def("device_count", [] {
    int n = 0;
    int rc = device_count(&n);
    return py::make_tuple(rc, n);
  });
  m.def("device_capability", [](int device) {
    int major = 0, minor = 0;
    int rc = device_capability(device, &major, &minor);
    return py::make_tuple(rc, major, minor);
  });

  // Kernel launches release the GIL: other Python threads may run while the host enqueues work.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("norm", &norm, nogil);
  m.def("bias_act", &bias_act, nogil);
  m.def("geglu", &geglu, nogil);
  m.def("quantize_fp8", &quantize_fp8, nogil);
  m.def("amax", &amax, nogil);
  m.def("gemm", &gemm, nogil);
  m.def("gemm_cache_clear", &gemm_cache_clear);
  m.def("gemm_cache_size", &gemm_cache_size);
  m.def("skinny_gemm", &skinny_gemm, nogil);
  m.def("skinny_gemm_geglu", &skinny_gemm_geglu, nogil);
  m.def("small_linear", &small_linear, nogil);
  m.def("skinny_gemm_rope_qkv", &skinny_gemm_rope_qkv, nogil);
  m.def("rope_qkv", &rope_qkv, nogil);
  m.def("attention", &attention, nogil);
  m.def("attention_num_splits", [](int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv,
                                   int head_dim, int num_sms) {
    int splits = 1;
    int rc = attention_num_splits(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, num_sms, &splits);
    return py::make_tuple(rc, splits);
  });
  m.def("attention_max_splits", &attention_max_splits);
}
