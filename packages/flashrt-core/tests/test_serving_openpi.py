"""``PolicyServer`` driven by the UNMODIFIED openpi-client 0.1.2 (own venv, numpy<2), on loopback.

The model is TinyServePolicy (serving_testmodel.py), loaded through flash_rt.load_model; every
served action chunk is compared with ``predict`` of a second instance on the same observation."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import serving_support as support  # noqa: E402
from serving_testmodel import CONFIG, TARGET, write_checkpoint  # noqa: E402

import flash_rt  # noqa: E402
from flash_rt.errors import ConfigError  # noqa: E402
from flash_rt.serving.openpi_server import PolicyServer, parse_metadata  # noqa: E402

ATOL = 2e-5  # the server sends state as float32; the reference computes with the client's float64


@pytest.fixture(scope="module")
def client_python():
    return support.openpi_client_python()


class CountingModel:
    """Wraps a VLAModel and counts predict() calls (which run on the server's worker thread)."""

    def __init__(self, model):
        self.model, self.calls, self.frontend = model, 0, model.frontend

    def predict(self, images, prompt=None, state=None, noise=None):
        self.calls += 1
        return self.model.predict(images, prompt, state, noise=noise)


@pytest.fixture
def start_server(clean_registry, tmp_path, client_python):
    clean_registry.register(CONFIG, "torch", "cpu", TARGET, distribution="tests")
    servers = []

    def start(num_views=2, model_wrapper=None, **options):
        ckpt_options = {k: options.pop(k) for k in ("state_dim", "horizon", "delay_s", "seed")
                        if k in options}
        ckpt = write_checkpoint(tmp_path / f"ckpt{len(servers)}", **ckpt_options)
        model = flash_rt.load_model(str(ckpt), config=CONFIG, hardware="cpu", num_views=num_views)
        reference = flash_rt.load_model(str(ckpt), config=CONFIG, hardware="cpu", num_views=num_views)
        served = model_wrapper(model) if model_wrapper else model
        server = PolicyServer(served, "127.0.0.1", 0, **options).start()
        servers.append(server)
        return server, reference, served

    yield start
    for server in servers:
        server.stop()


def reference_inputs(layout, obs):
    """The openpi layout semantics, written out independently of flash_rt.serving.layouts."""
    if layout == "libero":
        return [obs["observation/image"], obs["observation/wrist_image"]], obs["observation/state"]
    if layout == "droid":
        state = np.concatenate([obs["observation/joint_position"], obs["observation/gripper_position"]])
        return [obs["observation/exterior_image_1_left"], obs["observation/wrist_image_left"]], state
    if layout == "aloha":
        cams = ("cam_high", "cam_left_wrist", "cam_right_wrist")
        return [obs["images"][c].transpose(1, 2, 0) for c in cams], obs["state"]
    if layout == "generic_list":
        return obs["images"], obs["state"]
    if layout == "generic_dict":
        return [obs["images"]["image"], obs["images"]["wrist_image"]], obs["state"]
    raise ValueError(layout)


OPENPI_WIDTH = {"libero": 7, "droid": 8, "aloha": 14, "generic_list": None, "generic_dict": None}


def check_against_reference(path, layout, reference, width, noise=None):
    requests = support.load_requests(path)
    assert requests
    prompt = None
    for req in requests:
        images, state = reference_inputs(layout, req["obs"])
        prompt = req["obs"].get("prompt", prompt)
        expected = reference.predict(list(images), prompt, np.asarray(state, dtype=np.float64), noise=noise)
        if width is not None:
            expected = expected[:, :width]
        assert req["actions"].shape == expected.shape
        np.testing.assert_allclose(req["actions"], expected, atol=ATOL, rtol=0)
    return requests


def test_handshake_metadata_and_libero_inference(start_server, tmp_path):
    server, reference, _ = start_server(metadata={"robot": "libero", "reset_pose": [0.0, 1.5]})
    out = tmp_path / "libero.npz"
    report = support.run_client({"mode": "infer", "port": server.port, "layout": "libero", "n": 4, "out": str(out)})
    assert report["metadata"] == {"robot": "libero", "reset_pose": [0.0, 1.5]}
    assert report["actions_shape"] == [10, 7] and report["actions_dtype"] == "<f4"
    # server_timing carries prev_total_ms from the second request on, as openpi's server does
    assert report["server_timing_keys"][0] == ["infer_ms", "queue_ms"]
    assert all(keys == ["infer_ms", "prev_total_ms", "queue_ms"] for keys in report["server_timing_keys"][1:])
    requests = check_against_reference(out, "libero", reference, 7)
    assert all(float(r["actions"].std()) > 1e-3 for r in requests)  # non-trivial outputs


@pytest.mark.parametrize("layout", ["libero", "droid", "aloha", "generic_list", "generic_dict"])
def test_each_layout_matches_predict(start_server, tmp_path, layout):
    views, state_dim = (3, 14) if layout == "aloha" else (2, 8)
    server, reference, _ = start_server(num_views=views, state_dim=state_dim, seed=3)
    out = tmp_path / f"{layout}.npz"
    report = support.run_client({"mode": "infer", "port": server.port, "layout": layout, "n": 3, "seed": 11,
                                 "hw": [24, 40], "out": str(out)})
    assert report["metadata"] == {}
    check_against_reference(out, layout, reference, OPENPI_WIDTH[layout])


def test_prompt_may_be_omitted_after_the_first_request(start_server, tmp_path):
    server, reference, _ = start_server()
    out = tmp_path / "p.npz"
    support.run_client({"mode": "infer", "port": server.port, "layout": "libero", "n": 3, "seed": 1,
                        "prompt_first_only": True, "out": str(out)})
    requests = check_against_reference(out, "libero", reference, 7)
    assert "prompt" in requests[0]["obs"] and "prompt" not in requests[1]["obs"]


def test_noise_fn_makes_serving_reproducible(start_server, tmp_path):
    noise = np.random.default_rng(5).standard_normal((10, 32)).astype(np.float32)
    server, reference, _ = start_server(noise_fn=lambda: noise)
    out = tmp_path / "n.npz"
    support.run_client({"mode": "infer", "port": server.port, "layout": "libero", "n": 2, "out": str(out)})
    check_against_reference(out, "libero", reference, 7, noise=noise)


def test_action_dim_option(start_server, tmp_path):
    server, reference, _ = start_server(action_dim=0)  # never slice: LIBERO gets all 32 dims
    out = tmp_path / "a.npz"
    report = support.run_client({"mode": "infer", "port": server.port, "layout": "libero", "n": 1, "out": str(out)})
    assert report["actions_shape"] == [10, 32]
    check_against_reference(out, "libero", reference, None)
    server, _, _ = start_server(action_dim=5)
    report = support.run_client({"mode": "infer", "port": server.port, "layout": "generic_list", "n": 1})
    assert report["actions_shape"] == [10, 5]


BAD_INPUTS = {
    "missing_key": "missing 'observation/state'",
    "wrong_type": "must be an image array",
    "bad_image_shape": "(H, W, 3)",
    "bad_image_channels": "(H, W, 3)",
    "nan_state": "NaN",
    "prompt_type": "'prompt' must be a string",
    "unknown_layout": "unrecognised observation layout",
    "model_input_error": "state must have shape (8,)",
    "not_msgpack": "not valid msgpack",
    "text_frame": "expected a binary msgpack frame",
    "object_dtype": "refused",
    "short_data": "needs",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_gets_a_short_message_then_1011_and_the_server_keeps_serving(start_server, kind):
    server, _, _ = start_server()
    report = support.run_client({"mode": "bad", "port": server.port, "kind": kind})
    message = report["message"]
    assert BAD_INPUTS[kind] in message, report
    assert "Traceback" not in message and 'File "' not in message and len(message) < 500
    if report["error"] == "RuntimeError":  # the unmodified client's reaction to the text frame
        assert report["after_error"] == "closed"
    assert report["close_code"] == 1011
    assert report["reconnect_actions_shape"] == [10, 7]  # a fresh connection is served


def test_oversized_frame_is_stopped_with_1009(start_server):
    server, _, _ = start_server(max_frame_bytes=2**20)
    report = support.run_client({"mode": "bad", "port": server.port, "kind": "oversized"})
    assert report["close_code"] == 1009 and "exceeds limit" in report["close_reason"]
    assert report["reconnect_actions_shape"] == [10, 7]


def test_sixteen_concurrent_clients_get_their_own_answers_in_order(start_server, tmp_path):
    server, reference, counted = start_server(delay_s=0.002, model_wrapper=CountingModel)
    layouts = ["libero", "droid", "generic_list", "generic_dict"]
    specs = [{"mode": "infer", "port": server.port, "layout": layouts[i % 4], "n": 6, "seed": 100 + i,
              "out": str(tmp_path / f"c{i}.npz")} for i in range(16)]
    support.run_clients(specs)
    for spec in specs:
        check_against_reference(spec["out"], spec["layout"], reference, OPENPI_WIDTH[spec["layout"]])
    assert counted.calls == 16 * 6


def _http_get(port, path, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_api_key(start_server, monkeypatch):
    server, _, _ = start_server(api_key="s3cret-key")
    assert support.run_client({"mode": "auth", "port": server.port, "api_key": "s3cret-key"}) == {
        "ok": True, "actions_shape": [10, 7]}
    assert support.run_client({"mode": "auth", "port": server.port}) == {
        "ok": False, "error": "InvalidStatus", "status": 401}
    assert support.run_client({"mode": "auth", "port": server.port, "api_key": "s3cret-kez"}) == {
        "ok": False, "error": "InvalidStatus", "status": 403}
    assert _http_get(server.port, "/healthz") == (200, "OK\n")  # health checks need no key
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    twice = [("Authorization", "Api-Key s3cret-key"), ("Authorization", "Api-Key other")]
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{server.port}", additional_headers=twice, open_timeout=10)
    assert refused.value.response.status_code == 401


def test_browser_origins_are_refused_unless_allowed(start_server):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    server, _, _ = start_server(allowed_origins=["https://dashboard.lab"])
    url = f"ws://127.0.0.1:{server.port}"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin="https://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    with connect(url, origin="https://dashboard.lab", open_timeout=10) as ws:
        assert ws.recv(timeout=5) == b"\x80"
    with connect(url, open_timeout=10) as ws:  # no Origin header: a robot client
        assert ws.recv(timeout=5) == b"\x80"


def test_healthz_and_handshakes_do_not_wait_for_inference(start_server):
    from websockets.sync.client import connect

    server, _, counted = start_server(delay_s=2.5, model_wrapper=CountingModel)
    assert _http_get(server.port, "/healthz") == (200, "OK\n")
    busy = threading.Thread(target=support.run_client,
                            args=({"mode": "infer", "port": server.port, "layout": "libero", "n": 1},))
    busy.start()
    deadline = time.monotonic() + 30
    while counted.calls == 0 and time.monotonic() < deadline:  # wait until the worker is busy
        time.sleep(0.01)
    assert counted.calls == 1
    t0 = time.monotonic()
    assert _http_get(server.port, "/healthz") == (200, "OK\n")
    with connect(f"ws://127.0.0.1:{server.port}", compression=None) as ws:
        assert ws.recv(timeout=5) == b"\x80"  # msgpack({}): the metadata frame
    elapsed = time.monotonic() - t0
    busy.join(60)
    assert elapsed < 1.5, f"health check + handshake took {elapsed:.2f} s while an inference ran"
    assert _http_get(server.port, "/other")[0] in (400, 426)  # not a websocket upgrade


def test_client_leaving_mid_inference_costs_only_that_inference(start_server):
    server, _, counted = start_server(delay_s=0.6, model_wrapper=CountingModel)
    # Two connections in a row each send a request and leave without reading the answer: the
    # first starts computing, the second queues behind it and is dropped before it starts.
    support.run_client({"mode": "disconnect", "port": server.port, "connections": 2})
    report = support.run_client({"mode": "infer", "port": server.port, "layout": "libero", "n": 2})
    assert report["actions_shape"] == [10, 7]  # the worker is not stuck
    assert counted.calls == 1 + 2


def test_start_stop_and_port_zero(start_server):
    server, _, _ = start_server()
    port = server.port
    assert port > 0
    server.stop()
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))
    server.start()  # and the server can start again
    assert server.port > 0
    assert support.run_client({"mode": "infer", "port": server.port, "layout": "libero", "n": 1})["n"] == 1
    server.stop()
    with pytest.raises(RuntimeError, match="not running"):
        _ = PolicyServer(object(), port=0).port
    other, _, _ = start_server()
    with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
        PolicyServer(object(), "127.0.0.1", other.port).start()


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="metadata"):
        PolicyServer(object(), metadata=[1])
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        PolicyServer(object(), max_frame_bytes=10)
    with pytest.raises(ConfigError, match="api_key"):
        PolicyServer(object(), api_key=" ")
    with pytest.raises(ConfigError, match="JSON object"):
        parse_metadata("[1, 2]")
    with pytest.raises(ConfigError, match="does not parse"):
        parse_metadata("{robot")
    assert parse_metadata('{"robot": "aloha"}') == {"robot": "aloha"}
    assert PolicyServer(object()).host == "127.0.0.1"  # loopback unless told otherwise


def test_rtc_remote_policy_example(start_server):
    """examples/rtc_remote_policy.py, run as a robot would run it (openpi-client's venv, numpy<2,
    flashrt-core from source), against the server: every tick gets an action, none missed."""
    pytest.importorskip("flash_rt.runtime.rtc")
    import flash_rt as core

    example = HERE.parents[2] / "examples" / "rtc_remote_policy.py"
    server, _, counted = start_server(delay_s=0.05, model_wrapper=CountingModel)
    env = {**os.environ, "PYTHONPATH": str(Path(core.__file__).resolve().parents[1])}
    out = subprocess.run([support.openpi_client_python(), str(example), "--port", str(server.port), "--hz", "50",
                          "--ticks", "60", "--image-size", "32"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ticks"] == 60 and report["errors"] == 0 and report["action_dim"] == 7
    # 60 ticks of 20 ms with 10-action chunks: several chunks, computed while actions were served
    assert report["inference_calls"] >= 4 and report["inference_calls"] == counted.calls
    assert report["misses"] <= 2, report
