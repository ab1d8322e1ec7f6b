"""Frontends used by the core tests: small but real (they compute something checkable)."""

import numpy as np

from flash_rt.errors import InputError


class EchoFrontend:
    """Actions = f(mean image, state, prompt length): any mix-up of inputs shows."""

    instances: list = []

    def __init__(self, checkpoint, num_views=2, num_steps=None, use_fp8=True):
        self.checkpoint = checkpoint
        self.num_views = num_views
        self.num_steps = num_steps
        self.use_fp8 = use_fp8
        self.prompts: list = []
        self.recalibrated = 0
        EchoFrontend.instances.append(self)

    def set_prompt(self, prompt, state=None):
        self.prompts.append((prompt, None if state is None else np.array(state)))

    def infer(self, observation, noise=None):
        images = observation.get("images") or [observation[k] for k in ("image", "wrist_image") if k in observation]
        if len(images) != self.num_views:
            raise InputError(f"expected {self.num_views} views")
        mean = float(np.mean([np.asarray(i, dtype=np.float64).mean() for i in images]))
        state = np.asarray(observation.get("state", np.zeros(2)), dtype=np.float64)
        out = np.full((4, 2), mean) + state.sum() + len(self.prompts[-1][0])
        return out if noise is None else out + np.asarray(noise)

    def recalibrate(self):
        self.recalibrated += 1


class PromptOnlyFrontend(EchoFrontend):
    def set_prompt(self, prompt):  # noqa: D102 - no state parameter: refreshed on prompt change only
        self.prompts.append((prompt, None))


class BrokenImportFrontend:  # referenced by a target whose module does not exist
    pass
