"""Typed errors. Every message says what was expected, what was found, and how to fix it."""


class FlashRTError(Exception):
    """Base class of every error FlashRT raises on purpose."""


class ConfigError(FlashRTError, ValueError):
    """An option, a model config or an install is not what the call needs."""


class CheckpointError(FlashRTError):
    """A checkpoint is missing, of the wrong model, incomplete or corrupt."""


class HardwareError(FlashRTError):
    """The GPU (or its absence) cannot run the requested path."""


class InputError(FlashRTError, ValueError):
    """An observation, prompt or state handed to the model is malformed."""


class CalibrationError(FlashRTError):
    """FP8 calibration could not produce trustworthy scales."""


__all__ = [
    "FlashRTError",
    "ConfigError",
    "CheckpointError",
    "HardwareError",
    "InputError",
    "CalibrationError",
]
