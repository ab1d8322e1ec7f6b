"""RtxFlashAttnBackend: slots in device memory, attention by ``flash_rt.flash_rt_fa2``.

Framework-neutral: the slots are :class:`~flash_rt.core.cuda_buffer.CudaBuffer` allocations,
so torch and jax frontends share one backend. The slot layout is the one every backend meets
(``docs/attention.md``); the kernel module comes from flashrt-kernels and is imported on the
first ``run``. ``FVK_RTX_FA2=0`` uses the ``flash-attn`` wheel instead (needs torch).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

from flash_rt.errors import ConfigError, HardwareError
from flash_rt.hardware.backend import AttentionBackendBase, AttentionSpec, SiteSpec

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}


class RtxFlashAttnBackend(AttentionBackendBase):
    """Q/O per site and K/V per layer in CudaBuffers; ``run`` calls FA2's forward on them."""

    def __init__(self, spec: AttentionSpec, dtype="bf16", device: int = 0) -> None:
        super().__init__(spec)
        name = str(dtype).lower().removeprefix("torch.")
        if name not in _DTYPES:
            raise ConfigError(f"{type(self).__name__} runs bf16 or fp16 attention, got dtype {dtype!r}")
        self.dtype_name = _DTYPES[name]
        self.device = int(device)
        for site_name, site in spec.sites.items():
            self._check_site(site_name, site)
        self._fa2 = None
        self._num_sms = 0
        self._slots: dict[str, dict] = {}
        for site_name, site in spec.sites.items():
            self._slots[site_name] = self._allocate(site)

    @property
    def dtype(self):
        """The slot dtype as a torch dtype when torch is importable, else its name."""
        try:
            import torch  # noqa: PLC0415
        except ImportError:
            return self.dtype_name
        return getattr(torch, self.dtype_name)

    def _check_site(self, name: str, site: SiteSpec) -> None:
        if site.causal:
            raise ConfigError(
                f"site {name!r} is causal, but flash_rt_fa2's forward has no causal mask; serve it with "
                "TorchSdpaBackend or a backend of your own"
            )
        if site.sliding_window is not None:
            raise ConfigError(f"site {name!r}: sliding_window is reserved and not implemented by {type(self).__name__}")
        if site.head_dim % 8 or site.head_dim > 256:
            raise ConfigError(f"site {name!r}: FA2 needs head_dim a multiple of 8 and <= 256, got {site.head_dim}")

    def _allocate(self, site: SiteSpec) -> dict:
        from flash_rt.core.cuda_buffer import CudaBuffer, _rt, cuda_check  # noqa: PLC0415

        if not self._num_sms:
            rt = _rt()
            self._num_sms = int(cuda_check(
                rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrMultiProcessorCount, self.device),
                "cudaDeviceGetAttribute(MultiProcessorCount)",
            ))
        q_shape = (site.max_q_seq, site.num_q_heads, site.head_dim)
        kv_shape = (site.num_layers, site.kv_capacity, site.num_kv_heads, site.head_dim)
        return {
            "Q": CudaBuffer.zeros(q_shape, self.dtype_name, self.device),
            "O": CudaBuffer.zeros(q_shape, self.dtype_name, self.device),
            "K": CudaBuffer.zeros(kv_shape, self.dtype_name, self.device),
            "V": CudaBuffer.zeros(kv_shape, self.dtype_name, self.device),
            "lse": CudaBuffer.zeros((site.num_q_heads, site.max_q_seq), "float32", self.device),
        }

    # -- protocol ----------------------------------------------------------------------------------

    def get_slot_ptrs(self, site: str, layer_idx: int) -> dict[str, int]:
        spec = self._check_layer(site, layer_idx)
        slots = self._slots[site]
        layer_bytes = spec.kv_capacity * spec.num_kv_heads * spec.head_dim * 2
        return {
            "Q": slots["Q"].ptr,
            "K": slots["K"].ptr + layer_idx * layer_bytes,
            "V": slots["V"].ptr + layer_idx * layer_bytes,
            "O": slots["O"].ptr,
        }

    def run(
        self, site: str, layer_idx: int, q_seq: int, *, kv_seq: int | None = None, stream: int = 0
    ) -> int:
        spec, kv_seq = self._resolve_seqs(site, layer_idx, q_seq, kv_seq)
        ptrs = self.get_slot_ptrs(site, layer_idx)
        if os.environ.get("FVK_RTX_FA2", "1") == "0":
            return self._run_flash_attn_wheel(spec, site, layer_idx, q_seq, kv_seq, stream)
        fa2 = self._kernels()
        fwd = fa2.fwd_bf16 if self.dtype_name == "bfloat16" else fa2.fwd_fp16
        hq, hkv, d = spec.num_q_heads, spec.num_kv_heads, spec.head_dim
        q_strides = (spec.max_q_seq * hq * d, hq * d, d)  # (batch, row, head), elements
        kv_strides = (spec.kv_capacity * hkv * d, hkv * d, d)
        status = fwd(
            ptrs["Q"], ptrs["K"], ptrs["V"], ptrs["O"], self._slots[site]["lse"].ptr, 0, 0,
            batch=1, seqlen_q=q_seq, seqlen_k=kv_seq,
            num_heads_q=hq, num_heads_kv=hkv, head_dim=d,
            q_strides=q_strides, k_strides=kv_strides, v_strides=kv_strides, o_strides=q_strides,
            softmax_scale=spec.softmax_scale, num_sms=self._num_sms, stream=int(stream),
        )
        return int(status or 0)

    def _kernels(self):
        if self._fa2 is None:
            try:
                flash_rt_fa2 = importlib.import_module("flash_rt.flash_rt_fa2")
            except ImportError as exc:
                raise HardwareError(
                    f"{type(self).__name__} needs flash_rt.flash_rt_fa2 from the flashrt-kernels package, which "
                    f"could not be imported ({exc}). Install flashrt-kernels built for this GPU, set "
                    "FVK_RTX_FA2=0 to use the flash-attn wheel, or use TorchSdpaBackend"
                ) from exc
            self._fa2 = flash_rt_fa2
        return self._fa2

    def _run_flash_attn_wheel(self, spec: SiteSpec, site: str, layer_idx: int, q_seq: int, kv_seq: int, stream: int) -> int:
        try:
            import torch  # noqa: PLC0415
            from flash_attn import flash_attn_func  # noqa: PLC0415
        except ImportError as exc:
            raise HardwareError(
                f"FVK_RTX_FA2=0 selects the flash-attn wheel, which could not be imported ({exc}); "
                "pip install flash-attn, or unset FVK_RTX_FA2 to use flashrt-kernels"
            ) from exc
        slots = self._slots[site]
        q = slots["Q"].torch()[:q_seq]
        k = slots["K"].torch()[layer_idx, :kv_seq]
        v = slots["V"].torch()[layer_idx, :kv_seq]
        on_stream = torch.cuda.stream(torch.cuda.ExternalStream(int(stream))) if stream else contextlib.nullcontext()
        with torch.cuda.device(self.device), on_stream:
            out = flash_attn_func(q[None], k[None], v[None], softmax_scale=spec.softmax_scale, causal=False)
            slots["O"].torch()[:q_seq].copy_(out[0])
        return 0

    def free(self) -> None:
        """Release the slots now (they are also released when the backend is collected)."""
        for slots in self._slots.values():
            for buf in slots.values():
                buf.free()
        self._slots.clear()


def __getattr__(name: str):
    if name == "TorchFlashAttnBackend":
        warnings.warn(
            "TorchFlashAttnBackend is a deprecated alias of RtxFlashAttnBackend (the backend is "
            "framework-neutral); it will be removed in the next major version",
            DeprecationWarning,
            stacklevel=2,
        )
        return RtxFlashAttnBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RtxFlashAttnBackend"]
