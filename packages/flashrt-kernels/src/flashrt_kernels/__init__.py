"""FlashRT's compiled CUDA kernels (also importable as ``flash_rt.flash_rt_kernels``).

Every op takes device addresses as ints, sizes, and a CUDA stream as an int; see ``ops`` for the
contract of each. Importing this module loads the extension but initialises no CUDA context.
"""

from flashrt_kernels import _C
from flashrt_kernels.ops import (
    ACTIVATIONS,
    ATTN_HEAD_DIMS,
    GEMM_WORKSPACE_BYTES,
    SKINNY_MAX_M,
    CudaError,
    NoDeviceError,
    add_rms_norm,
    amax,
    attention,
    attention_max_splits,
    attention_num_splits,
    attention_splitkv_sizes,
    bias_act,
    built_archs,
    device_count,
    error_string,
    geglu,
    gelu_tanh,
    gemm,
    gemm_cache_clear,
    gemm_cache_size,
    layer_norm,
    quantize_fp8,
    rms_norm,
    rope_qkv,
    skinny_gemm,
)

__version__ = str(_C.VERSION)

__all__ = [
    "__version__",
    "ACTIVATIONS",
    "ATTN_HEAD_DIMS",
    "GEMM_WORKSPACE_BYTES",
    "SKINNY_MAX_M",
    "CudaError",
    "NoDeviceError",
    "add_rms_norm",
    "amax",
    "attention",
    "attention_max_splits",
    "attention_num_splits",
    "attention_splitkv_sizes",
    "bias_act",
    "built_archs",
    "device_count",
    "error_string",
    "gelu_tanh",
    "geglu",
    "gemm",
    "gemm_cache_clear",
    "gemm_cache_size",
    "layer_norm",
    "quantize_fp8",
    "rms_norm",
    "rope_qkv",
    "skinny_gemm",
]
