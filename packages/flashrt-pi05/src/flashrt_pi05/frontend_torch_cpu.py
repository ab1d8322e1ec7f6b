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

from flash_rt.errors import InputError
from flash_rt.models.pi_preprocess import PiInputs


def _same_state(a, b) -> bool:
    if a is None or b is None:
        return a is b
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b))


class Pi05TorchFrontendCpu:
    model_type = "pi05"

    def __init__(self, checkpoint, num_views: int = 2, num_steps: int | None = None, tokenizer=None,
                 device=None, vision_num_layers: int | None = None, vision_pool_factor: int | None = None,
                 dtype=None):
        import torch  # noqa: PLC0415

        from flash_rt.models.paligemma_tokenizer import PaligemmaTokenizer, find_tokenizer  # noqa: PLC0415
        from flash_rt.models.pi_checkpoint import load_pi_checkpoint  # noqa: PLC0415
        from flashrt_pi05.reference import Pi05Reference  # noqa: PLC0415

        ckpt = load_pi_checkpoint(checkpoint, self.model_type)
        self.config = ckpt.config
        self.norm_stats = ckpt.norm_stats
        self.model = Pi05Reference.from_checkpoint(
            ckpt, device=torch.device(device or "cpu"), dtype=dtype,
            vision_num_layers=vision_num_layers, vision_pool_factor=vision_pool_factor or 1,
        )
        self.inputs = PiInputs(ckpt.config, ckpt.norm_stats, PaligemmaTokenizer(find_tokenizer(tokenizer, ckpt.directory)),
                               num_views)
        self.num_views = num_views
        self.num_steps = num_steps or ckpt.config.num_steps
        self._rng = np.random.default_rng()
        self._prompt: str | None = None
        self._state = None  # the raw state the current tokens were made with
        self._tokens = None

    def set_prompt(self, prompt, state=None) -> None:
        """The task prompt and (Pi0.5 puts it into the prompt) the robot state."""
        tokens = None
        if state is not None:
            tokens = self.inputs.prompt_tokens(prompt, self.inputs.normalized_state(state))
        else:
            self.inputs.prompt_tokens(prompt, np.zeros(1, np.float32))  # validates the prompt
        self._prompt, self._state, self._tokens = prompt, None if state is None else np.array(state), tokens

    def infer(self, observation, noise=None) -> np.ndarray:
        import torch  # noqa: PLC0415

        if self._prompt is None:
            raise InputError("no prompt: call set_prompt(prompt, state=...) first, or predict(images, prompt, state)")
        state = observation.get("state") if isinstance(observation, Mapping) else None
        if state is not None and not _same_state(state, self._state):
            self.set_prompt(self._prompt, state)
        if self._tokens is None:
            raise InputError(
                "Pi0.5 puts the robot state into the prompt: pass state= to predict() or set_prompt() "
                "(a 1-D float array of the robot's joint / gripper values)"
            )
        images = self.inputs.images(observation)
        x0 = self.inputs.noise(noise, self._rng)
        device = self.model.device
        ids, mask = self._tokens
        actions = self.model.sample_actions(
            torch.from_numpy(images)[None].to(device),
            torch.from_numpy(ids)[None].to(device),
            torch.from_numpy(mask)[None].to(device),
            torch.from_numpy(x0)[None].to(device),
            num_steps=self.num_steps,
        )
        return self.inputs.actions(actions[0].cpu().numpy())
