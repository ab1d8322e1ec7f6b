"""FlashRT: a realtime inference engine for robot policies.

Importing flash_rt initialises no CUDA context and imports no model package, jax or torch.
"""

__version__ = "0.1.0"

from flash_rt.api import VLAModel, load_model  # noqa: E402

__all__ = ["__version__", "load_model", "VLAModel"]
