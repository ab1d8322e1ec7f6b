"""``load_model`` and ``VLAModel``: the public entry points.

A frontend is any class registered for (config, framework, arch). ``load_model`` passes it the
options its constructor declares; ``VLAModel.predict`` calls ``frontend.set_prompt`` when the
prompt (or, for frontends whose ``set_prompt`` takes ``state``, the state) changes, then
``frontend.infer(observation, noise=...)``. docs/plugins.md spells the contract out.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from flash_rt.errors import ConfigError, InputError
from flash_rt.hardware import HARDWARE_CHOICES, detect_arch, registered_configs, resolve_pipeline_class

SEED_CONFIGS = (
    "pi05",
    "pi0",
    "groot",
    "groot_n17",
    "pi0fast",
    "motus",
    "wan22_ti2v_5b",
    "cosmos3_video",
)
FRAMEWORKS = ("torch", "jax")
FP16_ARCHS = ("rtx_sm120", "rtx_sm89")

_DEFAULTS = {
    "autotune": 3,
    "recalibrate": False,
    "weight_cache": True,
    "device": None,
    "decode_cuda_graph": False,
    "decode_graph_steps": 80,
    "max_decode_steps": 256,
    "embodiment_tag": None,
    "action_horizon": None,
    "use_fp4": False,
    "fp4_layers": None,
    "use_awq": None,
    "awq_alpha": 0.5,
    "use_p1_split_gu": None,
    "num_steps": None,
    "vision_pool_factor": None,
    "vision_num_layers": None,
    "cache_frames": None,
    "use_fp8": True,
    "use_fp16": False,
    "tokenizer": None,
}


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def _validate(
    *, config, framework, hardware, num_views, autotune, num_steps, vision_pool_factor,
    vision_num_layers, cache_frames, use_fp8, use_fp16,
) -> None:
    accepted_configs = sorted(set(SEED_CONFIGS) | registered_configs())
    if config not in accepted_configs:
        raise ConfigError(f"unknown config {config!r}; accepted: {_choices(accepted_configs)}")
    if framework not in FRAMEWORKS:
        raise ConfigError(f"unknown framework {framework!r}; accepted: {_choices(FRAMEWORKS)}")
    if hardware not in HARDWARE_CHOICES:
        raise ConfigError(f"unknown hardware {hardware!r}; accepted: {_choices(HARDWARE_CHOICES)}")
    if num_views not in (1, 2, 3) or isinstance(num_views, bool):
        raise ConfigError(f"num_views must be one of 1, 2, 3; got {num_views!r}")
    if not isinstance(autotune, int) or isinstance(autotune, bool) or autotune < 0:
        raise ConfigError(f"autotune must be an int >= 0 (0 off, 3 default, 5+ thorough); got {autotune!r}")
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
        raise ConfigError(f"num_steps must be None or an int >= 1; got {num_steps!r}")
    if vision_pool_factor is not None and vision_pool_factor not in (1, 2, 4):
        raise ConfigError(f"vision_pool_factor must be None or one of 1, 2, 4; got {vision_pool_factor!r}")
    if vision_num_layers is not None and (
        not isinstance(vision_num_layers, int) or not 1 <= vision_num_layers <= 27
    ):
        raise ConfigError(f"vision_num_layers must be None or an int in [1, 27]; got {vision_num_layers!r}")
    if cache_frames is not None and (not isinstance(cache_frames, int) or cache_frames < 1):
        raise ConfigError(f"cache_frames must be None or an int >= 1; got {cache_frames!r}")
    if use_fp16:
        if use_fp8:
            raise ConfigError("use_fp16=True requires use_fp8=False (the FP16 path replaces FP8)")
        if config != "pi05" or framework != "torch":
            raise ConfigError(
                f"use_fp16=True is valid only for config='pi05', framework='torch'; got "
                f"config={config!r}, framework={framework!r}"
            )
        if hardware not in FP16_ARCHS:
            raise ConfigError(
                f"use_fp16=True is valid only on hardware in {_choices(FP16_ARCHS)}; resolved "
                f"hardware is {hardware!r}"
            )


def _constructor_kwargs(cls, options: dict) -> dict:
    """The options cls.__init__ declares (all of them if it takes **kwargs). Non-default
    values of options it does not take are warned about, not silently dropped."""
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    passed, ignored = {}, []
    for name, value in options.items():
        if takes_all or name in params:
            passed[name] = value
        elif name in _DEFAULTS and value != _DEFAULTS[name]:
            ignored.append(name)
    if ignored:
        warnings.warn(
            f"{cls.__name__} does not take {', '.join(ignored)}; ignored", stacklevel=3
        )
    return passed


def load_model(
    checkpoint: str,
    framework: str = "torch",
    num_views: int = 2,
    autotune: int = 3,
    recalibrate: bool = False,
    weight_cache: bool = True,
    config: str = "pi05",
    device=None,
    decode_cuda_graph: bool = False,
    decode_graph_steps: int = 80,
    max_decode_steps: int = 256,
    hardware: str = "auto",
    embodiment_tag: str | None = None,
    action_horizon: int | None = None,
    use_fp4: bool = False,
    fp4_layers: tuple[int, ...] | None = None,
    use_awq: bool | None = None,
    awq_alpha: float = 0.5,
    use_p1_split_gu: bool | None = None,
    num_steps: int | None = None,
    vision_pool_factor: int | None = None,
    vision_num_layers: int | None = None,
    cache_frames: int | None = None,
    use_fp8: bool = True,
    use_fp16: bool = False,
    tokenizer: str | None = None,
) -> VLAModel:
    """Load ``checkpoint`` with the frontend registered for (config, framework, arch).

    ``tokenizer`` (FlashRT extension): path of the tokenizer model file, where the checkpoint
    does not ship one (PaliGemma's SentencePiece model, for instance).
    """
    if hardware not in HARDWARE_CHOICES:
        raise ConfigError(f"unknown hardware {hardware!r}; accepted: {_choices(HARDWARE_CHOICES)}")
    arch = detect_arch() if hardware == "auto" else hardware
    _validate(
        config=config, framework=framework, hardware=arch, num_views=num_views,
        autotune=autotune, num_steps=num_steps, vision_pool_factor=vision_pool_factor,
        vision_num_layers=vision_num_layers, cache_frames=cache_frames, use_fp8=use_fp8,
        use_fp16=use_fp16,
    )
    cls = resolve_pipeline_class(config, framework, arch)
    options = {
        "num_views": num_views,
        "autotune": autotune,
        "recalibrate": recalibrate,
        "weight_cache": weight_cache,
        "device": device,
        "decode_cuda_graph": decode_cuda_graph,
        "decode_graph_steps": decode_graph_steps,
        "max_decode_steps": max_decode_steps,
        "embodiment_tag": embodiment_tag,
        "action_horizon": action_horizon,
        "use_fp4": use_fp4,
        "fp4_layers": fp4_layers,
        "use_awq": use_awq,
        "awq_alpha": awq_alpha,
        "use_p1_split_gu": use_p1_split_gu,
        "num_steps": num_steps,
        "vision_pool_factor": vision_pool_factor,
        "vision_num_layers": vision_num_layers,
        "cache_frames": cache_frames,
        "use_fp8": use_fp8,
        "use_fp16": use_fp16,
        "tokenizer": tokenizer,
    }
    frontend = cls(str(checkpoint), **_constructor_kwargs(cls, options))
    return VLAModel(frontend, framework=framework, config=config, arch=arch)


_IMAGE_KEYS = ("image", "wrist_image", "wrist_image_right")


def same_state(a, b) -> bool:
    if a is None or b is None:
        return a is b
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=False))


class VLAModel:
    """Inference wrapper around one frontend."""

    def __init__(self, frontend, *, framework: str, config: str | None = None, arch: str | None = None):
        self._frontend = frontend
        self._framework = framework
        self.config = config
        self.arch = arch
        self._prompt: str | None = None
        self._prompt_state = None
        set_prompt = getattr(frontend, "set_prompt", None)
        self._prompt_takes_state = set_prompt is not None and "state" in _parameters(set_prompt)
        infer = getattr(frontend, "infer", None)
        self._infer_takes_noise = infer is not None and "noise" in _parameters(infer)

    @property
    def frontend(self):
        return self._frontend

    @property
    def framework(self) -> str:
        return self._framework

    @property
    def prompt(self) -> str | None:
        return self._prompt

    def set_prompt(self, *args, **kwargs):
        result = self._frontend.set_prompt(*args, **kwargs)
        prompt = kwargs.get("prompt", args[0] if args else None)
        if isinstance(prompt, str):
            self._prompt = prompt
            self._prompt_state = _copy_state(kwargs.get("state", args[1] if len(args) > 1 else None))
        return result

    def infer(self, *args, **kwargs):
        return self._frontend.infer(*args, **kwargs)

    def predict(self, images, prompt=None, state=None, noise=None) -> np.ndarray:
        """Run one inference step and return the action chunk, (action_horizon, action_dim).

        ``noise`` (FlashRT extension): the initial flow noise, (action_horizon, action_dim),
        for reproducible runs; None draws fresh noise.
        """
        if prompt is None:
            if self._prompt is None:
                raise InputError(
                    "predict() needs a prompt on the first call (a task string such as "
                    "'pick up the cup'); later calls may pass None to reuse it"
                )
            prompt = self._prompt
        elif not isinstance(prompt, str):
            raise InputError(f"prompt must be a str; got {type(prompt).__name__}")
        observation = _observation(images, state)
        obs_state = observation.get("state")
        if self._prompt_takes_state:
            if prompt != self._prompt or not same_state(obs_state, self._prompt_state):
                self._frontend.set_prompt(prompt, state=obs_state)
                self._prompt, self._prompt_state = prompt, _copy_state(obs_state)
        elif prompt != self._prompt:
            self._frontend.set_prompt(prompt)
            self._prompt = prompt
        if noise is not None:
            if not self._infer_takes_noise:
                raise InputError(f"{type(self._frontend).__name__} does not accept noise=")
            return self._frontend.infer(observation, noise=noise)
        return self._frontend.infer(observation)

    def warm_state_prompt_buckets(self, images, prompt, states) -> list[int]:
        warm = getattr(self._frontend, "warm_state_prompt_buckets", None)
        if warm is None:
            raise ConfigError(
                f"{type(self._frontend).__name__} has no prompt-length buckets to warm (only "
                "frontends that put the state into the prompt, such as Pi0.5 on a GPU, do)"
            )
        return sorted(int(n) for n in warm(images, prompt, states))

    def recalibrate(self) -> None:
        """Clear the FP8 calibration cache; the next predict() calibrates again."""
        recal = getattr(self._frontend, "recalibrate", None)
        if recal is not None:
            recal()

    def __repr__(self) -> str:
        return f"VLAModel(config={self.config!r}, framework={self._framework!r}, arch={self.arch!r}, frontend={type(self._frontend).__name__})"


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _copy_state(state):
    return None if state is None else np.array(state, copy=True)


def _observation(images, state) -> dict:
    if isinstance(images, Mapping):
        unknown_images = [k for k in images if k.endswith("image") and k not in _IMAGE_KEYS]
        if unknown_images:
            raise InputError(
                f"unknown image keys {unknown_images}; a dict observation uses {list(_IMAGE_KEYS)}"
            )
        observation = dict(images)
        if state is not None and "state" not in observation:
            observation["state"] = state
        return observation
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence) or isinstance(images, str):
        raise InputError(
            "images must be a list of (H, W, 3) uint8 arrays (base, left wrist, right wrist) or a "
            f"dict with keys {list(_IMAGE_KEYS)}; got {type(images).__name__}"
        )
    observation = {"images": list(images)}
    if state is not None:
        observation["state"] = state
    return observation
