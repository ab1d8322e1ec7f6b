"""Pi0 fast path for Hopper: the shared PaliGemma pipeline (flash_rt.models.paligemma_hopper)
plus Pi0's suffix.

Pi0's suffix is [state token, 50 action tokens] with ar = [1, 1, 0 ...]: the state token sees
the prefix and itself only, so its K/V do not depend on x_t or t. It rides along in the first
denoise step (51 rows through the expert's GEMMs, its attention over [prefix; state] only), which
appends its K/V to the cache; the later steps run the 50 action tokens, which attend, unmasked, to
[prefix; state; actions]. (A pass of its own, 1 row through 18 layers of latency-bound kernels,
cost the prefix stage 0.5-0.6 ms on the H100; in the first step it costs ~0.2 ms.) Because it runs
in the denoise loop, cache_frames' denoise-only calls see a fresh state. Action tokens are
action_time_mlp_out(swish(action_time_mlp_in([action_in_proj(x_t), time_emb]))): action_in_proj
is folded into the first half of action_time_mlp_in, and the time half (fixed per step) plus
both biases becomes one precomputed bias per step. Expert norms are plain Gemma RMSNorms whose
(1 + w) are folded into the next GEMM; the final one and the Euler dt into action_out_proj.
Pi0 has no state in the prompt, so one prompt length (one graph) serves a whole episode.
"""

from __future__ import annotations

import torch

from flash_rt.errors import InputError
from flash_rt.models.paligemma_hopper import EXPERT, PaliGemmaHopperPipeline, euler_times, time_embedding


class Pi0HopperPipeline(PaliGemmaHopperPipeline):
    suffix_extra_tokens = 1  # the state token, cached next to the prefix
    # bf16 under use_fp8 (docs/calibration.md "Which GEMMs run FP8"): SigLIP (27 layers of
    # compounding error before any residual), the attention projections (small; they write the KV
    # cache, the attention logits and the residual), the expert's gate_up (its error doubles through
    # GeGLU, and Pi0's ungated expert blocks pass it straight to the velocity), the action-token
    # head. FP8 stays where the time is: the prefix MLP (most of the FLOPs) and the expert's down.
    fp8_keep_bf16 = ("vision.*", "llm.*.qkv", "llm.*.o", "expert.*.qkv", "expert.*.o", "expert.*.gate_up",
                     "action_time_out")

    def _expert_norm_weight(self, sd, key):
        return 1.0 + sd.take(key + ".weight").float()

    def _prepare_suffix(self, sd):
        e, f32 = self.config.expert, torch.float32
        self.state_proj = self._lin("state_proj", sd.take("state_proj.weight"), sd.take("state_proj.bias"), dtype=f32)
        w_in, b_in = sd.take("action_time_mlp_in.weight").float(), sd.take("action_time_mlp_in.bias").float()
        a_w, a_b = sd.take("action_in_proj.weight").float(), sd.take("action_in_proj.bias").float()
        w_action, w_time = w_in[:, : e.width], w_in[:, e.width :]
        self.action_fused = self._lin("action_fused", w_action @ a_w, None, dtype=f32)
        temb = torch.stack([time_embedding(t, e.width) for t in euler_times(self.num_steps)]).to(self.device)
        self.step_bias = (temb @ w_time.T + (w_action @ a_b + b_in)).contiguous()  # (steps, W)
        self.action_time_out = self._lin(
            "action_time_out", sd.take("action_time_mlp_out.weight"), sd.take("action_time_mlp_out.bias")
        )
        final = 1.0 + sd.take(EXPERT + "norm.weight").float()
        w, b = sd.take("action_out_proj.weight").float(), sd.take("action_out_proj.bias").float()
        self.action_out = self._lin("action_out", w * final[None, :] * self.dt, b * self.dt, dtype=f32)
        self.state = torch.zeros((self.config.max_state_dim,), device=self.device, dtype=f32)

    def _allocate_buffers(self):
        super()._allocate_buffers()
        # staged by load_state, copied in by the first denoise step (as the base class stages its inputs)
        self.state_host = torch.zeros(tuple(self.state.shape), dtype=torch.float32, pin_memory=self.is_cuda)

    def _suffix_linears(self):
        return (self.action_time_out,)

    def load_state(self, state):
        state = torch.as_tensor(state, dtype=torch.float32).reshape(-1)
        if state.shape[0] > self.state.shape[0]:
            raise InputError(f"state has {state.shape[0]} values; the model takes at most {self.state.shape[0]}")
        self.state_host.zero_()
        self.state_host[: state.shape[0]].copy_(state)

    def expert_norm(self, x, step, layer, which, *, lin, y, gate):
        return self.ops.rms_norm(x, lin=lin, y=y, gate=gate)

    def denoise_delta(self, bucket, step, *, out=None, accumulate=False):
        ops, first = self.ops, step == 0  # the first step also carries the state token (row 0)
        h = ops.silu(ops.linear(self.x_t, self.action_fused) + self.step_bias[step])
        ops.linear(h, self.action_time_out, out=self.suffix_x)
        if first:
            self.state.copy_(self.state_host, non_blocking=True)
            self.suffix_rows[:1].copy_(ops.linear(self.state[None, :], self.state_proj))
        x = self.suffix_rows if first else self.suffix_x
        y, gate = self.expert_layers(x, self.prefix_len(bucket) + (0 if first else 1), step, head_rows=int(first))
        h = ops.rms_norm(x, lin=self.action_out, y=y, gate=gate)
        return ops.linear(h[1:] if first else h, self.action_out, out=out, accumulate=accumulate)
