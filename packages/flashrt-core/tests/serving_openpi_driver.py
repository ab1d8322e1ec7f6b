"""Client side of the serving tests. Runs in its OWN venv with the unmodified PyPI
``openpi-client`` 0.1.2 (numpy<2), exactly as a robot process would; it imports nothing of ours.

    python serving_openpi_driver.py '<json spec>'     -> one JSON line on stdout

Modes: infer (n observations of a layout; optionally saved with the answers to an .npz for the
test to check against model.predict), bad (one malformed request, then a reconnect), auth,
disconnect (send a request and leave), soak (many requests, checked for shape only).
"""

import json
import sys
import time

import numpy as np
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, InvalidStatus

PROMPTS = ("pick up the red cup", "open the drawer", "stack the blocks")


def make_observation(layout, rng, hw, index):
    h, w = hw

    def image():
        return rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)

    prompt = PROMPTS[index % len(PROMPTS)]
    if layout == "libero":
        return {"observation/image": image(), "observation/wrist_image": image(),
                "observation/state": rng.rand(8), "prompt": prompt}
    if layout == "droid":
        return {"observation/exterior_image_1_left": image(), "observation/wrist_image_left": image(),
                "observation/joint_position": rng.rand(7), "observation/gripper_position": rng.rand(1),
                "prompt": prompt}
    if layout == "aloha":
        cams = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
        return {"state": rng.rand(14), "prompt": prompt,
                "images": {c: rng.randint(0, 256, size=(3, h, w), dtype=np.uint8) for c in cams}}
    if layout == "generic_list":
        return {"images": [image(), image()], "state": rng.rand(8).astype(np.float32), "prompt": prompt}
    if layout == "generic_one":
        return {"images": [image()], "state": rng.rand(8), "prompt": prompt}
    if layout == "generic_dict":
        return {"images": {"image": image(), "wrist_image": image()}, "state": rng.rand(8), "prompt": prompt}
    raise ValueError(layout)


def flatten(prefix, value, out):
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}|{key}", item, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            flatten(f"{prefix}|#{i}", item, out)
    else:
        out[prefix] = np.asarray(value)


def connect(spec):
    return WebsocketClientPolicy(spec.get("host", "127.0.0.1"), spec["port"], api_key=spec.get("api_key"))


def mode_infer(spec):
    rng = np.random.RandomState(spec.get("seed", 0))
    client = connect(spec)
    saved, timings = {}, []
    for i in range(spec.get("n", 1)):
        obs = make_observation(spec["layout"], rng, spec.get("hw", (32, 32)), i + spec.get("seed", 0))
        if spec.get("prompt_first_only") and i > 0:
            obs.pop("prompt")
        result = client.infer(obs)
        timings.append(sorted(result["server_timing"]))
        flatten(f"req{i}|obs", obs, saved)
        saved[f"req{i}|actions"] = result["actions"]
        saved[f"req{i}|policy_infer_ms"] = np.asarray(result["policy_timing"]["infer_ms"])
    if spec.get("out"):
        np.savez(spec["out"], **saved)
    return {"metadata": client.get_server_metadata(), "n": spec.get("n", 1), "server_timing_keys": timings,
            "actions_shape": list(saved["req0|actions"].shape), "actions_dtype": saved["req0|actions"].dtype.str}


def bad_payload(kind, rng, hw):
    """Either an observation dict (sent by the unmodified client) or raw frame data."""
    good = make_observation("libero", rng, hw, 0)
    if kind == "missing_key":
        del good["observation/state"]
        return good
    if kind == "wrong_type":
        good["observation/image"] = "not an image"
        return good
    if kind == "bad_image_shape":
        good["observation/image"] = good["observation/image"][:, :, 0]
        return good
    if kind == "bad_image_channels":
        good["observation/wrist_image"] = np.zeros((hw[0], hw[1], 4), np.uint8) + 7
        return good
    if kind == "nan_state":
        good["observation/state"][3] = np.nan
        return good
    if kind == "prompt_type":
        good["prompt"] = 12
        return good
    if kind == "unknown_layout":
        return {"camera": good["observation/image"], "prompt": "x"}
    if kind == "model_input_error":  # right layout, state the model rejects (wrong dim)
        good["observation/state"] = rng.rand(5)
        return good
    if kind == "not_msgpack":
        return b"\xc1\xc1 this is not msgpack"
    if kind == "text_frame":
        return "a text frame"
    if kind == "object_dtype":
        return msgpack_numpy.packb({"observation/image": {b"__ndarray__": True, b"data": b"\x00" * 8,
                                                          b"dtype": "|O", b"shape": [1]}})
    if kind == "short_data":
        obs = make_observation("libero", rng, hw, 0)
        obs["observation/image"] = {b"__ndarray__": True, b"data": b"\x00" * 10, b"dtype": "|u1",
                                    b"shape": [hw[0], hw[1], 3]}
        return msgpack_numpy.packb(obs)
    if kind == "oversized":
        return b"\x00" * (2 * 2**20)
    raise ValueError(kind)


def mode_bad(spec):
    rng = np.random.RandomState(1)
    hw = spec.get("hw", (32, 32))
    payload = bad_payload(spec["kind"], rng, hw)
    report = {}
    if isinstance(payload, dict):
        client = connect(spec)
        try:
            client.infer(payload)
            report["error"] = None
        except RuntimeError as exc:  # openpi-client's reaction to a text frame
            report.update(error="RuntimeError", message=str(exc))
        try:
            client.infer(make_observation("libero", rng, hw, 0))
            report["after_error"] = "answered"
        except ConnectionClosed as exc:
            report["after_error"] = "closed"
            report["close_code"] = exc.rcvd.code if exc.rcvd else None
    else:
        with websockets.sync.client.connect(f"ws://127.0.0.1:{spec['port']}", compression=None,
                                            max_size=None) as ws:
            ws.recv()  # metadata
            try:
                ws.send(payload)
                reply = ws.recv()
                report.update(error="text" if isinstance(reply, str) else "binary",
                              message=reply if isinstance(reply, str) else None)
                ws.recv()
            except ConnectionClosed as exc:
                report["close_code"] = exc.rcvd.code if exc.rcvd else None
                report["close_reason"] = exc.rcvd.reason if exc.rcvd else None
        report.setdefault("error", "closed")
    # Reconnect with a fresh client: the server must still serve this robot.
    client = connect(spec)
    result = client.infer(make_observation("libero", rng, hw, 0))
    report["reconnect_actions_shape"] = list(result["actions"].shape)
    return report


def mode_auth(spec):
    try:
        client = connect(spec)
        result = client.infer(make_observation("libero", np.random.RandomState(0), spec.get("hw", (32, 32)), 0))
        return {"ok": True, "actions_shape": list(result["actions"].shape)}
    except InvalidStatus as exc:
        return {"ok": False, "error": "InvalidStatus", "status": exc.response.status_code}


def mode_disconnect(spec):
    rng = np.random.RandomState(spec.get("seed", 0))
    for _ in range(spec.get("connections", 1)):
        with websockets.sync.client.connect(f"ws://127.0.0.1:{spec['port']}", compression=None,
                                            max_size=None) as ws:
            ws.recv()
            ws.send(msgpack_numpy.packb(make_observation("libero", rng, spec.get("hw", (32, 32)), 0)))
        # leaving the block closes the connection without waiting for the answer
    return {"ok": True}


def mode_soak(spec):
    rng = np.random.RandomState(spec.get("seed", 0))
    client = connect(spec)
    layout, hw = spec.get("layout", "libero"), spec.get("hw", (16, 16))
    obs = [make_observation(layout, rng, hw, i) for i in range(8)]
    start = time.monotonic()
    for i in range(spec["n"]):
        request = obs[i % len(obs)]
        if spec.get("fresh_state"):  # a robot's state changes every tick (Pi0.5 tokenizes it)
            request = dict(request, **{k: rng.rand(*np.shape(v)) for k, v in request.items() if "state" in k})
        result = client.infer(request)
        if result["actions"].shape != tuple(spec["shape"]) or not np.isfinite(result["actions"]).all():
            return {"ok": False, "at": i, "shape": list(result["actions"].shape)}
    return {"ok": True, "n": spec["n"], "elapsed_s": time.monotonic() - start}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    report = {"infer": mode_infer, "bad": mode_bad, "auth": mode_auth, "disconnect": mode_disconnect,
              "soak": mode_soak}[spec["mode"]](spec)
    print(json.dumps(report))
