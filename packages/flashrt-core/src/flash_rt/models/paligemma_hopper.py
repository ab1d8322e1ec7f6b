"""The PaliGemma + action-expert fast path Pi0 and Pi0.5 share (Hopper, sm_90; any CUDA GPU with
FP8 for ``use_fp8``): one CUDA graph per prompt length for the whole call.

Built from a reference-format state_dict (openpi-PyTorch names) and a ``PiConfig``. At load the
weights are prepared once:
  * SigLIP LayerNorm gamma/beta and Gemma RMSNorm (1 + w) folded into the next GEMM's weights;
  * q/k/v fused into one GEMM, gate/up fused into one GEMM;
  * the Euler dt folded into ``action_out_proj`` (by the model's suffix);
  * with ``use_fp8`` the big GEMMs' weights quantised to E4M3 with per-tensor scales
    (activation scales come from calibration, see ``calibrate_current`` / ``set_act_amax``).

Buffers are static: images in, token ids, the residual streams, the prefix KV cache (one buffer
sized for the longest prompt; a prompt-length bucket uses a view of it), x_t, actions out. A
bucket = one prompt length = one captured graph (vision -> prefix KV -> all denoise steps), so
replay runs no Python per layer and allocates nothing; ``infer`` syncs once, on the final D2H.
Graphs are cached per length and ``warm_buckets`` prewarms a set of lengths.

The same code runs on the CPU in fp32 (eager, no graphs): that is how its logic is tested against
the reference without a GPU. ``PaliGemmaHopperPipeline`` is the shared machinery (SigLIP, the Gemma
prefix, the expert layer loop, buckets, graphs, FP8 calibration); each model package adds its
suffix (flashrt_pi05.pipeline_hopper, flashrt_pi0.pipeline_hopper). Imports torch: nothing in
``import flash_rt`` imports this module.
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from flash_rt.errors import CalibrationError, ConfigError, HardwareError, InputError
from flash_rt.models.camera_input import CameraLayout
from flash_rt.models.hopper_ops import (
    FP8_MAX,
    Linear,
    default_ops,
    geglu_row_order,
    make_linear,
    reorder_rows,
    rope_row_order,
)
from flash_rt.models.pi_preprocess import resize_with_pad

VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
PROJECTOR = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear."
LLM = "paligemma_with_expert.paligemma.model.language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."

ROPE_MAX_WAVELENGTH = 10_000.0
JOINT_SITE = "joint"
TIME_MIN_PERIOD, TIME_MAX_PERIOD = 4e-3, 4.0
_CAMERA_LAYOUTS_WARN = 4  # distinct sets of camera sizes before stage_images warns (each captures)
_GPU_RESIZE_MAX_SHRINK = 16


def euler_times(num_steps: int) -> list[float]:
    """openpi's loop: t starts at 1 (noise), t += dt in fp32 while t >= -dt/2."""
    dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
    t = torch.tensor(1.0, dtype=torch.float32)
    times = []
    while t >= -dt / 2:
        times.append(float(t))
        t = t + dt
    return times


def time_embedding(t: float, dim: int) -> torch.Tensor:
    """sin/cos embedding of t with periods min * (max/min) ** linspace(0, 1, dim/2), in fp64."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = TIME_MIN_PERIOD * (TIME_MAX_PERIOD / TIME_MIN_PERIOD) ** fraction
    angle = 2.0 * math.pi * t / period
    return torch.cat([torch.sin(angle), torch.cos(angle)]).to(torch.float32)


def rope_tables(num_positions: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    half = head_dim // 2
    inv_freq = ROPE_MAX_WAVELENGTH ** (-torch.arange(half, dtype=torch.float64) * 2.0 / head_dim)
    angle = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return (torch.cos(angle).float().to(device).contiguous(), torch.sin(angle).float().to(device).contiguous())


@dataclass
class VisionLayer:
    qkv: Linear
    o: Linear
    fc1: Linear
    fc2: Linear


@dataclass
class GemmaLayer:
    qkv: Linear
    o: Linear | None  # None (and the MLP too): the last prefix layer, whose only product is its K/V
    gate_up: Linear | None
    down: Linear | None


@dataclass
class Bucket:
    """Everything that depends on one prompt length: the ids buffer and its graphs."""

    length: int
    ids: torch.Tensor
    # "full" | "denoise" | "vision" | "prefix"; the image-reading ones of a camera layout
    # (camera_input.py) carry its sizes: "full@480x640+480x640"
    graphs: dict = field(default_factory=dict)
    capture_s: dict = field(default_factory=dict)


class PaliGemmaHopperPipeline:
    """The machinery Pi0 and Pi0.5 share: SigLIP, the Gemma prefix with its KV cache, the
    expert layer loop, buckets, graphs, FP8 calibration. Subclasses define the suffix."""

    suffix_extra_tokens = 0  # Pi0: its state token sits between the prefix and the actions
    # With use_fp8: the GEMMs (patterns over Linear names, fnmatch: "vision.*", "llm.*.qkv") that
    # stay bf16 because FP8's error enters the result there undiluted; data, set per model.
    # Measured and argued in docs/calibration.md ("Which GEMMs run FP8").
    fp8_keep_bf16: tuple[str, ...] = ()

    def __init__(
        self,
        state_dict: dict,
        config,
        *,
        num_views: int = 2,
        num_steps: int | None = None,
        use_fp8: bool = True,
        device=None,
        act_dtype: torch.dtype | None = None,
        vision_pool_factor: int | None = None,
        vision_num_layers: int | None = None,
        max_prompt_len: int | None = None,
        ops="auto",
        use_graphs: bool | None = None,
        attention_backend=None,
        fp8_keep_bf16=None,
    ):
        self.config = config
        if fp8_keep_bf16 is not None:  # None: the model's list
            self.fp8_keep_bf16 = tuple(str(p) for p in fp8_keep_bf16)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.is_cuda = self.device.type == "cuda"
        self.act_dtype = act_dtype or (torch.bfloat16 if self.is_cuda else torch.float32)
        self.use_fp8 = bool(use_fp8)
        self.use_graphs = self.is_cuda if use_graphs is None else bool(use_graphs)
        if self.use_graphs and not self.is_cuda:
            raise ConfigError("CUDA graphs need a CUDA device; pass use_graphs=False on the CPU")
        # FLASHRT_GRAPH_STAGES=1 (a measurement switch): a call replays its three stage graphs (vision,
        # prefix, denoise) instead of one graph of all three, so the GPU can start on vision while the
        # host still launches the rest; what it costs: no PDL overlap across the two stage boundaries
        self.graph_stages = os.environ.get("FLASHRT_GRAPH_STAGES", "0") == "1"
        if num_views not in (1, 2, 3):
            raise ConfigError(f"num_views must be 1, 2 or 3; got {num_views!r}")
        self.num_views = num_views
        self.num_steps = int(num_steps or config.num_steps)
        self.pool = int(vision_pool_factor or 1)
        vdims = config.vision
        grid = vdims.image_size // vdims.patch_size
        if self.pool not in (1, 2, 4) or grid % self.pool:
            raise ConfigError(f"vision_pool_factor must be 1, 2 or 4 and divide the {grid}x{grid} patch grid; got {self.pool}")
        self.vision_layers_used = int(vision_num_layers or vdims.depth)
        if not 1 <= self.vision_layers_used <= vdims.depth:
            raise ConfigError(f"vision_num_layers must be in [1, {vdims.depth}]; got {vision_num_layers!r}")
        self.ops = default_ops(self.device, self.act_dtype, ops) if ops is None or isinstance(ops, str) else ops
        self.grid = grid
        self.tokens_per_view = (grid // self.pool) ** 2
        self.num_image_tokens = num_views * self.tokens_per_view
        self.max_prompt_len = int(max_prompt_len or config.max_token_len)
        self.horizon = config.action_horizon
        self.max_prefix = self.num_image_tokens + self.max_prompt_len
        self.max_total = self.max_prefix + self.suffix_extra_tokens + self.horizon

        self.attention_backend = attention_backend  # None: the ops' own attention (fastest)
        sd = _StateDict(state_dict, self.device)
        with torch.no_grad():
            self._prepare_vision(sd)
            self._prepare_llm(sd)
            self._prepare_expert(sd)
            self._prepare_suffix(sd)
        sd.check_consumed()
        self._check_fp8_keep_bf16()
        self._allocate_buffers()

        self.buckets: dict[int, Bucket] = {}
        self.current: Bucket | None = None
        self.calibrated = not self.fp8_linears()
        self.captures = 0  # graphs captured so far (tests check reuse)
        self._graph_pool = None
        self._stream = None
        self._sdpa_backends = None
        self.camera = None  # the CameraLayout of the staged images; None: images_host holds them, resized
        self._camera_layouts: dict[tuple, CameraLayout] = {}

    # ------------------------------------------------------------------ weight preparation
    def _lin(self, name, weight, bias=None, *, fp8=True, dtype=None, row_order=None) -> Linear:
        """row_order: None, or (kind, order) to permute the rows for a fused GEMM epilogue."""
        if row_order is not None:
            weight, bias = reorder_rows(weight, bias, row_order[1])
        lin = make_linear(
            name, weight, bias, act_dtype=dtype or self.act_dtype, device=self.device,
            fp8=fp8 and self.use_fp8 and dtype is None and not self.keeps_bf16(name),
        )
        if row_order is not None:
            lin.row_order = row_order[0]
            lin.inverse_order = torch.argsort(row_order[1]).to(self.device)
        return lin

    def keeps_bf16(self, name: str) -> bool:
        """Whether the GEMM ``name`` stays bf16 under use_fp8 (``fp8_keep_bf16``)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.fp8_keep_bf16)

    def _check_fp8_keep_bf16(self):
        """A pattern that matches no GEMM is a typo that would silently leave layers in FP8."""
        names = [lin.name for lin in self._all_linears()]
        unused = [p for p in self.fp8_keep_bf16 if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused:
            raise ConfigError(
                f"fp8_keep_bf16 patterns {unused} match no GEMM of this pipeline; GEMM names look like "
                f"{names[:2]} ... {names[-2:]} (fnmatch patterns, e.g. 'vision.*', 'llm.*.qkv')"
            )

    def _prepare_vision(self, sd):
        v = self.config.vision
        patch = sd.take(VISION + "embeddings.patch_embedding.weight")  # (W, 3, p, p)
        self.patch_embed = self._lin(
            "vision.patch", patch.reshape(v.width, -1), sd.take(VISION + "embeddings.patch_embedding.bias"), fp8=False
        )
        pos = sd.take(VISION + "embeddings.position_embedding.weight").float()
        self.vision_pos = pos.to(self.device).repeat(self.num_views, 1).contiguous()  # (V * 256, W)
        self.vision = []
        for i in range(v.depth):
            p = VISION + f"encoder.layers.{i}."
            if i >= self.vision_layers_used:
                sd.skip_prefix(p)
                continue
            g1, b1 = sd.take(p + "layer_norm1.weight"), sd.take(p + "layer_norm1.bias")
            g2, b2 = sd.take(p + "layer_norm2.weight"), sd.take(p + "layer_norm2.bias")
            qkv_w = torch.cat([sd.take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            qkv_b = torch.cat([sd.take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            fc1_w, fc1_b = sd.take(p + "mlp.fc1.weight"), sd.take(p + "mlp.fc1.bias")
            self.vision.append(VisionLayer(
                qkv=self._lin(f"vision.{i}.qkv", *_fold_layer_norm(qkv_w, qkv_b, g1, b1)),
                o=self._lin(f"vision.{i}.o", sd.take(p + "self_attn.out_proj.weight"), sd.take(p + "self_attn.out_proj.bias")),
                fc1=self._lin(f"vision.{i}.fc1", *_fold_layer_norm(fc1_w, fc1_b, g2, b2)),
                fc2=self._lin(f"vision.{i}.fc2", sd.take(p + "mlp.fc2.weight"), sd.take(p + "mlp.fc2.bias")),
            ))
        g, b = sd.take(VISION + "post_layernorm.weight"), sd.take(VISION + "post_layernorm.bias")
        self.projector = self._lin(
            "vision.projector", *_fold_layer_norm(sd.take(PROJECTOR + "weight"), sd.take(PROJECTOR + "bias"), g, b), fp8=False
        )

    def _prepare_llm(self, sd):
        d = self.config.paligemma
        self.embed = sd.take(LLM + "embed_tokens.weight").to(self.device, self.act_dtype)
        self.embed_scale = math.sqrt(d.width)
        self.llm = []
        for i in range(d.depth):
            p = LLM + f"layers.{i}."
            w_in = 1.0 + sd.take(p + "input_layernorm.weight").float()
            w_post = 1.0 + sd.take(p + "post_attention_layernorm.weight").float()
            q, k, v = (sd.take(p + f"self_attn.{n}_proj.weight").float() * w_in for n in "qkv")
            if i == d.depth - 1:  # only this layer's K/V are ever read (by the suffix)
                for n in ("o_proj", "gate_proj", "up_proj", "down_proj"):
                    sd.skip(p + ("self_attn." if n == "o_proj" else "mlp.") + n + ".weight")
                self.llm.append(GemmaLayer(self._lin(f"llm.{i}.qkv", torch.cat([q, k, v])), None, None, None))
                continue
            gate_up = torch.cat([sd.take(p + "mlp.gate_proj.weight").float(), sd.take(p + "mlp.up_proj.weight").float()]) * w_post
            self.llm.append(GemmaLayer(
                qkv=self._lin(f"llm.{i}.qkv", torch.cat([q, k, v])),
                o=self._lin(f"llm.{i}.o", sd.take(p + "self_attn.o_proj.weight")),
                gate_up=self._lin(f"llm.{i}.gate_up", gate_up),
                down=self._lin(f"llm.{i}.down", sd.take(p + "mlp.down_proj.weight")),
            ))
        sd.skip(LLM + "norm.weight")  # the prefix's final norm feeds nothing at inference

    def _expert_norm_weight(self, sd, key) -> torch.Tensor | None:
        """Pi0: the (1 + w) to fold; Pi0.5 (adaptive norms): None."""
        raise NotImplementedError

    def _prepare_expert(self, sd):
        d = self.config.expert
        # The compiled kernels fuse RoPE into the QKV GEMM and GeGLU into the gate/up GEMM when the
        # weight rows come in the order their epilogues read (the 50-row expert GEMMs only).
        fused = self.ops.fused_epilogues
        qkv_order = ("rope", rope_row_order(d.num_heads, d.num_kv_heads, d.head_dim)) if fused else None
        gate_up_order = ("geglu", geglu_row_order(d.mlp_dim)) if fused else None
        self.expert = []
        for i in range(d.depth):
            p = EXPERT + f"layers.{i}."
            w_in = self._expert_norm_weight(sd, p + "input_layernorm")
            w_post = self._expert_norm_weight(sd, p + "post_attention_layernorm")
            qkv = torch.cat([sd.take(p + f"self_attn.{n}_proj.weight").float() for n in "qkv"])
            gate_up = torch.cat([sd.take(p + "mlp.gate_proj.weight").float(), sd.take(p + "mlp.up_proj.weight").float()])
            if w_in is not None:
                qkv, gate_up = qkv * w_in, gate_up * w_post
            self.expert.append(GemmaLayer(
                qkv=self._lin(f"expert.{i}.qkv", qkv, row_order=qkv_order),
                o=self._lin(f"expert.{i}.o", sd.take(p + "self_attn.o_proj.weight")),
                gate_up=self._lin(f"expert.{i}.gate_up", gate_up, row_order=gate_up_order),
                down=self._lin(f"expert.{i}.down", sd.take(p + "mlp.down_proj.weight")),
            ))

    def _prepare_suffix(self, sd):
        raise NotImplementedError

    # ------------------------------------------------------------------ buffers
    def _allocate_buffers(self):
        c, dev = self.config, self.device
        llm, exp = c.paligemma, c.expert
        if (llm.num_kv_heads, llm.head_dim) != (exp.num_kv_heads, exp.head_dim):
            raise ConfigError("the prefix and the expert must share num_kv_heads and head_dim (joint attention)")
        f32 = torch.float32
        # uint8 in: 4x less H2D than float, and the [-1, 1] scaling runs inside the graph
        self.images = torch.empty((self.num_views, c.vision.image_size, c.vision.image_size, 3), device=dev, dtype=torch.uint8)
        self.noise = torch.empty((self.horizon, c.action_dim), device=dev, dtype=f32)
        self.x_t = torch.empty_like(self.noise)
        self.actions = torch.empty_like(self.noise)
        res = self.ops.residual_dtype  # fp32 with torch ops; bf16 with the compiled kernels
        self.prefix_x = torch.empty((self.max_prefix, llm.width), device=dev, dtype=res)
        self._allocate_suffix(res)
        self.vision_x = torch.empty((self.num_views * c.vision.num_patches, c.vision.width), device=dev, dtype=res)
        if self.attention_backend is None:
            cache_shape = (llm.depth, self.max_total, llm.num_kv_heads, llm.head_dim)
            self.k_cache = torch.empty(cache_shape, device=dev, dtype=self.act_dtype)
            self.v_cache = torch.empty(cache_shape, device=dev, dtype=self.act_dtype)
            self.k_layers, self.v_layers = list(self.k_cache), list(self.v_cache)
        else:  # the KV cache is the backend's K/V slots of the joint site
            self._bind_attention_backend()
        self.rope_cos, self.rope_sin = rope_tables(self.max_total, llm.head_dim, dev)
        # Host side of the call's inputs and output, pinned: the stages copy them in and out
        # themselves (run_vision the images, run_prefix the ids, run_denoise the noise and the
        # actions), so the graph holds the copies and a call launches one graph and nothing else.
        # The host writes them only between calls (infer() returns after its sync).
        pin = self.is_cuda
        self.images_host = torch.empty(tuple(self.images.shape), dtype=torch.uint8, pin_memory=pin)
        self.noise_host = torch.empty(tuple(self.noise.shape), dtype=f32, pin_memory=pin)
        self.ids_host = torch.empty((self.max_prompt_len,), dtype=torch.int64, pin_memory=pin)
        self.actions_host = torch.empty(tuple(self.actions.shape), dtype=f32, pin_memory=pin)
        if self.is_cuda:
            # bracket each call's GPU work (graph, copies included): last_call_gpu_ms() tells a
            # slow call's GPU time from its host time, at the cost of two event records
            self._call_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        # host clock (time.perf_counter) at infer()'s entry, after the graph launch returned, after
        # the sync returned, at its return: last_call_host_marks()
        self._host_marks = (0.0, 0.0, 0.0, 0.0)

    def _allocate_suffix(self, dtype):
        """The expert's residual stream: suffix_rows holds [extra tokens (Pi0's state); actions],
        suffix_x is its action rows (every step after the first runs those alone)."""
        rows = self.suffix_extra_tokens + self.horizon
        self.suffix_rows = torch.empty((rows, self.config.expert.width), device=self.device, dtype=dtype)
        self.suffix_x = self.suffix_rows[self.suffix_extra_tokens :]

    def buffer_bytes(self) -> int:
        bufs = [self.images, self.noise, self.x_t, self.actions, self.prefix_x, self.suffix_rows, self.vision_x,
                *self.k_layers, *self.v_layers]
        return sum(b.numel() * b.element_size() for b in bufs)

    # ------------------------------------------------------------------ stages (eager = capture)
    def prefix_len(self, bucket: Bucket) -> int:
        return self.num_image_tokens + bucket.length

    @torch.no_grad()
    def run_vision(self):
        """images (V, 224, 224, 3) uint8 -> [-1, 1] -> prefix_x[:num_image_tokens] (projected tokens)."""
        ops, v, nv = self.ops, self.config.vision, self.num_views
        p, g = v.patch_size, self.grid
        if self.camera is None:
            self.images.copy_(self.images_host, non_blocking=True)
        else:  # camera-size images: copied in and resized on the device
            self.camera.copy_in(self.images)
        pixels = self.images.float() / 255.0 * 2.0 - 1.0
        patches = pixels.reshape(nv, g, p, g, p, 3).permute(0, 1, 3, 5, 2, 4).reshape(nv * g * g, 3 * p * p)
        x = self.vision_x
        x.copy_(ops.linear(patches.to(self.act_dtype), self.patch_embed).float() + self.vision_pos)
        y = None  # the pending residual: each norm adds the previous block's output first
        for layer in self.vision:
            qkv = ops.linear(ops.layer_norm(x, lin=layer.qkv, y=y), layer.qkv)
            attn = ops.vision_attention(qkv, nv, g * g, v.num_heads)
            y = ops.linear(attn, layer.o)
            h = ops.layer_norm(x, lin=layer.fc1, y=y)
            y = ops.linear(ops.linear(h, layer.fc1, act="gelu_tanh", out_for=layer.fc2), layer.fc2)
        h = ops.layer_norm(x, lin=self.projector, y=y)
        if self.pool > 1:  # average f x f patches of each image's grid (after the norm, as the reference)
            grid = h.float().view(nv, g, g, -1).permute(0, 3, 1, 2)
            pooled = torch.nn.functional.avg_pool2d(grid, self.pool)
            h = pooled.permute(0, 2, 3, 1).reshape(self.num_image_tokens, -1).to(self.act_dtype)
        self.prefix_x[: self.num_image_tokens].copy_(ops.linear(h, self.projector))

    @torch.no_grad()
    def run_prefix(self, bucket: Bucket):
        """Prompt embedding + the Gemma prefix; writes every layer's K/V for [0, P)."""
        ops, d = self.ops, self.config.paligemma
        n_img, n = self.num_image_tokens, self.prefix_len(bucket)
        x = self.prefix_x[:n]
        bucket.ids.copy_(self.ids_host[: bucket.length], non_blocking=True)
        x[n_img:].copy_(torch.nn.functional.embedding(bucket.ids, self.embed).float() * self.embed_scale)
        y = None
        for i, layer in enumerate(self.llm):
            h = ops.rms_norm(x, lin=layer.qkv, y=y)
            q = self._rope_qkv(ops.linear(h, layer.qkv), i, 0, n, d.num_heads)
            if layer.o is None:  # last layer: only its K/V are ever read (by the suffix)
                break
            y = ops.linear(self._attend(q, i, n, out_for=layer.o), layer.o)
            h = ops.rms_norm(x, lin=layer.gate_up, y=y)
            y = ops.linear(ops.geglu(ops.linear(h, layer.gate_up), out_for=layer.down), layer.down)

    def _rope_qkv(self, qkv, layer, start, n, num_heads):
        return self.ops.rope_qkv(qkv, **self._rope_args(layer, start, n, num_heads))

    def _rope_args(self, layer, start, n, num_heads) -> dict:
        return dict(num_heads=num_heads, k_cache=self.k_layers[layer], v_cache=self.v_layers[layer], start=start,
                    cos=self.rope_cos[start : start + n], sin=self.rope_sin[start : start + n])

    def _attend(self, q, layer, kv_len, out_for=None, static_keys=0):
        """q (T, H, D) over the first kv_len cached keys of ``layer`` -> (T, H * D), in the format
        ``out_for`` (the GEMM that reads it) takes where the ops can write that directly. Keys
        [0, static_keys) were written before the op that wrote q (the kernels load them earlier)."""
        if self.attention_backend is None:
            return self.ops.attention(q, self.k_layers[layer][:kv_len], self.v_layers[layer][:kv_len], out_for=out_for,
                                      static_keys=static_keys)
        t = q.shape[0]
        self.q_slot[:t].copy_(q)
        stream = torch.cuda.current_stream().cuda_stream if self.is_cuda else 0
        rc = self.attention_backend.run(JOINT_SITE, layer, t, kv_seq=kv_len, stream=stream)
        if rc:
            raise HardwareError(f"{type(self.attention_backend).__name__}.run({JOINT_SITE!r}, {layer}) returned {rc}")
        return self.o_slot[:t].reshape(t, -1)

    # ------------------------------------------------------------------ AttentionBackend protocol
    def attention_spec(self):
        """The pipeline's attention site for a pluggable ``AttentionBackend``: "joint", one
        attention per Gemma layer over [prefix ; suffix] (the LLM and the expert share it), whose
        K/V slots are the KV cache. The prefix runs it with q_seq = kv_seq = P; a denoise step
        with q_seq = 50 rows of Q (its own K/V written at rows P..P+49) and kv_seq = P + 50.
        SigLIP's per-image attention stays with the ops."""
        from flash_rt.hardware.backend import AttentionSpec  # noqa: PLC0415

        d = self.config.paligemma
        return AttentionSpec().add_site(
            JOINT_SITE, num_layers=d.depth, num_q_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
            head_dim=d.head_dim, max_q_seq=self.max_prefix, max_kv_seq=self.max_total,
        )

    def _bind_attention_backend(self):
        backend, d = self.attention_backend, self.config.paligemma
        if JOINT_SITE not in backend.sites():
            raise ConfigError(
                f"the attention backend has sites {backend.sites()}; the Pi pipeline needs {JOINT_SITE!r}: build "
                "it from pipeline.attention_spec() (or an AttentionSpec with the same site)"
            )
        want = (d.num_heads, d.num_kv_heads, d.head_dim)
        got = (backend.num_q_heads(JOINT_SITE), backend.num_kv_heads(JOINT_SITE), backend.head_dim(JOINT_SITE))
        if got != want:
            raise ConfigError(f"attention backend site {JOINT_SITE!r} has (q heads, kv heads, head_dim) {got}; need {want}")
        hd, hq, hkv = d.head_dim, d.num_heads, d.num_kv_heads
        self.k_layers, self.v_layers = [], []
        for layer in range(d.depth):
            slots = self._slots(layer)
            self.k_layers.append(slots["K"][: self.max_total].view(self.max_total, hkv, hd))
            self.v_layers.append(slots["V"][: self.max_total].view(self.max_total, hkv, hd))
        slots = self._slots(0)
        self.q_slot = slots["Q"][: self.max_prefix].view(self.max_prefix, hq, hd)
        self.o_slot = slots["O"][: self.max_prefix].view(self.max_prefix, hq, hd)

    def _slots(self, layer) -> dict:
        """The backend's slots of the joint site as tensors (torch backends hand them out;
        others give device pointers, wrapped here through __cuda_array_interface__)."""
        backend = self.attention_backend
        if hasattr(backend, "slot_tensors"):
            slots = backend.slot_tensors(JOINT_SITE, layer)
            bad = [k for k, t in slots.items() if t.dtype != self.act_dtype or t.device.type != self.device.type]
            if bad:
                raise ConfigError(
                    f"attention backend slots {bad} are {slots[bad[0]].dtype} on {slots[bad[0]].device}; the "
                    f"pipeline computes in {self.act_dtype} on {self.device}"
                )
            return slots
        if not self.is_cuda:
            raise ConfigError("a pointer-only attention backend needs a CUDA pipeline")
        d = self.config.paligemma
        ptrs = backend.get_slot_ptrs(JOINT_SITE, layer)
        q_rows, kv_rows = self.max_prefix, self.max_total
        shapes = {"Q": (q_rows, d.num_heads, d.head_dim), "O": (q_rows, d.num_heads, d.head_dim),
                  "K": (kv_rows, d.num_kv_heads, d.head_dim), "V": (kv_rows, d.num_kv_heads, d.head_dim)}
        return {k: _device_tensor(ptrs[k], shapes[k], self.act_dtype, self.device) for k in shapes}

    def expert_layers(self, x, start, step, *, head_rows=0):
        """The expert over suffix tokens x (residual stream, in place) at cache positions
        [start, start+T), attending to the whole cache [0, start+T); the first ``head_rows`` rows
        (Pi0's state token, in the first step) attend to [0, start + head_rows) only. ``step``
        selects the per-step modulation. Returns the pending (output, gate) of the last block, for
        the final norm."""
        ops, d = self.ops, self.config.expert
        y = gate = None
        for i, layer in enumerate(self.expert):
            h = self.expert_norm(x, step, i, 0, lin=layer.qkv, y=y, gate=gate)
            q = ops.linear_rope_qkv(h, layer.qkv, **self._rope_args(i, start, x.shape[0], d.num_heads))
            y = ops.linear(self._attend_suffix(q, i, start, head_rows, out_for=layer.o), layer.o)
            h = self.expert_norm(x, step, i, 1, lin=layer.gate_up, y=y, gate=self.expert_gate(step, i, 0))
            y = ops.linear(ops.linear_geglu(h, layer.gate_up, out_for=layer.down), layer.down)
            gate = self.expert_gate(step, i, 1)
        return y, gate

    def _attend_suffix(self, q, layer, start, head_rows, out_for=None):
        """The suffix's attention: every row over [0, start + T), except the first ``head_rows``,
        which see [0, start + head_rows) (two calls, their outputs stacked)."""
        end = start + q.shape[0]  # the cache up to start is the prefix (and earlier rows): not this step's QKV GEMM's
        if head_rows == 0:
            return self._attend(q, layer, end, out_for=out_for, static_keys=start)
        head = self._attend(q[:head_rows], layer, start + head_rows, out_for=out_for, static_keys=start)
        if self.attention_backend is not None:
            head = head.clone()  # the backend's O slot is reused by the next call
        rest = self._attend(q[head_rows:], layer, end, out_for=out_for, static_keys=start)
        if head.dtype == torch.float8_e4m3fn:  # cat has no FP8 kernel: stack the bytes
            return torch.cat([head.view(torch.uint8), rest.view(torch.uint8)]).view(head.dtype)
        return torch.cat([head, rest])

    def expert_norm(self, x, step, layer, which, *, lin, y, gate):
        raise NotImplementedError

    def expert_gate(self, step, layer, which):
        """The residual gate after block ``which`` of ``layer`` (None: a plain residual)."""
        return None

    def denoise_delta(self, bucket: Bucket, step: int, *, out=None, accumulate=False) -> torch.Tensor:
        """dt * v(x_t, t_step) (dt is folded into action_out_proj), (H, action_dim) fp32; written
        into ``out`` (added to it with ``accumulate``) by the final GEMM itself when given."""
        raise NotImplementedError

    @torch.no_grad()
    def run_denoise(self, bucket: Bucket):
        self.noise.copy_(self.noise_host, non_blocking=True)
        self.x_t.copy_(self.noise)
        for step in range(self.num_steps):  # the Euler step x_t += dt * v, fused into the last GEMM
            self.denoise_delta(bucket, step, out=self.x_t, accumulate=True)
        self.actions.copy_(self.x_t)
        self.actions_host.copy_(self.actions, non_blocking=True)

    @torch.no_grad()
    def run_all(self, bucket: Bucket):
        self.run_vision()
        self.run_prefix(bucket)
        self.run_denoise(bucket)

    @torch.no_grad()
    def velocity(self, bucket: Bucket, x_t: torch.Tensor, step: int) -> torch.Tensor:
        """v(x_t, t_step) on the current prefix cache (eager; for stage tests)."""
        saved = self.x_t.clone()
        self.x_t.copy_(x_t)
        delta = self.denoise_delta(bucket, step).clone()
        self.x_t.copy_(saved)
        return delta / self.dt

    @property
    def dt(self) -> float:
        return -1.0 / self.num_steps

    # ------------------------------------------------------------------ buckets and graphs
    def set_prompt_tokens(self, ids) -> Bucket:
        """Select (or create) the bucket for len(ids) and stage the ids for the next call (host only:
        run_prefix copies them in)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = int(ids.shape[0])
        if not 1 <= n <= self.max_prompt_len:
            raise InputError(
                f"prompt is {n} tokens; this pipeline takes 1..{self.max_prompt_len} (max_token_len); "
                "shorten the prompt or load with a larger max_prompt_len"
            )
        bucket = self.buckets.get(n)
        if bucket is None:
            bucket = Bucket(n, torch.empty((n,), dtype=torch.int64, device=self.device))
            self.buckets[n] = bucket
        self.ids_host.numpy()[:n] = ids
        self.current = bucket
        return bucket

    def bucket_ids_match(self, bucket: Bucket, ids) -> bool:
        """Whether the next call runs ``bucket`` on exactly ``ids`` (the staged ids, which its
        run_prefix copies in; for tests and debugging)."""
        return bucket is self.current and self.ids_host[: bucket.length].tolist() == [int(i) for i in ids]

    def load_inputs(self, images, noise, state=None):
        """Stage one observation for the next call (host only; the stages copy it in): images
        (V, S, S, 3) uint8 (already resized), noise (H, action_dim), Pi0's state. The frontend
        writes images_host / noise_host in place instead and calls load_state()."""
        self.images_host.copy_(torch.as_tensor(images).reshape(self.images_host.shape))
        self.camera = None
        self.noise_host.copy_(torch.as_tensor(noise).reshape(self.noise_host.shape))
        if state is not None:
            self.load_state(state)

    def stage_images(self, images: list[np.ndarray]):
        """Stage one observation's images (host only): (H, W, 3) uint8 each, validated, any size.
        At the model's size they go to images_host; otherwise the graph resizes them on the device
        (camera_input.py), with the graphs of their layout, captured on its first call."""
        size = self.config.vision.image_size
        # torch's antialiased CUDA resize needs shared memory that grows with the shrink factor and
        # refuses extreme ones (941 -> 10 fails, pytorch/vision#7671; 16 is a margin, not a measured
        # limit): those images (wider or taller than 16 x 224) are resized here
        images = [resize_with_pad(image, size) if max(image.shape[:2]) > _GPU_RESIZE_MAX_SHRINK * size else image
                  for image in images]
        shapes = tuple((int(image.shape[0]), int(image.shape[1])) for image in images)
        if all(shape == (size, size) for shape in shapes):
            host = self.images_host.numpy()
            for i, image in enumerate(images):
                host[i] = image
            self.camera = None
            return
        layout = self._camera_layouts.get(shapes)
        if layout is None:
            if len(self._camera_layouts) == _CAMERA_LAYOUTS_WARN:
                warnings.warn(
                    f"images in {len(self._camera_layouts) + 1} different sets of sizes so far; each set "
                    "captures its own graphs on its first call (about a second). Feed each camera at a "
                    f"fixed size, or resize to {size}x{size} before predict()",
                    stacklevel=3,
                )
            layout = CameraLayout(shapes, size, self.device, pin=self.is_cuda)
            self._camera_layouts[shapes] = layout
        layout.stage(images)
        self.camera = layout

    def load_state(self, state):
        """Pi0 only; Pi0.5 carries its state in the prompt."""

    @torch.no_grad()
    def infer(self, *, prefix: bool = True) -> np.ndarray:
        """Run the call for the current bucket on the staged inputs: one graph launch (it copies the
        inputs in and the actions out), one sync.

        ``prefix=False`` replays the denoise-only graph on the cached prefix KV (cache_frames)."""
        t_enter = time.perf_counter()
        bucket = self._bucket()
        if not self.calibrated:
            self.calibrate_current()
        with self._on_stream():
            # may capture: outside the events
            graphs = self.call_graphs(bucket, prefix) if self.use_graphs else []
            stream = torch.cuda.current_stream() if self.is_cuda else None
            if stream is not None:
                self._call_events[0].record(stream)
            for graph in graphs:
                graph.replay()
            if not graphs:
                (self.run_all if prefix else self.run_denoise)(bucket)
            t_launched = time.perf_counter()
            if stream is not None:
                self._call_events[1].record(stream)
                stream.synchronize()
            t_synced = time.perf_counter()
        actions = self.actions_host.numpy().copy()
        self._host_marks = (t_enter, t_launched, t_synced, time.perf_counter())
        return actions

    def last_call_gpu_ms(self) -> float | None:
        """GPU time of the last infer(): its graph, from the inputs' copy in to the actions' copy out
        (None on the CPU). Its wall time minus this is host time (preprocessing, launch, wake-up)."""
        if not self.is_cuda:
            return None
        start, end = self._call_events
        return start.elapsed_time(end)

    def last_call_host_marks(self) -> tuple[float, float, float, float]:
        """``time.perf_counter()`` of the last infer() at its entry, after the launch (the graph
        replay, copies included) returned, after the sync returned, and at its return. With the
        caller's own clock around predict() they split the host time: preprocessing before the
        entry, the launch, the wait (mostly GPU time), and the work after the sync."""
        return self._host_marks

    def _bucket(self) -> Bucket:
        if self.current is None:
            raise InputError("no prompt set: call set_prompt(...) before infer()")
        return self.current

    def _on_stream(self):
        if not self.is_cuda:
            return _nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._stream)

    def stage_fn(self, bucket: Bucket, kind: str):
        return {
            "full": lambda: self.run_all(bucket),
            "denoise": lambda: self.run_denoise(bucket),
            "vision": self.run_vision,
            "prefix": lambda: self.run_prefix(bucket),
        }[kind]

    def _call_kinds(self, prefix: bool) -> tuple[str, ...]:
        """The graphs one call replays, in order: the whole call as one graph (or its three stages
        under FLASHRT_GRAPH_STAGES=1); with ``prefix=False`` (cache_frames) the denoise graph."""
        if not prefix:
            return ("denoise",)
        return ("vision", "prefix", "denoise") if self.graph_stages else ("full",)

    def call_graphs(self, bucket: Bucket, prefix: bool = True) -> list:
        """The graphs one call of ``bucket`` replays, in order (captured where missing)."""
        return [self._graph(bucket, kind) for kind in self._call_kinds(prefix)]

    def graph_key(self, kind: str) -> str:
        """``kind``'s key in Bucket.graphs for the staged images: a graph that reads the images
        (full, vision) is captured per camera layout."""
        if self.camera is None or kind not in ("full", "vision"):
            return kind
        return f"{kind}@{self.camera.key}"

    def _graph(self, bucket: Bucket, kind: str):
        graph = bucket.graphs.get(self.graph_key(kind))
        if graph is None:
            graph = self.capture(bucket, kind)
        return graph

    @torch.no_grad()
    def capture(self, bucket: Bucket, kind: str):
        """Capture one stage (or the whole call) of ``bucket`` as a CUDA graph. Every graph of this
        pipeline shares one memory pool: their intermediates never outlive a replay (all state that
        crosses stages lives in the static buffers), so they can reuse the same memory."""
        fn = self.stage_fn(bucket, kind)
        start = time.perf_counter()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with self._on_stream():
            try:
                with self._attention_backends():
                    fn()  # warm-up outside capture: lazy cuBLAS / cuDNN initialisation, workspaces, GEMM tuning
                torch.cuda.current_stream().synchronize()
            except Exception as exc:
                if self.ops.name == "torch":
                    raise
                self._fall_back_to_torch_ops(exc)
                fn = self.stage_fn(bucket, kind)
                fn()
                torch.cuda.current_stream().synchronize()
            try:
                graph = self._capture_graph(fn)
            except Exception as exc:  # one retry, with what is known to capture
                if self.ops.name != "torch":
                    self._fall_back_to_torch_ops(exc)
                    fn = self.stage_fn(bucket, kind)
                    fn()
                elif self._sdpa_backends:  # an autotuned SDPA backend that runs eagerly but not captured
                    self._sdpa_backends = None
                else:
                    raise
                graph = self._capture_graph(fn)
        key = self.graph_key(kind)
        bucket.graphs[key] = graph
        bucket.capture_s[key] = time.perf_counter() - start
        self.captures += 1
        return graph

    def _capture_graph(self, fn):
        graph = torch.cuda.CUDAGraph()
        with self._attention_backends(), torch.cuda.graph(graph, pool=self._graph_pool,
                                                          stream=torch.cuda.current_stream()):
            fn()
        torch.cuda.current_stream().synchronize()
        return graph

    def _fall_back_to_torch_ops(self, exc: Exception):
        """The compiled kernels failed at run time (after passing their self-check): keep serving
        with the torch ops. Weights are shared; only the residual streams change dtype."""
        from flash_rt.models.hopper_ops import TorchOps  # noqa: PLC0415

        warnings.warn(
            f"flashrt_kernels failed in the Hopper pipeline ({type(exc).__name__}: {exc}); continuing with the "
            "torch ops (slower). Set FLASHRT_HOPPER_OPS=torch to skip the kernels.", RuntimeWarning, stacklevel=3,
        )
        ops = TorchOps(self.act_dtype)
        ops.fallback_reason = f"runtime failure: {type(exc).__name__}: {exc}"[:500]
        ops.autotune = self.ops.autotune
        self.ops = ops
        self.drop_graphs()
        res, dev = ops.residual_dtype, self.device
        self.prefix_x = torch.empty(self.prefix_x.shape, device=dev, dtype=res)
        self._allocate_suffix(res)
        self.vision_x = torch.empty(self.vision_x.shape, device=dev, dtype=res)

    def _attention_backends(self):
        if not self.is_cuda or not self._sdpa_backends:
            return _nullcontext()
        from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

        try:  # the list is a priority order (torch >= 2.6); older torch only restricts the set
            return sdpa_kernel(self._sdpa_backends, set_priority=True)
        except TypeError:
            return sdpa_kernel(self._sdpa_backends)

    def autotune_attention(self, level: int) -> str:
        """autotune >= 3: GEMM plans are timed (compiled kernels: before each capture) and SDPA's
        backends are timed at this pipeline's prefix shape, the fastest kept (torch ops)."""
        self.ops.autotune = level
        if not self.is_cuda or level < 3 or self.ops.name != "torch":
            return "default" if self.ops.name == "torch" else self.ops.name
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        d = self.config.paligemma
        n = self.max_prefix
        q = torch.randn((1, 1, n * d.num_heads, d.head_dim), device=self.device, dtype=self.act_dtype)
        k = torch.randn((1, 1, n, d.head_dim), device=self.device, dtype=self.act_dtype)
        best, best_ms = None, float("inf")
        reps = 20 if level < 5 else 100
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    for _ in range(3):
                        torch.nn.functional.scaled_dot_product_attention(q, k, k)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(reps):
                        torch.nn.functional.scaled_dot_product_attention(q, k, k)
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end) / reps
            except RuntimeError:
                continue
            if ms < best_ms:
                best, best_ms = backend, ms
        if best is not None:
            # the others stay as fallbacks for shapes the fastest one refuses (SigLIP's head_dim 72)
            others = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != best]
            self._sdpa_backends = [best, *others]
            self.drop_graphs()
        return str(best)

    def drop_graphs(self):
        for bucket in self.buckets.values():
            bucket.graphs.clear()

    def warm_buckets(self, id_lists) -> list[int]:
        """Capture the full graph for every prompt length in ``id_lists`` (needs loaded inputs)."""
        for ids in id_lists:
            bucket = self.set_prompt_tokens(ids)
            if not self.calibrated:
                self.calibrate_current()
            if self.use_graphs:
                for kind in self._call_kinds(prefix=True):
                    self._graph(bucket, kind)
        return sorted(self.buckets)

    # ------------------------------------------------------------------ FP8 calibration
    def fp8_linears(self) -> list[Linear]:
        return [lin for lin in self._all_linears() if lin.fp8]

    def _all_linears(self):
        for layer in [*self.vision, *self.llm, *self.expert]:
            for lin in vars(layer).values():
                if isinstance(lin, Linear):
                    yield lin
        yield from self._suffix_linears()

    def _suffix_linears(self):
        return ()

    @torch.no_grad()
    def observe_amax(self) -> dict[str, float]:
        """One eager pass of the current inputs recording each FP8 GEMM input's absolute max."""
        bucket = self._bucket()
        lins = self.fp8_linears()
        for lin in lins:
            lin.amax.zero_()
        self.ops.calibrating = True
        try:
            with self._on_stream():
                self.run_all(bucket)
        finally:
            self.ops.calibrating = False
        return {lin.name: float(lin.amax) for lin in lins}

    def calibrate_current(self):
        self.set_act_amax(self.observe_amax())

    def set_act_amax(self, amax: dict[str, float]):
        """Static per-tensor activation scales from absolute maxima (scale = amax / 448)."""
        for lin in self.fp8_linears():
            value = amax.get(lin.name)
            if value is None or not math.isfinite(value):
                raise CalibrationError(
                    f"no finite activation amax for {lin.name} (got {value!r}); the calibration data "
                    "does not cover this pipeline: call recalibrate() to rebuild it"
                )
            # round the scale to fp32 first, so a scale reloaded from a cache gives the same bits
            scale = float(np.float32(max(value, 1e-6) / FP8_MAX))
            lin.act_scale.fill_(scale)
            lin.inv_act_scale.fill_(float(np.float32(1.0) / np.float32(scale)))
        self.calibrated = True

    def act_amax(self) -> dict[str, float]:
        return {lin.name: float(lin.act_scale) * FP8_MAX for lin in self.fp8_linears()}

    def clear_calibration(self):
        self.calibrated = not self.fp8_linears()


def calibrate_amax(observed: list[dict[str, float]], percentile: float | None = None) -> dict[str, float]:
    """Combine per-observation amax dicts: the max, or the given percentile across observations."""
    if not observed:
        raise CalibrationError("calibration needs at least one observation; got none")
    out = {}
    for name in observed[0]:
        values = np.array([obs[name] for obs in observed], dtype=np.float64)
        out[name] = float(values.max() if percentile is None else np.percentile(values, percentile))
    return out


class _StateDict:
    """Consumes a state_dict by name; names left over at the end are an error (a layout we do
    not understand must not load silently)."""

    def __init__(self, state_dict, device):
        self._sd = dict(state_dict)
        self._device = device
        self._taken: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        try:
            tensor = self._sd[key]
        except KeyError:
            raise ConfigError(
                f"state_dict has no {key!r}; the Hopper pipeline expects the openpi-PyTorch parameter "
                "names (load the checkpoint with flash_rt.models.pi_checkpoint)"
            ) from None
        self._taken.add(key)
        # fold on the target device (fast, no host fp32 copies); never track gradients
        return tensor.detach().to(self._device)

    def skip(self, key: str):
        if key in self._sd:
            self._taken.add(key)

    def skip_prefix(self, prefix: str):
        self._taken.update(k for k in self._sd if k.startswith(prefix))

    def check_consumed(self):
        left = sorted(k for k in self._sd if k not in self._taken and not k.endswith("lm_head.weight"))
        if left:
            raise ConfigError(
                f"state_dict has {len(left)} parameters the Hopper pipeline does not use, e.g. {left[:3]}; "
                "is this the right model type?"
            )


def _device_tensor(ptr: int, shape, dtype, device) -> torch.Tensor:
    """A tensor over memory someone else owns (an attention backend's slot), without a copy."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    typestr = {1: "|u1", 2: "<i2", 4: "<f4"}[itemsize]

    class _Interface:
        __cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False), "version": 3,
                                    "strides": None}

    raw = torch.as_tensor(_Interface(), device=device)
    return raw if itemsize == 4 and dtype == torch.float32 else raw.view(dtype)


def _fold_layer_norm(w, b, gamma, beta):
    """LN(x) * gamma + beta feeding (w, b)  ==  LN_plain(x) feeding (w * gamma, b + w @ beta)."""
    w, b = w.float(), b.float()
    return w * gamma.float()[None, :], b + w @ beta.float()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
