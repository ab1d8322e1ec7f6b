"""The reference frontend of Pi0.5 (arch "cpu"; also runs on a CUDA device with ``device="cuda"``).

IO around ``Pi05Reference``: validate and resize the images, normalise the state with the
checkpoint's norm stats, put it (discretised) into the prompt, sample the flow, unnormalise the
actions. Slow and exact: the numerics every fast path is held to.

    frontend = Pi05TorchFrontendCpu(checkpoint_dir, num_views=2)
    frontend.set_prompt("pick up the cup", state=state)
    actions = frontend.infer({"images": [base, wrist]})      # (action_horizon, robot action dims)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flash_rt.api import same_state
from flash_rt.errors import InputError
from flash_rt.models.pi_frontend_cpu import PiTorchFrontendCpuBase


class Pi05TorchFrontendCpu(PiTorchFrontendCpuBase):
    model_type = "pi05"
    _state = None  # the raw state the current tokens were made with

    @staticmethod
    def _reference_class():
        from flashrt_pi05.reference import Pi05Reference  # noqa: PLC0415

        return Pi05Reference

    def set_prompt(self, prompt, state=None) -> None:
        """The task prompt and (Pi0.5 puts it into the prompt) the robot state."""
        tokens = None
        if state is not None:
            tokens = self.inputs.prompt_tokens(prompt, self.inputs.normalized_state(state))
        else:
            self.inputs.prompt_tokens(prompt, np.zeros(1, np.float32))  # validates the prompt
        self._prompt, self._state, self._tokens = prompt, None if state is None else np.array(state), tokens

    def infer(self, observation, noise=None) -> np.ndarray:
        if self._prompt is None:
            raise InputError("no prompt: call set_prompt(prompt, state=...) first, or predict(images, prompt, state)")
        state = observation.get("state") if isinstance(observation, Mapping) else None
        if state is not None and not same_state(state, self._state):
            self.set_prompt(self._prompt, state)
        if self._tokens is None:
            raise InputError(
                "Pi0.5 puts the robot state into the prompt: pass state= to predict() or set_prompt() "
                "(a 1-D float array of the robot's joint / gripper values)"
            )
        return self._sample(observation, noise)
