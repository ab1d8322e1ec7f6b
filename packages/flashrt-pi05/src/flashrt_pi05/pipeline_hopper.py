"""Pi0.5 fast path for Hopper: the shared PaliGemma pipeline (flash_rt.models.paligemma_hopper)
plus Pi0.5's suffix.

Pi0.5's suffix is action_in_proj(x_t); every expert norm is adaRMS conditioned on t, with gated
residuals. The time conditions of every denoise step depend only on t (fixed by ``num_steps``), so
the adaRMS (scale, shift, gate) of every expert norm are computed once at load; the Euler dt is
folded into ``action_out_proj``. Pi0.5 puts the discretised state into the prompt, so the prompt
length follows the state: one graph per length (``warm_buckets`` prewarms a set).
"""

from __future__ import annotations

import torch

from flash_rt.models.hopper_ops import Gate, Modulation
from flash_rt.models.paligemma_hopper import (
    EXPERT,
    PaliGemmaHopperPipeline,
    calibrate_amax,
    euler_times,
    time_embedding,
)

__all__ = ["Pi05HopperPipeline", "calibrate_amax"]


class Pi05HopperPipeline(PaliGemmaHopperPipeline):
    """Pi0.5: suffix = action_in_proj(x_t); every expert norm is adaRMS conditioned on t, with
    gated residuals; the (scale, shift, gate) of all steps are computed once at load."""

    # bf16 under use_fp8 (docs/calibration.md "Which GEMMs run FP8"): SigLIP (27 layers of
    # compounding error before any residual), the prefix's qkv (it writes the KV cache every
    # denoise step reads) and o (small). The gated expert damps its own FP8 error: it stays FP8.
    fp8_keep_bf16 = ("vision.*", "llm.*.qkv", "llm.*.o")

    def _expert_norm_weight(self, sd, key):
        return None

    def _prepare_expert(self, sd):
        super()._prepare_expert(sd)
        d = self.config.expert
        times = euler_times(self.num_steps)
        temb = torch.stack([time_embedding(t, d.width) for t in times]).to(self.device)
        silu = torch.nn.functional.silu
        lin = torch.nn.functional.linear

        def dense(key, x):
            return lin(x, sd.take(key + ".weight").float().to(self.device), sd.take(key + ".bias").float().to(self.device))

        cond = silu(dense("time_mlp_out", silu(dense("time_mlp_in", temb))))  # (steps, W)
        mods = []
        for i in range(d.depth):
            p = EXPERT + f"layers.{i}."
            mods.append(torch.stack([
                dense(p + "input_layernorm.dense", cond).view(len(times), 3, d.width),
                dense(p + "post_attention_layernorm.dense", cond).view(len(times), 3, d.width),
            ], dim=1))  # (steps, 2, 3, W)
        mod = torch.stack(mods, dim=1)  # (steps, layers, 2, 3, W): scale, shift, gate
        final = dense(EXPERT + "norm.dense", cond).view(len(times), 3, d.width)
        bf16 = torch.bfloat16
        # fp32 (torch ops: y = addcmul(shift, rms, 1 + scale)) and bf16 (kernels take scale, shift, gate)
        self.ada_one_plus_scale = (1.0 + mod[:, :, :, 0]).contiguous()
        self.ada_shift = mod[:, :, :, 1].contiguous()
        self.ada_gate = mod[:, :, :, 2].contiguous()
        self.ada_bf16 = mod.to(bf16).contiguous()
        self.final_one_plus_scale = (1.0 + final[:, 0]).contiguous()
        self.final_shift = final[:, 1].contiguous()
        self.final_bf16 = final.to(bf16).contiguous()

    def _prepare_suffix(self, sd):
        f32 = torch.float32  # tiny GEMMs touching x_t stay in fp32
        self.action_in = self._lin("action_in", sd.take("action_in_proj.weight"), sd.take("action_in_proj.bias"), dtype=f32)
        w, b = sd.take("action_out_proj.weight").float(), sd.take("action_out_proj.bias").float()
        self.action_out = self._lin("action_out", w * self.dt, b * self.dt, dtype=f32)

    def expert_norm(self, x, step, layer, which, *, lin, y, gate):
        mod = Modulation(self.ada_one_plus_scale[step, layer, which], self.ada_shift[step, layer, which],
                         self.ada_bf16[step, layer, which, 0], self.ada_bf16[step, layer, which, 1])
        return self.ops.rms_norm(x, lin=lin, y=y, gate=gate, mod=mod)

    def expert_gate(self, step, layer, which):
        return Gate(self.ada_gate[step, layer, which], self.ada_bf16[step, layer, which, 2])

    def denoise_delta(self, bucket, step, *, out=None, accumulate=False):
        x = self.suffix_x
        self.ops.linear(self.x_t, self.action_in, out=x)
        y, gate = self.expert_layers(x, self.prefix_len(bucket), step)
        final = Modulation(self.final_one_plus_scale[step], self.final_shift[step], self.final_bf16[step, 0],
                           self.final_bf16[step, 1])
        h = self.ops.rms_norm(x, lin=self.action_out, y=y, gate=gate, mod=final)
        return self.ops.linear(h, self.action_out, out=out, accumulate=accumulate)
