"""RTC-lite against a remote policy: the robot loop gets one action per control tick while the
next action chunk is computed by ``flashrt serve`` on another machine (or another process).

On the GPU machine:

    flashrt serve --config pi05 --checkpoint /ckpts/pi05_libero --host 0.0.0.0 --api-key-env FLASHRT_KEY

On the robot (its own environment: ``pip install openpi-client flashrt-core``):

    FLASHRT_KEY=... python examples/rtc_remote_policy.py --host gpu-box --port 8000 \
        --api-key-env FLASHRT_KEY --hz 50 --ticks 500

The policy side is openpi's own ``WebsocketClientPolicy``, unmodified: its ``infer(obs)`` returns
``{"actions": (H, D), ...}``, which ``CallablePolicyAdapter`` turns into a chunk source, and
``AsyncChunkRunner`` serves the chunk tick by tick, asking for the next one halfway through.
``SimulatedRobot`` below stands in for the robot: replace its two methods with your camera /
joint reads and your command writes. Prints the runner's statistics as JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from flash_rt.runtime.rtc import AsyncChunkRunner, CallablePolicyAdapter


class SimulatedRobot:
    """A stand-in robot speaking openpi's LIBERO layout: two cameras and an 8-dim state."""

    def __init__(self, prompt: str, image_size: int = 224, seed: int = 0):
        self.prompt = prompt
        self.rng = np.random.default_rng(seed)
        self.image_size = image_size
        self.state = self.rng.uniform(-0.5, 0.5, size=8)
        self.applied: list[np.ndarray] = []

    def get_observation(self) -> dict:
        size = (self.image_size, self.image_size, 3)
        return {
            "observation/image": self.rng.integers(0, 256, size=size, dtype=np.uint8),
            "observation/wrist_image": self.rng.integers(0, 256, size=size, dtype=np.uint8),
            "observation/state": self.state.copy(),
            "prompt": self.prompt,
        }

    def apply_action(self, action: np.ndarray) -> None:
        # A real robot sends the command here; the stand-in integrates a little of it.
        self.applied.append(action)
        self.state[: min(7, len(action))] += 0.01 * action[:7]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    parser.add_argument("--hz", type=float, default=50.0, help="control rate (default 50)")
    parser.add_argument("--ticks", type=int, default=500, help="control ticks to run (default 500)")
    parser.add_argument("--prompt", default="pick up the black bowl and place it on the plate")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--miss-policy", default="hold_last", choices=("hold_last", "block"))
    args = parser.parse_args(argv)

    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    client = WebsocketClientPolicy(args.host, args.port, api_key=api_key)  # blocks for the metadata frame
    print(f"connected to ws://{args.host}:{args.port}; server metadata: {client.get_server_metadata()}")

    robot = SimulatedRobot(args.prompt, image_size=args.image_size)
    # client.infer runs on the runner's single worker thread only: one request in flight at a time,
    # which is exactly openpi's lock-step protocol.
    runner = AsyncChunkRunner(CallablePolicyAdapter(client.infer), control_hz=args.hz,
                              miss_policy=args.miss_policy)
    started = time.monotonic()
    try:
        stats = runner.run(robot.get_observation, robot.apply_action, num_ticks=args.ticks)
    finally:
        runner.close()
    elapsed = time.monotonic() - started
    report = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(stats).items()}
    report.update(miss_rate=stats.miss_rate, wall_s=elapsed, effective_hz=args.ticks / elapsed,
                  action_dim=int(robot.applied[-1].shape[0]) if robot.applied else None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
