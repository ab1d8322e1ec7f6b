"""Camera-size images resized in the call's graph (camera_input.py) against the host path
(pi_preprocess.resize_with_pad, the plain torch CPU code): on the CPU bitwise, on the GPU (marked
gpu) captured in a CUDA graph and replayed on new pixels, within one level on a few pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flash_rt.models.camera_input import CameraLayout
from flash_rt.models.pi_preprocess import resize_with_pad

SIZE = 224
# shrunk (antialiased) with padded rows / columns, enlarged (no antialias), already at size
SHAPES = ((480, 640), (256, 256), (180, 320), (640, 360), (96, 128), (SIZE, SIZE))
# The GPU's antialiased interpolation sums in another order than the CPU's separable passes: a value
# within float rounding of .5 may then round the other way. Measured on an H100 (2026-12-07): max
# one level, on 6.5-7.0e-4 of the values of these shapes.
MAX_DIFFERING = 1e-3


def _cameras(rng, shapes):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _host(cameras):
    return np.stack([resize_with_pad(c, SIZE) for c in cameras])


def test_layout_on_the_cpu_is_the_host_path_bitwise():
    rng = np.random.default_rng(0)
    layout = CameraLayout(SHAPES, SIZE, "cpu", pin=False)
    assert layout.key == "480x640+256x256+180x320+640x360+96x128+224x224"
    assert layout.raw[-1] is None  # at size: copied, not resized
    out = torch.full((len(SHAPES), SIZE, SIZE, 3), 77, dtype=torch.uint8)
    for _ in range(2):  # new pixels into the same buffers
        cameras = _cameras(rng, SHAPES)
        layout.stage(cameras)
        layout.copy_in(out)
        np.testing.assert_array_equal(out.numpy(), _host(cameras))


def test_host_resize_pads_symmetrically_with_black():
    image = np.full((100, 200, 3), 255, dtype=np.uint8)
    out = resize_with_pad(image, SIZE)
    rows = np.flatnonzero(out[:, SIZE // 2, 0])
    assert (rows[0], rows[-1]) == (56, 167)  # 112 rows, 56 black above and below
    assert out[rows[0] : rows[-1] + 1].min() == 255 and out[: rows[0]].max() == 0 and out[rows[-1] + 1 :].max() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU")
def test_layout_in_a_cuda_graph_matches_the_host_path():
    rng = np.random.default_rng(1)
    layout = CameraLayout(SHAPES, SIZE, "cuda", pin=True)
    out = torch.empty((len(SHAPES), SIZE, SIZE, 3), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        layout.stage(_cameras(rng, SHAPES))
        layout.copy_in(out)  # warm-up outside capture
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            layout.copy_in(out)
        for _ in range(3):  # the graph reads what is staged at replay
            cameras = _cameras(rng, SHAPES)
            layout.stage(cameras)
            out.fill_(77)  # poison: every pixel, padding included, comes from the replay
            graph.replay()
            stream.synchronize()
            got, want = out.cpu().numpy().astype(np.int16), _host(cameras).astype(np.int16)
            diff = np.abs(got - want)
            differing = float((diff > 0).mean())
            print(f"camera layout on the GPU vs host: max diff {diff.max()}, differing {differing:.2e}")
            assert diff.max() <= 1, f"max difference {diff.max()} levels"
            assert differing <= MAX_DIFFERING, f"{differing:.2e} of the values differ by one level"
            np.testing.assert_array_equal(got[-1], want[-1])  # at size: a plain copy
