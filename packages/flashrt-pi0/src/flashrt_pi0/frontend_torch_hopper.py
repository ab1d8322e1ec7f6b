"""Pi0 torch frontend for Hopper (arch "hopper"): IO around ``Pi0HopperPipeline``.

The shared Pi frontend (flash_rt.models.pi_frontend_hopper), except that the state is a
continuous suffix token, not prompt text: the prompt is BOS + text + "\\n" and one prompt length
(one graph) serves a whole episode; the state goes, normalised and zero-padded to
max_state_dim, through a pinned buffer into the pipeline with the images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flash_rt.errors import InputError
from flash_rt.models.pi_frontend_hopper import PiTorchFrontendHopperBase


class Pi0TorchFrontendHopper(PiTorchFrontendHopperBase):
    """Pi0 on Hopper: one CUDA graph, FP8 W8A8 (default) or bf16."""

    model_type = "pi0"
    warm_state_prompt_buckets = None  # no state in the prompt: nothing to warm per state

    def pipeline_class(self):
        from flashrt_pi0.pipeline_hopper import Pi0HopperPipeline  # noqa: PLC0415

        return Pi0HopperPipeline

    def set_prompt(self, prompt: str):
        return super().set_prompt(prompt, None)

    def prompt_ids(self, prompt, state) -> np.ndarray:
        ids, mask = self.inputs.prompt_tokens(prompt)
        return ids[mask]

    def calibrate(self, observations, percentile: float | None = None, prompt=None, state=None):
        from flash_rt.models.paligemma_hopper import calibrate_amax  # noqa: PLC0415

        prompt = prompt or self._prompt
        if prompt is None:
            raise InputError("calibrate() needs a prompt: pass prompt=... or call set_prompt first")
        self.set_prompt(prompt)
        observed = []
        for obs in observations:
            if isinstance(obs, tuple):
                obs = {"images": list(obs[0]), "state": obs[1]}
            self._load_observation(obs, None)
            observed.append(self.pipeline.observe_amax())
        self.pipeline.set_act_amax(calibrate_amax(observed, percentile))
        self._save_calibration()

    def _stage_state(self, observation):
        state = observation.get("state") if isinstance(observation, Mapping) else None
        self.pipeline.load_state(self.inputs.normalized_state(state))
