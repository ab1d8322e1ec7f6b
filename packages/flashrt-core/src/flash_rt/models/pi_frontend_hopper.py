"""What the Pi0 and Pi0.5 torch frontends for Hopper share: IO around a ``PaliGemmaHopperPipeline``.

validate -> resize-with-pad to 224, uint8 (flash_rt.models.pi_preprocess) -> normalise the state (the
checkpoint's norm stats) -> tokenize (the PaliGemma tokenizer; Pi0.5: ``"Task: ..., State: <bins>;\\n
Action: "``) -> pinned host buffers -> async H2D into the pipeline's static buffers -> one graph
replay -> D2H (the one sync) -> unnormalise -> (action_horizon, robot action dims).

``set_prompt(prompt, state)`` tokenizes, picks the bucket of that prompt length and copies the ids:
no capture unless the length is new. ``warm_state_prompt_buckets`` captures a set of lengths up
front (Pi0.5, whose state lives in the prompt).

FP8 (default): activation scales come from the first observation (or ``calibrate``), cached
with ``flash_rt.core.quant.calibrator`` keyed by checkpoint fingerprint + options and reused on
the next load; ``recalibrate()`` drops them. ``use_fp8=False`` runs bf16.
``cache_frames=N``: vision + prefix are re-encoded only every N-th call; in between the cached
prefix KV (images and prompt of that call; Pi0.5: its state too, which lives in the prompt) is
reused through a denoise-only graph. Pi0's state token runs in the first denoise step, so it is
fresh on every call.

Subclasses (flashrt_pi05 / flashrt_pi0 ``frontend_torch_hopper``) name their pipeline class and
their model's prompt/state handling. torch is imported lazily (in ``__init__``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flash_rt.errors import ConfigError, InputError

FP4_MESSAGE = (
    "{option} needs FP4 tensor cores (Blackwell, sm_100/sm_120); Hopper has none. Use use_fp8=True "
    "(the default, W8A8 E4M3) or use_fp8=False (bf16) on this GPU"
)


class PiTorchFrontendHopperBase:
    """What the Pi0 and Pi0.5 Hopper frontends share; subclasses set the model specifics."""

    model_type: str  # "pi05" | "pi0": the checkpoint reader's model type and the calibration cache key

    def __init__(
        self,
        checkpoint,
        num_views: int = 2,
        autotune: int = 3,
        recalibrate: bool = False,
        num_steps: int | None = None,
        use_fp8: bool = True,
        vision_pool_factor: int | None = None,
        vision_num_layers: int | None = None,
        cache_frames: int | None = None,
        tokenizer: str | None = None,
        device=None,
        use_fp4: bool = False,
        use_awq: bool | None = None,
        fp4_layers=None,
        ops: str = "auto",
    ):
        for option, value in (("use_fp4=True", use_fp4), ("use_awq=True", use_awq), ("fp4_layers", fp4_layers)):
            if value:
                raise ConfigError(FP4_MESSAGE.format(option=option))
        if cache_frames is not None and (not isinstance(cache_frames, int) or cache_frames < 1):
            raise ConfigError(f"cache_frames must be None or an int >= 1; got {cache_frames!r}")
        import torch  # noqa: PLC0415

        self._torch = torch
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if use_fp8 and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(self.device)
            raise ConfigError(
                f"use_fp8=True needs FP8 tensor cores (sm_89 or newer); this GPU is sm_{major}{minor}. "
                "Load with use_fp8=False for the bf16 path"
            )
        ckpt = self._load_checkpoint(checkpoint)
        self.config = ckpt.config
        self.norm_stats = getattr(ckpt, "norm_stats", None)
        self.checkpoint_dir = getattr(ckpt, "directory", None)
        self.num_views = num_views
        self.options = {
            "model": self.model_type, "num_views": num_views, "num_steps": int(num_steps or self.config.num_steps),
            "vision_pool_factor": int(vision_pool_factor or 1),
            "vision_num_layers": int(vision_num_layers or self.config.vision.depth),
            "pipeline": "hopper-torch-v1",
        }
        self.pipeline = self.pipeline_class()(
            ckpt.state_dict, self.config, num_views=num_views, num_steps=num_steps, use_fp8=use_fp8,
            device=self.device, vision_pool_factor=vision_pool_factor, vision_num_layers=vision_num_layers, ops=ops,
        )
        del ckpt
        # which GEMMs run FP8 is part of what the activation scales belong to
        self.options["fp8_keep_bf16"] = sorted(self.pipeline.fp8_keep_bf16) if use_fp8 else []
        from flash_rt.models.pi_preprocess import PiInputs  # noqa: PLC0415

        # the model-independent IO (state normalisation, prompt format, noise, actions) is shared
        # with the reference frontends, so both arches feed their model identical inputs
        self.tokenizer = self._load_tokenizer(tokenizer)
        self.inputs = PiInputs(self.config, self.norm_stats, self.tokenizer, num_views)
        self.cache_frames = cache_frames
        self._calls_since_encode = None  # None: the next call must encode the prefix
        self._encoded = None  # (prompt, length) of the prefix in the KV cache
        self.autotune = autotune
        self.attention_backend = self.pipeline.autotune_attention(autotune)
        self._rng = np.random.default_rng()
        self._prompt = None
        self._prompt_state = None
        self._fingerprint = self._checkpoint_fingerprint()
        if recalibrate:
            self.recalibrate()
        else:
            self._load_cached_calibration()

    # ------------------------------------------------------------------ loading
    def pipeline_class(self):
        """The ``PaliGemmaHopperPipeline`` subclass of this model (imported lazily)."""
        raise NotImplementedError

    def _load_checkpoint(self, checkpoint):
        if hasattr(checkpoint, "state_dict") and hasattr(checkpoint, "config"):
            return checkpoint  # an already loaded PiCheckpoint (tests, the benchmark)
        from flash_rt.models.pi_checkpoint import load_pi_checkpoint  # noqa: PLC0415

        # fp32 straight onto the GPU: the folding runs there, then the fp32 copy is dropped
        return load_pi_checkpoint(checkpoint, self.model_type, dtype=self._torch.float32, device=self.device)

    def _load_tokenizer(self, explicit):
        from flash_rt.models.paligemma_tokenizer import PaligemmaTokenizer, find_tokenizer  # noqa: PLC0415

        return PaligemmaTokenizer(find_tokenizer(explicit, self.checkpoint_dir))

    # ------------------------------------------------------------------ prompt
    def set_prompt(self, prompt: str, state=None):
        """Tokenize the prompt (with the discretised, normalised state) and select its bucket."""
        ids = self.prompt_ids(prompt, state)
        bucket = self.pipeline.set_prompt_tokens(ids)
        self._prompt, self._prompt_state = prompt, None if state is None else np.array(state, copy=True)
        if (prompt, bucket.length) != self._encoded:
            # new text or a new length: the cached prefix cannot serve it (cache_frames); only a
            # same-length state change may reuse a stale prefix until the next re-encode
            self._calls_since_encode = None
        return bucket.length

    def prompt_ids(self, prompt, state) -> np.ndarray:
        """The prompt's token ids, exactly its length (a bucket per length: no padding)."""
        if state is None:
            raise InputError(
                "Pi0.5 puts the robot state into the prompt: pass predict(images, prompt, state=...) "
                "(a 1-D array of the robot's state values)"
            )
        ids, mask = self.inputs.prompt_tokens(prompt, self.inputs.normalized_state(state))
        return ids[mask]

    # ------------------------------------------------------------------ inference
    def infer(self, observation, noise=None) -> np.ndarray:
        if self.pipeline.current is None:
            raise InputError("no prompt set: call predict(images, prompt, state) or set_prompt(prompt, state) first")
        self._load_observation(observation, noise)
        encode = True
        if self.cache_frames is not None:
            encode = self._calls_since_encode is None or self._calls_since_encode + 1 >= self.cache_frames
            self._calls_since_encode = 0 if encode else self._calls_since_encode + 1
            if encode:
                self._encoded = (self._prompt, self.pipeline.current.length)
        was_calibrated = self.pipeline.calibrated
        actions = self.pipeline.infer(prefix=encode)
        if not was_calibrated:
            self._save_calibration()
        return self._postprocess(actions)

    def _load_observation(self, observation, noise):
        from flash_rt.models.pi_preprocess import IMAGE_KEYS, observation_images  # noqa: PLC0415

        # images at any size: the graph copies them in, resizes camera-size ones with padding and
        # scales to [-1, 1], all on the GPU
        keys = tuple(k for k in self.config.camera_keys if k not in IMAGE_KEYS)
        keys = keys if len(keys) >= self.num_views else ()
        pipe = self.pipeline  # written in place into its pinned staging buffers; its graph copies them in
        pipe.stage_images(observation_images(observation, self.num_views, keys))
        pipe.noise_host.numpy()[...] = self.inputs.noise(noise, self._rng)
        self._stage_state(observation)

    def _stage_state(self, observation):
        """Pi0: the normalised state into the pipeline's staging buffer. Pi0.5: it went into the prompt."""

    def _postprocess(self, actions: np.ndarray) -> np.ndarray:
        return self.inputs.actions(actions)

    # ------------------------------------------------------------------ buckets
    def warm_state_prompt_buckets(self, images, prompt, states) -> list[int]:
        """Capture the graph of every prompt length the given states produce; returns the sorted
        lengths. The prompt/state set before the call is restored afterwards."""
        observation = images if isinstance(images, Mapping) else {"images": list(images)}
        before = (self._prompt, self._prompt_state)
        lengths = set()
        for state in states:
            lengths.add(self.set_prompt(prompt, state))
            self._load_observation(observation, None)
            was_calibrated = self.pipeline.calibrated
            self.pipeline.warm_buckets([self.prompt_ids(prompt, state)])
            if not was_calibrated:
                self._save_calibration()
        if before[0] is not None:
            self.set_prompt(*before)
        return sorted(lengths)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, observations, percentile: float | None = None, prompt=None, state=None):
        """FP8 activation scales from several observations: per GEMM input, the max (or the given
        percentile) of each observation's absolute max. Observations are (images, state) pairs
        or observation dicts with a "state"; the current prompt is used unless one is given."""
        from flash_rt.models.paligemma_hopper import calibrate_amax  # noqa: PLC0415

        prompt = prompt or self._prompt
        if prompt is None:
            raise InputError("calibrate() needs a prompt: pass prompt=... or call set_prompt first")
        observed = []
        for obs in observations:
            if isinstance(obs, tuple):
                obs = {"images": list(obs[0]), "state": obs[1]}
            obs_state = obs.get("state", state) if isinstance(obs, Mapping) else state
            self.set_prompt(prompt, obs_state)
            self._load_observation(obs, None)
            observed.append(self.pipeline.observe_amax())
        self.pipeline.set_act_amax(calibrate_amax(observed, percentile))
        self._save_calibration()

    def recalibrate(self):
        """Forget the FP8 scales (and their cache file); the next call calibrates again."""
        self.pipeline.clear_calibration()
        path = self._calibration_path()
        if path is not None:
            path.unlink(missing_ok=True)

    def _checkpoint_fingerprint(self):
        if self.checkpoint_dir is None:
            return None
        try:
            from flash_rt.core.quant.calibrator import checkpoint_fingerprint  # noqa: PLC0415
        except ImportError:
            return None
        try:
            return checkpoint_fingerprint(self.checkpoint_dir)
        except Exception:  # an unreadable checkpoint dir only costs the cache, never the load
            return None

    def _calibration_path(self):
        if self._fingerprint is None or not self.pipeline.fp8_linears():
            return None
        from flash_rt.core.quant.calibrator import calibration_path  # noqa: PLC0415

        return calibration_path(self._fingerprint, self.options)

    def _load_cached_calibration(self):
        if self._fingerprint is None or self.pipeline.calibrated:
            return
        from flash_rt.core.quant.calibrator import load_calibration  # noqa: PLC0415

        names = [lin.name for lin in self.pipeline.fp8_linears()]
        scales = load_calibration(None, fingerprint=self._fingerprint, options=self.options, expect=names)
        if scales is not None:
            self.pipeline.set_act_amax({n: float(scales[n]) for n in names})

    def _save_calibration(self):
        if self._fingerprint is None or not self.pipeline.fp8_linears():
            return
        from flash_rt.core.quant.calibrator import save_calibration  # noqa: PLC0415

        save_calibration(None, self.pipeline.act_amax(), fingerprint=self._fingerprint, options=self.options)
