"""``flashrt serve``: load a checkpoint and serve it over openpi's websocket protocol.

``add_serve_parser(subparsers)`` adds the subcommand to any argparse parser; the ``flashrt``
entry point wires it in. docs/serving.md has the walk-through.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flash_rt.errors import ConfigError

DEFAULT_MAX_FRAME_MB = 64  # no import of the server here: `flashrt --help` must work without the serve extra


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve a policy over openpi's websocket protocol (openpi-client works unmodified)",
        description="Serve a policy over openpi's websocket protocol. Robots connect with "
        "openpi-client's WebsocketClientPolicy; GET /healthz answers 200 on the same port.",
    )
    parser.add_argument("--config", default="pi05", help="model config (default: pi05)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--framework", default="torch", help="frontend framework (default: torch)")
    parser.add_argument("--hardware", default="auto", help="arch, or auto to detect (default: auto)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every "
                        "interface — then set --api-key-env)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="name of the environment variable that holds the API key; clients must send "
                        "'Authorization: Api-Key <key>' (openpi-client's api_key=)")
    parser.add_argument("--metadata", metavar="JSON",
                        help="JSON object sent to each client on connect (default: {})")
    parser.add_argument("--num-views", type=int, default=2, help="camera views the model takes (default: 2)")
    parser.add_argument("--num-steps", type=int, default=None,
                        help="flow-matching steps, where the frontend takes it (default: the checkpoint's)")
    parser.add_argument("--action-dim", type=int, default=None,
                        help="keep the first N action dims (default: the layout's openpi width, LIBERO 7, "
                        "DROID 8, ALOHA 14; 0 never slices)")
    parser.add_argument("--default-prompt", help="prompt for clients whose observations carry none")
    parser.add_argument("--max-frame-mb", type=float, default=DEFAULT_MAX_FRAME_MB,
                        help="largest observation frame accepted, MiB (default: 64)")
    parser.add_argument("--tokenizer", help="tokenizer model file, where the checkpoint has none")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser origin (e.g. https://dashboard.lab) allowed to connect; repeatable. "
                        "Handshakes with any other Origin header are refused (robot clients send none)")
    parser.add_argument("--log-level", default="INFO", help="server log level (default: INFO)")
    parser.set_defaults(func=cmd_serve)
    return parser


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise ConfigError(f"--api-key-env {var}: the environment variable {var} is not set or empty; "
                          f"export {var}=<key> before starting the server")
    return key


def cmd_serve(args) -> int:
    import flash_rt  # noqa: PLC0415

    try:
        import msgpack  # noqa: F401, PLC0415
        import websockets  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ConfigError(f"flashrt serve needs websockets and msgpack ({exc}); "
                          "pip install 'flashrt-core[serve]'") from None
    from flash_rt.serving.openpi_server import PolicyServer, parse_metadata  # noqa: PLC0415

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    metadata = parse_metadata(args.metadata)
    api_key = _api_key(args.api_key_env)
    if args.max_frame_mb <= 0:
        raise ConfigError(f"--max-frame-mb must be > 0; got {args.max_frame_mb}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.getLogger("flash_rt.serving").warning(
            "serving on %s without an API key: anyone who can reach this port can drive the policy", args.host
        )
    options = {"num_views": args.num_views, "hardware": args.hardware, "config": args.config,
               "framework": args.framework}
    if args.tokenizer:
        options["tokenizer"] = args.tokenizer
    if args.num_steps is not None:
        options["num_steps"] = args.num_steps
    model = flash_rt.load_model(args.checkpoint, **options)
    server = PolicyServer(
        model, args.host, args.port,
        metadata=metadata, api_key=api_key, max_frame_bytes=max(1024, int(args.max_frame_mb * 2**20)),
        num_views=args.num_views, action_dim=args.action_dim, default_prompt=args.default_prompt,
        allowed_origins=args.allow_origin,
    )
    server.serve_forever(on_listening=_print_listening)
    return 0


def _print_listening(host: str, port: int) -> None:
    print(f"flashrt serve: listening on ws://{host}:{port} (GET /healthz for health checks)",
          file=sys.stderr, flush=True)
