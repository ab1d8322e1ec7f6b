"""Pi0.5 torch frontend for Hopper (arch "hopper"): the shared Pi frontend
(flash_rt.models.pi_frontend_hopper) around ``Pi05HopperPipeline``.

Pi0.5's state lives in the prompt, so ``set_prompt(prompt, state)`` runs on every state change;
it tokenizes, picks the bucket of that prompt length and copies the ids: no capture unless the
length is new. ``warm_state_prompt_buckets`` captures a set of lengths up front.
"""

from __future__ import annotations

from flash_rt.models.pi_frontend_hopper import PiTorchFrontendHopperBase


class Pi05TorchFrontendHopper(PiTorchFrontendHopperBase):
    """Pi0.5 on Hopper: one CUDA graph per prompt length, FP8 W8A8 (default) or bf16."""

    model_type = "pi05"

    def pipeline_class(self):
        from flashrt_pi05.pipeline_hopper import Pi05HopperPipeline  # noqa: PLC0415

        return Pi05HopperPipeline
