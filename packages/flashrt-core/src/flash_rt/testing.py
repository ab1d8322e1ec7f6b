"""Test helpers for plugin authors.

``check_attention_backend(backend, spec)`` drives any :class:`AttentionBackend` through the slot
contract of ``docs/attention.md`` with random data and compares every output with attention
computed here, independently, in fp32 torch::

    from flash_rt.testing import check_attention_backend
    report = check_attention_backend(MyBackend(spec), spec, dtype="bf16", device="cuda")
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from flash_rt.hardware.backend import AttentionBackend, AttentionSpec, SiteSpec

# Default tolerances per slot dtype: |out - ref| <= atol + rtol * |ref|, element by element.
# Inputs are rounded to the slot dtype before the fp32 reference sees them, so these only
# absorb the backend's own rounding (bf16 output: 8 bits of mantissa) and summation order.
_TOLERANCES = {"bfloat16": (2e-2, 2e-2), "float16": (3e-3, 3e-3), "float32": (1e-4, 1e-4)}


@dataclass
class AttentionCase:
    site: str
    layer_idx: int
    q_seq: int
    kv_seq: int
    max_abs_err: float
    max_ref: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        return (
            f"{status} site={self.site!r} layer={self.layer_idx} q_seq={self.q_seq} kv_seq={self.kv_seq} "
            f"max_abs_err={self.max_abs_err:.3g} (max |ref| {self.max_ref:.3g}){' ' + self.note if self.note else ''}"
        )


@dataclass
class AttentionCheckReport:
    dtype: str
    device: str
    atol: float
    rtol: float
    cases: list[AttentionCase] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(case.ok for case in self.cases)

    @property
    def failures(self) -> list[AttentionCase]:
        return [case for case in self.cases if not case.ok]

    def summary(self) -> str:
        head = (
            f"attention backend check ({self.dtype} on {self.device}, atol={self.atol:g}, rtol={self.rtol:g}): "
            f"{len(self.cases) - len(self.failures)}/{len(self.cases)} cases within tolerance"
        )
        return "\n".join([head] + ["  " + case.line() for case in self.cases])


def reference_attention(q, k, v, *, scale: float, causal: bool):
    """fp32 attention written out: q [Sq, Hq, D], k/v [Skv, Hkv, D] -> [Sq, Hq, D].

    Query head h reads K/V head h // (Hq // Hkv) (grouped-query attention, heads grouped
    contiguously). Causal masks align the queries to the end of K/V.
    """
    import torch  # noqa: PLC0415

    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        sq, skv = q.shape[0], k.shape[0]
        allowed = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(diagonal=skv - sq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _tensor_at(ptr: int, shape: tuple[int, ...], dtype, device):
    """A torch view of ``prod(shape)`` elements of ``dtype`` at raw address ``ptr``."""
    import math  # noqa: PLC0415

    import torch  # noqa: PLC0415

    if not ptr:
        raise AssertionError("the backend returned a null slot pointer")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":

        class _Raw:  # exposes the bytes through the CUDA array interface
            __cuda_array_interface__ = {
                "shape": (nbytes,),
                "typestr": "|u1",
                "data": (ptr, False),
                "version": 3,
                "strides": None,
            }

        raw = torch.as_tensor(_Raw(), device=device)
    else:
        import numpy as np  # noqa: PLC0415

        raw = torch.from_numpy(np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr)))
    return raw.view(dtype).view(shape)


def _seq_cases(site: SiteSpec) -> list[tuple[int, int]]:
    """(q_seq, kv_seq) pairs: the full size, and a shorter one that checks the backend reads
    only the first kv_seq rows of K/V and writes the first q_seq rows of O."""
    full = (site.max_q_seq, site.kv_capacity)
    q_short = max(1, (site.max_q_seq * 2) // 3)
    kv_short = max(1, (site.kv_capacity * 3) // 4)
    if site.max_kv_seq is None:
        kv_short = q_short  # self-attention: K/V are as long as Q
    if site.causal:
        kv_short = max(kv_short, q_short)
    short = (q_short, kv_short)
    return [full] if short == full else [full, short]


def check_attention_backend(
    backend: AttentionBackend,
    spec: AttentionSpec,
    *,
    dtype=None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    device=None,
) -> AttentionCheckReport:
    """Check ``backend`` against fp32 attention on random data, for every site and layer.

    ``dtype`` is the slot dtype (default: ``backend.dtype``, else bfloat16); ``device`` where
    the slots live (default: ``backend.device``, else CUDA when available). For every layer the
    K/V of all layers are filled first (so aliased layers are caught), then Q is filled, O
    poisoned with NaN, the backend run and O compared. Raises AssertionError with a per-case
    report when anything is off; returns the report otherwise.
    """
    import torch  # noqa: PLC0415

    from flash_rt.hardware.sdpa_backend import torch_device, torch_dtype  # noqa: PLC0415

    missing = [
        name
        for name in ("sites", "get_slot_ptrs", "run", "head_dim", "num_q_heads", "num_kv_heads")
        if not callable(getattr(backend, name, None))
    ]
    if missing:
        raise AssertionError(
            f"{type(backend).__name__} does not implement the AttentionBackend protocol: missing {', '.join(missing)}"
        )
    backend_dtype = getattr(backend, "dtype", None)
    dtype = torch_dtype(dtype if dtype is not None else backend_dtype or torch.bfloat16)
    if isinstance(backend_dtype, torch.dtype) and backend_dtype != dtype:
        raise AssertionError(
            f"dtype={dtype} given, but the backend's slots are {backend_dtype}; pass the backend's dtype"
        )
    if device is None:
        device = getattr(backend, "device", None)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch_device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    default_atol, default_rtol = _TOLERANCES[dtype_name]
    report = AttentionCheckReport(
        dtype=dtype_name,
        device=str(device),
        atol=default_atol if atol is None else atol,
        rtol=default_rtol if rtol is None else rtol,
    )
    problems = _check_accessors(backend, spec)
    if problems:
        raise AssertionError(f"{type(backend).__name__} does not describe the spec's sites:\n  " + "\n  ".join(problems))

    gen = torch.Generator().manual_seed(seed)

    def random(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)

    for name, site in spec.sites.items():
        q_shape = (site.max_q_seq, site.num_q_heads, site.head_dim)
        kv_shape = (site.kv_capacity, site.num_kv_heads, site.head_dim)
        slots = []
        for layer in range(site.num_layers):
            ptrs = backend.get_slot_ptrs(name, layer)
            absent = {"Q", "K", "V", "O"} - set(ptrs)
            if absent:
                raise AssertionError(
                    f"get_slot_ptrs({name!r}, {layer}) has no {', '.join(sorted(absent))}; expected keys Q, K, V, O"
                )
            slots.append(
                {
                    key: _tensor_at(int(ptrs[key]), q_shape if key in "QO" else kv_shape, dtype, device)
                    for key in "QKVO"
                }
            )
        for q_seq, kv_seq in _seq_cases(site):
            # Fill every layer's K/V first: a backend whose layers alias each other fails below.
            kv_host = []
            for layer_slots in slots:
                k_host, v_host = random(kv_shape), random(kv_shape)
                layer_slots["K"].copy_(k_host)
                layer_slots["V"].copy_(v_host)
                kv_host.append((k_host, v_host))
            for layer, layer_slots in enumerate(slots):
                q_host = random(q_shape)
                layer_slots["Q"].copy_(q_host)
                layer_slots["O"].fill_(float("nan"))
                _sync(device)
                status = backend.run(name, layer, q_seq, kv_seq=kv_seq, stream=0)
                _sync(device)
                out = layer_slots["O"][:q_seq].float().cpu()
                k_host, v_host = kv_host[layer]
                ref = reference_attention(
                    q_host[:q_seq], k_host[:kv_seq], v_host[:kv_seq], scale=site.softmax_scale, causal=site.causal
                )
                report.cases.append(_compare(name, layer, q_seq, kv_seq, out, ref, status, report))
    if not report.ok:
        raise AssertionError(report.summary())
    return report


def _check_accessors(backend, spec: AttentionSpec) -> list[str]:
    problems = []
    have = tuple(backend.sites())
    for name, site in spec.sites.items():
        if name not in have:
            problems.append(f"site {name!r} missing from backend.sites() = {have}")
            continue
        for accessor in ("head_dim", "num_q_heads", "num_kv_heads"):
            got = getattr(backend, accessor)(name)
            if got != getattr(site, accessor):
                problems.append(f"{accessor}({name!r}) = {got}, spec says {getattr(site, accessor)}")
    return problems


def _compare(site, layer, q_seq, kv_seq, out, ref, status, report) -> AttentionCase:
    import torch  # noqa: PLC0415

    max_ref = float(ref.abs().max())
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        bad_row = int((~finite).flatten(1).any(dim=1).nonzero()[0])
        return AttentionCase(site, layer, q_seq, kv_seq, float("nan"), max_ref, False,
                             f"non-finite output from row {bad_row} (O left unwritten, or NaN/Inf computed)")
    err = (out - ref).abs()
    within = bool((err <= report.atol + report.rtol * ref.abs()).all())
    note = ""
    if status != 0:
        within = False
        note = f"run() returned {status!r}, expected 0"
    return AttentionCase(site, layer, q_seq, kv_seq, float(err.max()), max_ref, within, note)


def _sync(device) -> None:
    if device.type == "cuda":
        import torch  # noqa: PLC0415

        torch.cuda.synchronize(device)


__all__ = ["check_attention_backend", "reference_attention", "AttentionCheckReport", "AttentionCase"]
