"""Reference attention backend on ``torch.nn.functional.scaled_dot_product_attention``.

Runs on CPU and CUDA, any float dtype. It is the backend of the ``cpu`` frontends and the
yardstick every other backend is checked against (``flash_rt.testing.check_attention_backend``).
Slot layout: see ``docs/attention.md``.
"""

from __future__ import annotations

from flash_rt.errors import ConfigError, HardwareError
from flash_rt.hardware.backend import AttentionBackendBase, AttentionSpec

_DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


def torch_dtype(dtype):
    """A torch float dtype from a torch dtype or a name ("bf16", "float16", ...)."""
    import torch  # noqa: PLC0415

    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        resolved = getattr(torch, _DTYPE_NAMES[dtype.lower()])
    else:
        raise ConfigError(f"attention dtype must be bfloat16, float16 or float32 (or a torch dtype), got {dtype!r}")
    if resolved not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"attention dtype must be bfloat16, float16 or float32, got {resolved}")
    return resolved


def torch_device(device):
    """A torch.device; a CUDA device must exist."""
    import torch  # noqa: PLC0415

    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HardwareError(
            f"device {device!r} requested but torch sees no CUDA device (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); use device='cpu' or a CUDA build of torch on a GPU machine"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return resolved


def causal_mask(q_seq: int, kv_seq: int, device):
    """Boolean [q_seq, kv_seq] mask, True = attend. Queries are aligned to the END of K/V:
    query i sees keys 0 .. i + (kv_seq - q_seq), the convention of a decoder whose new queries
    follow a KV cache (and of FlashAttention-2)."""
    import torch  # noqa: PLC0415

    return torch.ones(q_seq, kv_seq, dtype=torch.bool, device=device).tril(diagonal=kv_seq - q_seq)


class TorchSdpaBackend(AttentionBackendBase):
    """Owns per-site slots as torch tensors; ``run`` computes O with torch SDPA.

    Q and O slots are shared by the layers of a site (a pipeline runs layers in order); K and
    V are per layer, since they are the KV cache a later call may reuse.
    """

    def __init__(self, spec: AttentionSpec, device="cpu", dtype=None) -> None:
        import torch  # noqa: PLC0415

        super().__init__(spec)
        self.device = torch_device(device)
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.dtype = torch_dtype(dtype)
        self._q, self._k, self._v, self._o = {}, {}, {}, {}
        for name, site in spec.sites.items():
            if site.sliding_window is not None:
                raise ConfigError(
                    f"site {name!r}: sliding_window is reserved in SiteSpec and no FlashRT backend "
                    "implements it yet; leave it None"
                )
            q_shape = (site.max_q_seq, site.num_q_heads, site.head_dim)
            kv_shape = (site.num_layers, site.kv_capacity, site.num_kv_heads, site.head_dim)
            self._q[name] = torch.zeros(q_shape, dtype=self.dtype, device=self.device)
            self._o[name] = torch.zeros(q_shape, dtype=self.dtype, device=self.device)
            self._k[name] = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
            self._v[name] = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self._streams: dict[int, object] = {}

    def slot_tensors(self, site: str, layer_idx: int) -> dict:
        """The slots of (site, layer) as torch tensors: Q/O [max_q_seq, Hq, D], K/V [kv_cap, Hkv, D]."""
        self._check_layer(site, layer_idx)
        return {
            "Q": self._q[site],
            "K": self._k[site][layer_idx],
            "V": self._v[site][layer_idx],
            "O": self._o[site],
        }

    def get_slot_ptrs(self, site: str, layer_idx: int) -> dict[str, int]:
        return {key: t.data_ptr() for key, t in self.slot_tensors(site, layer_idx).items()}

    def run(
        self, site: str, layer_idx: int, q_seq: int, *, kv_seq: int | None = None, stream: int = 0
    ) -> int:
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415

        spec, kv_seq = self._resolve_seqs(site, layer_idx, q_seq, kv_seq)
        q = self._q[site][:q_seq].transpose(0, 1)  # [Hq, q_seq, D]
        k = self._k[site][layer_idx, :kv_seq].transpose(0, 1)  # [Hkv, kv_seq, D]
        v = self._v[site][layer_idx, :kv_seq].transpose(0, 1)
        mask = None
        if spec.causal:
            mask = causal_mask(q_seq, kv_seq, self.device)
        with torch.no_grad(), self._stream_context(stream):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                scale=spec.softmax_scale,
                enable_gqa=spec.num_kv_heads != spec.num_q_heads,
            )
            self._o[site][:q_seq].copy_(out.transpose(0, 1))
        return 0

    def _stream_context(self, stream: int):
        import contextlib  # noqa: PLC0415

        import torch  # noqa: PLC0415

        if self.device.type != "cuda" or not stream:
            return contextlib.nullcontext()
        if stream not in self._streams:
            self._streams[stream] = torch.cuda.ExternalStream(stream, device=self.device)
        return torch.cuda.stream(self._streams[stream])


__all__ = ["TorchSdpaBackend", "causal_mask", "torch_dtype", "torch_device"]
