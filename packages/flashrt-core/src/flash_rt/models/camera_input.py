"""Camera-size images, resized with padding on the GPU inside the call's graph.

predict() accepts images at the camera's size (480x640 is common). Resizing them on the host costs
0.55-1.88 ms per image on a 2-core server CPU (docs/benchmarks.md, "Where the time goes"); here the
host only copies each image into a pinned staging buffer and the graph does the rest: the
host-to-device copy, the resize (the same torch code as the host path, pi_preprocess.
resize_with_pad_into) and the padding, straight into the pipeline's (V, S, S, 3) image buffer.

A graph reads fixed addresses, so each set of camera sizes (a "layout") has its own staging buffers
and its own graphs; a robot's cameras keep their sizes, so that is one capture per prompt length.
"""

from __future__ import annotations

import numpy as np
import torch

from flash_rt.models.pi_preprocess import resize_with_pad_into


class CameraLayout:
    """Staging buffers for one set of per-view image sizes; ``copy_in`` is what the graph runs."""

    def __init__(self, shapes: tuple[tuple[int, int], ...], size: int, device, pin: bool):
        self.key = "+".join(f"{h}x{w}" for h, w in shapes)  # names its graphs: "full@480x640+224x224"
        self.host = [torch.empty((h, w, 3), dtype=torch.uint8, pin_memory=pin) for h, w in shapes]
        # a view already at the model's size is copied straight in, without a resize
        self.raw = [None if (h, w) == (size, size) else torch.empty((h, w, 3), dtype=torch.uint8, device=device)
                    for h, w in shapes]

    def stage(self, images: list[np.ndarray]):
        """Host only, between calls: the images into the pinned staging buffers."""
        for host, image in zip(self.host, images):
            host.numpy()[...] = image

    def copy_in(self, images: torch.Tensor):
        """Staged images -> ``images`` (V, S, S, 3) uint8 on the device (eager = capture)."""
        for i, (host, raw) in enumerate(zip(self.host, self.raw)):
            if raw is None:
                images[i].copy_(host, non_blocking=True)
            else:
                raw.copy_(host, non_blocking=True)
                resize_with_pad_into(raw, images[i])
