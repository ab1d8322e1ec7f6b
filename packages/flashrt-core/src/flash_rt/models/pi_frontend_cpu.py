"""What the Pi0 and Pi0.5 reference frontends (arch "cpu"; also CUDA with ``device="cuda"``) share:
checkpoint loading, the reference model, inputs (images, tokenizer, norm stats) and one flow
sample. Each model's frontend adds how its prompt and state enter the model."""

from __future__ import annotations

import numpy as np


class PiTorchFrontendCpuBase:
    model_type: str  # "pi05" | "pi0"

    @staticmethod
    def _reference_class():
        """The model package's reference nn.Module class (imported lazily)."""
        raise NotImplementedError

    def __init__(self, checkpoint, num_views: int = 2, num_steps: int | None = None, tokenizer=None,
                 device=None, vision_num_layers: int | None = None, vision_pool_factor: int | None = None,
                 dtype=None):
        import torch  # noqa: PLC0415

        from flash_rt.models.paligemma_tokenizer import PaligemmaTokenizer, find_tokenizer  # noqa: PLC0415
        from flash_rt.models.pi_checkpoint import load_pi_checkpoint  # noqa: PLC0415
        from flash_rt.models.pi_preprocess import PiInputs  # noqa: PLC0415

        ckpt = load_pi_checkpoint(checkpoint, self.model_type)
        self.config = ckpt.config
        self.norm_stats = ckpt.norm_stats
        self.model = self._reference_class().from_checkpoint(
            ckpt, device=torch.device(device or "cpu"), dtype=dtype,
            vision_num_layers=vision_num_layers, vision_pool_factor=vision_pool_factor or 1,
        )
        tokenizer_model = PaligemmaTokenizer(find_tokenizer(tokenizer, ckpt.directory))
        self.inputs = PiInputs(ckpt.config, ckpt.norm_stats, tokenizer_model, num_views)
        self.num_views = num_views
        self.num_steps = num_steps or ckpt.config.num_steps
        self._rng = np.random.default_rng()
        self._prompt: str | None = None
        self._tokens = None

    def _sample(self, observation, noise, **model_inputs) -> np.ndarray:
        """One flow sample from the current prompt tokens; extra inputs (Pi0's state) as arrays."""
        import torch  # noqa: PLC0415

        device = self.model.device

        def batch(array):
            return torch.from_numpy(array)[None].to(device)

        ids, mask = self._tokens
        actions = self.model.sample_actions(
            batch(self.inputs.images(observation)), batch(ids), batch(mask),
            batch(self.inputs.noise(noise, self._rng)), num_steps=self.num_steps,
            **{name: batch(value) for name, value in model_inputs.items()},
        )
        return self.inputs.actions(actions[0].cpu().numpy())
