"""The reference frontend of Pi0 (arch "cpu"; also runs on a CUDA device with ``device="cuda"``).

IO around ``Pi0Reference``: validate and resize the images, tokenize the prompt, normalise and
pad the state (Pi0 feeds it as a continuous token to the action expert), sample the flow,
unnormalise the actions. Slow and exact: the numerics every fast path is held to.

    frontend = Pi0TorchFrontendCpu(checkpoint_dir, num_views=2)
    frontend.set_prompt("pick up the cup")
    actions = frontend.infer({"images": [base, wrist], "state": state})
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flash_rt.errors import InputError
from flash_rt.models.pi_frontend_cpu import PiTorchFrontendCpuBase


class Pi0TorchFrontendCpu(PiTorchFrontendCpuBase):
    model_type = "pi0"

    @staticmethod
    def _reference_class():
        from flashrt_pi0.reference import Pi0Reference  # noqa: PLC0415

        return Pi0Reference

    def set_prompt(self, prompt) -> None:
        self._tokens = self.inputs.prompt_tokens(prompt)
        self._prompt = prompt

    def infer(self, observation, noise=None) -> np.ndarray:
        if self._prompt is None:
            raise InputError("no prompt: call set_prompt(prompt) first, or predict(images, prompt, state)")
        state = observation.get("state") if isinstance(observation, Mapping) else None
        return self._sample(observation, noise, state=self.inputs.padded_state(self.inputs.normalized_state(state)))
