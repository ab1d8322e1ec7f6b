"""The third-party plugin path, end to end: entry point -> registry -> load_model -> predict."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest

import flash_rt
from flash_rt.errors import CheckpointError, InputError
from flashrt_toy.model import ToyConfig, write_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "toy", seed=7)


def _expected(checkpoint, images, state, prompt):
    """The toy policy recomputed independently from the raw safetensors file."""
    from safetensors.numpy import load_file

    w = load_file(str(checkpoint / "model.safetensors"))
    colour = np.mean([img.astype(np.float64) / 127.5 - 1.0 for img in images], axis=0).mean(axis=(0, 1))
    feature = (zlib.crc32(prompt.encode()) % 1000) / 1000.0
    hidden = np.tanh(w["encoder.image.weight"] @ colour + w["encoder.state.weight"] @ state
                     + w["encoder.bias"] + feature)
    return (w["head.weight"] @ hidden + w["head.bias"]).reshape(5, 3)


def test_entry_point_registers_toy():
    from flash_rt.hardware import registered_routes

    routes = registered_routes()
    assert routes[("toy", "torch", "cpu")].distribution == "flashrt-plugin-toy"
    assert routes[("toy", "torch", "cpu")].measured
    assert not routes[("toy", "torch", "hopper")].measured


def test_load_model_and_predict_match_independent_computation(checkpoint):
    rng = np.random.default_rng(0)
    model = flash_rt.load_model(str(checkpoint), config="toy", hardware="cpu", num_views=2)
    images = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(2)]
    state = rng.standard_normal(4)
    actions = model.predict(images, "stack the blocks", state)
    assert actions.shape == (5, 3) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, _expected(checkpoint, images, state, "stack the blocks"), rtol=1e-5, atol=1e-6)
    # prompt reused, new state
    state2 = rng.standard_normal(4)
    np.testing.assert_allclose(model.predict(images, None, state2),
                               _expected(checkpoint, images, state2, "stack the blocks"), rtol=1e-5, atol=1e-6)


def test_bad_input_is_input_error(checkpoint):
    model = flash_rt.load_model(str(checkpoint), config="toy", hardware="cpu", num_views=1)
    image = np.full((8, 8, 3), 9, np.uint8)
    with pytest.raises(InputError, match="state must be 4 finite floats"):
        model.predict([image], "t", np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        model.predict([image.astype(np.float32)], "t", np.zeros(4))


def test_missing_tensor_is_checkpoint_error(tmp_path):
    from safetensors.numpy import save_file

    directory = write_checkpoint(tmp_path / "bad")
    shapes = ToyConfig().shapes()
    tensors = {k: np.ones(v, np.float32) for k, v in shapes.items() if k != "head.bias"}
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="head.bias"):
        flash_rt.load_model(str(directory), config="toy", hardware="cpu")


def test_wrong_model_type_is_checkpoint_error(tmp_path):
    directory = write_checkpoint(tmp_path / "other")
    (directory / "config.json").write_text(json.dumps({"model_type": "pi05"}))
    with pytest.raises(CheckpointError, match="expected 'toy'"):
        flash_rt.load_model(str(directory), config="toy", hardware="cpu")


def test_cli_subcommand_from_plugin(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flash_rt.cli", "toy-make-checkpoint", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c" / "model.safetensors").is_file()
    info = subprocess.run([sys.executable, "-m", "flash_rt.cli", "info"], capture_output=True, text=True,
                          timeout=120)
    assert "flashrt-plugin-toy" in info.stdout
