"""The attention contract between a pipeline and the hardware.

A pipeline describes every place it runs attention (a *site*: "vision", "prefix", "suffix",
...) with an :class:`AttentionSpec`. A backend owns the Q/K/V/O buffers of every site and layer
("slots"), hands their device pointers to the pipeline (which writes Q/K/V with its own kernels)
and runs attention in place. Pointers, not tensors, cross this line so that the same backend
serves torch and jax frontends, and so that a pipeline's CUDA graph can capture ``run``.

The slot layout every backend meets is documented in ``docs/attention.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from flash_rt.errors import ConfigError, InputError


@dataclass
class SiteSpec:
    """One attention site: ``num_layers`` layers of identical shape."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_q_seq: int
    max_kv_seq: int | None = None  # None -> self-attention (K/V as long as Q)
    batch_axis: int = 1
    sliding_window: int | None = None  # reserved for SWA models
    causal: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "max_q_seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SiteSpec.{name} must be a positive int, got {value!r}")
        if self.max_kv_seq is not None and (not isinstance(self.max_kv_seq, int) or self.max_kv_seq < 1):
            raise ConfigError(
                f"SiteSpec.max_kv_seq must be a positive int or None (self-attention), got {self.max_kv_seq!r}"
            )
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"SiteSpec: num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )

    @property
    def kv_capacity(self) -> int:
        """Rows of the K/V slots: ``max_kv_seq``, or ``max_q_seq`` for self-attention."""
        return self.max_q_seq if self.max_kv_seq is None else self.max_kv_seq

    @property
    def softmax_scale(self) -> float:
        """``extra["softmax_scale"]`` when a model sets one, else ``head_dim ** -0.5``."""
        return float(self.extra.get("softmax_scale", self.head_dim**-0.5))


_SITE_FIELDS = tuple(f.name for f in dataclasses.fields(SiteSpec))


@dataclass
class AttentionSpec:
    """Every attention site of a model, by name."""

    sites: dict[str, SiteSpec] = field(default_factory=dict)

    def add_site(self, name: str, **kwargs) -> AttentionSpec:
        """Add site ``name`` built from SiteSpec fields; returns self so calls chain."""
        if name in self.sites:
            raise ConfigError(f"attention site {name!r} is already defined; pick another name")
        unknown = sorted(set(kwargs) - set(_SITE_FIELDS))
        if unknown:
            raise ConfigError(
                f"add_site({name!r}): unknown field(s) {', '.join(unknown)}; "
                f"SiteSpec fields are {', '.join(_SITE_FIELDS)}"
            )
        try:
            self.sites[name] = SiteSpec(**kwargs)
        except TypeError as exc:  # a required field missing
            raise ConfigError(f"add_site({name!r}): {exc}") from None
        return self

    def site(self, name: str) -> SiteSpec:
        try:
            return self.sites[name]
        except KeyError:
            known = ", ".join(self.sites) or "(none)"
            raise ConfigError(f"unknown attention site {name!r}; this spec defines: {known}") from None


@runtime_checkable
class AttentionBackend(Protocol):
    """What a pipeline needs from an attention backend (see docs/attention.md)."""

    def sites(self) -> tuple[str, ...]: ...

    def get_slot_ptrs(self, site: str, layer_idx: int) -> dict[str, int]: ...

    def run(
        self, site: str, layer_idx: int, q_seq: int, *, kv_seq: int | None = None, stream: int = 0
    ) -> int: ...

    def head_dim(self, site: str) -> int: ...

    def num_q_heads(self, site: str) -> int: ...

    def num_kv_heads(self, site: str) -> int: ...


class AttentionBackendBase:
    """Accessor defaults and argument checks derived from an :class:`AttentionSpec`.

    Subclasses own the slots and implement ``get_slot_ptrs`` and ``run``.
    """

    def __init__(self, spec: AttentionSpec) -> None:
        if not isinstance(spec, AttentionSpec):
            raise ConfigError(f"expected an AttentionSpec, got {type(spec).__name__}")
        if not spec.sites:
            raise ConfigError("the AttentionSpec has no sites; add them with spec.add_site(name, ...)")
        self.spec = spec

    def sites(self) -> tuple[str, ...]:
        return tuple(self.spec.sites)

    def site_spec(self, site: str) -> SiteSpec:
        return self.spec.site(site)

    def head_dim(self, site: str) -> int:
        return self.spec.site(site).head_dim

    def num_q_heads(self, site: str) -> int:
        return self.spec.site(site).num_q_heads

    def num_kv_heads(self, site: str) -> int:
        return self.spec.site(site).num_kv_heads

    def get_slot_ptrs(self, site: str, layer_idx: int) -> dict[str, int]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_slot_ptrs")

    def run(
        self, site: str, layer_idx: int, q_seq: int, *, kv_seq: int | None = None, stream: int = 0
    ) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement run")

    # -- checks shared by backends ---------------------------------------------------------

    def _check_layer(self, site: str, layer_idx: int) -> SiteSpec:
        spec = self.spec.site(site)
        if not 0 <= layer_idx < spec.num_layers:
            raise InputError(
                f"layer_idx {layer_idx} out of range for site {site!r}: it has {spec.num_layers} "
                f"layers (0..{spec.num_layers - 1})"
            )
        return spec

    def _resolve_seqs(self, site: str, layer_idx: int, q_seq: int, kv_seq: int | None) -> tuple[SiteSpec, int]:
        """Validate a run() call; return the site and the K/V length to attend over.

        ``kv_seq=None`` means ``q_seq`` for a self-attention site and ``max_kv_seq`` for a
        cross-attention site.
        """
        spec = self._check_layer(site, layer_idx)
        if not 1 <= q_seq <= spec.max_q_seq:
            raise InputError(f"q_seq {q_seq} for site {site!r} must be in 1..{spec.max_q_seq} (max_q_seq)")
        if kv_seq is None:
            kv_seq = q_seq if spec.max_kv_seq is None else spec.max_kv_seq
        if not 1 <= kv_seq <= spec.kv_capacity:
            raise InputError(
                f"kv_seq {kv_seq} for site {site!r} must be in 1..{spec.kv_capacity} "
                f"({'max_kv_seq' if spec.max_kv_seq is not None else 'max_q_seq, self-attention'})"
            )
        if spec.causal and kv_seq < q_seq:
            raise InputError(
                f"causal site {site!r}: kv_seq ({kv_seq}) < q_seq ({q_seq}) would leave the first "
                "queries with no key to attend to (causal masks align the queries to the end of K/V)"
            )
        return spec, kv_seq


__all__ = ["AttentionBackend", "AttentionBackendBase", "AttentionSpec", "SiteSpec"]
