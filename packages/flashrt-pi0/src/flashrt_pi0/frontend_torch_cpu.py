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
from flash_rt.models.pi_preprocess import PiInputs


class Pi0TorchFrontendCpu:
    model_type = "pi0"

    def __init__(self, checkpoint, num_views: int = 2, num_steps: int | None = None, tokenizer=None,
                 device=None, vision_num_layers: int | None = None, vision_pool_factor: int | None = None,
                 dtype=None):
        import torch  # noqa: PLC0415

        from flash_rt.models.paligemma_tokenizer import PaligemmaTokenizer, find_tokenizer  # noqa: PLC0415
        from flash_rt.models.pi_checkpoint import load_pi_checkpoint  # noqa: PLC0415
        from flashrt_pi0.reference import Pi0Reference  # noqa: PLC0415

        ckpt = load_pi_checkpoint(checkpoint, self.model_type)
        self.config = ckpt.config
        self.norm_stats = ckpt.norm_stats
        self.model = Pi0Reference.from_checkpoint(
            ckpt, device=torch.device(device or "cpu"), dtype=dtype,
            vision_num_layers=vision_num_layers, vision_pool_factor=vision_pool_factor or 1,
        )
        self.inputs = PiInputs(ckpt.config, ckpt.norm_stats, PaligemmaTokenizer(find_tokenizer(tokenizer, ckpt.directory)),
                               num_views)
        self.num_views = num_views
        self.num_steps = num_steps or ckpt.config.num_steps
        self._rng = np.random.default_rng()
        self._prompt: str | None = None
        self._tokens = None

    def set_prompt(self, prompt) -> None:
        self._tokens = self.inputs.prompt_tokens(prompt)
        self._prompt = prompt

    def infer(self, observation, noise=None) -> np.ndarray:
        import torch  # noqa: PLC0415

        if self._prompt is None:
            raise InputError("no prompt: call set_prompt(prompt) first, or predict(images, prompt, state)")
        state = observation.get("state") if isinstance(observation, Mapping) else None
        state = self.inputs.padded_state(self.inputs.normalized_state(state))
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
            state=torch.from_numpy(state)[None].to(device),
        )
        return self.inputs.actions(actions[0].cpu().numpy())
