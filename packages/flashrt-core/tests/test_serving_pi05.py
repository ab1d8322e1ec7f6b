"""``flashrt serve`` with the tiny random-weight Pi0.5 on the CPU (the reference frontend),
driven by the unmodified openpi-client: served chunks equal ``predict`` with the same noise, in
the LIBERO and DROID layouts; and a soak of 10,000 requests with the server's RSS checked."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

pytest.importorskip("torch")
make_checkpoint = pytest.importorskip("flash_rt.models.pi_make_checkpoint")

import serving_support as support  # noqa: E402

import flash_rt  # noqa: E402
from flash_rt.errors import ConfigError  # noqa: E402
from flash_rt.serving.openpi_server import PolicyServer  # noqa: E402

NUM_STEPS = 2  # flow steps: keeps the CPU reference quick; the serving path is the same


@pytest.fixture(scope="module")
def tiny_pi05(tmp_path_factory):
    ckpt = make_checkpoint.write_random_checkpoint(tmp_path_factory.mktemp("pi05") / "tiny", "pi05", "tiny",
                                                   "lerobot")

    def load():
        try:
            return flash_rt.load_model(str(ckpt), config="pi05", hardware="cpu", num_steps=NUM_STEPS)
        except ConfigError as exc:  # flashrt-pi05's CPU frontend not installed
            pytest.skip(f"no Pi0.5 CPU frontend: {exc}")

    return ckpt, load


@pytest.fixture(scope="module")
def client_python():
    return support.openpi_client_python()


def _noise(model):
    config = model.frontend.config
    rng = np.random.default_rng(3)
    return rng.standard_normal((config.action_horizon, config.action_dim)).astype(np.float32)


@pytest.mark.parametrize("layout", ["libero", "droid"])
def test_tiny_pi05_served_equals_predict(tiny_pi05, client_python, tmp_path, layout):
    _, load = tiny_pi05
    model, reference = load(), load()
    noise = _noise(model)
    out = tmp_path / "r.npz"
    with PolicyServer(model, "127.0.0.1", 0, noise_fn=lambda: noise) as server:
        report = support.run_client({"mode": "infer", "port": server.port, "layout": layout, "n": 2, "seed": 4,
                                     "hw": [224, 224], "out": str(out)}, timeout=300)
    requests = support.load_requests(out)
    for req in requests:
        obs = req["obs"]
        if layout == "libero":
            images, state = [obs["observation/image"], obs["observation/wrist_image"]], obs["observation/state"]
        else:
            images = [obs["observation/exterior_image_1_left"], obs["observation/wrist_image_left"]]
            state = np.concatenate([obs["observation/joint_position"], obs["observation/gripper_position"]])
        expected = reference.predict(images, obs["prompt"], np.asarray(state, np.float32), noise=noise)
        width = min(expected.shape[1], 7 if layout == "libero" else 8)
        assert req["actions"].shape == (expected.shape[0], width)
        assert np.isfinite(req["actions"]).all() and float(np.abs(req["actions"]).max()) > 0
        np.testing.assert_allclose(req["actions"], expected[:, :width], atol=1e-5, rtol=1e-5)
    assert report["actions_shape"][0] == model.frontend.config.action_horizon


# 10,000 requests of the tiny Pi0.5 (1 view, 1 denoise step: ~50 ms a request on a busy 2-core
# machine, ~8 min) with fresh states: Pi0.5 tokenizes the state, so a per-state cache would leak.
# FLASHRT_PI05_SOAK_REQUESTS overrides the count.
PI05_SOAK_REQUESTS = int(os.environ.get("FLASHRT_PI05_SOAK_REQUESTS", "10000"))


@pytest.mark.slow
def test_tiny_pi05_soak_without_memory_growth(tiny_pi05, client_python, tmp_path):
    ckpt, load = tiny_pi05
    load()  # skips without the Pi0.5 CPU frontend
    server = support.ServeProcess(tmp_path, ["--config", "pi05", "--checkpoint", str(ckpt), "--hardware", "cpu",
                                             "--num-views", "1", "--num-steps", "1", "--port", "0",
                                             "--log-level", "WARNING"], servetest=False)
    try:
        def batch(total, seed):
            reports = support.run_clients([
                {"mode": "soak", "port": server.port, "n": total // 2, "shape": [10, 7], "seed": seed + i,
                 "layout": "generic_one", "hw": [224, 224], "fresh_state": True} for i in range(2)],
                timeout=max(600, total * 5))
            assert all(r["ok"] for r in reports), reports
            return sum(r["n"] for r in reports)

        batch(10, seed=0)
        before = server.rss_kb()
        served = batch(PI05_SOAK_REQUESTS, seed=10)
        after = server.rss_kb()
        assert served == PI05_SOAK_REQUESTS // 2 * 2
        assert after - before < 20 * 1024, f"server RSS grew {after - before} kB over {served} requests"
    finally:
        returncode = server.stop()
    assert returncode == 0, server.log()
