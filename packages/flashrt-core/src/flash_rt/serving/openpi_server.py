"""An openpi-compatible websocket policy server around a ``VLAModel``.

Wire protocol (what ``openpi-client``'s ``WebsocketClientPolicy`` expects):

    connect -> server sends ONE binary frame, msgpack(metadata)
    loop:      client sends msgpack(observation) -> server sends msgpack(result)
               result = {"actions": (horizon, dim), "server_timing": {"infer_ms", "prev_total_ms",
                         "queue_ms"}, "policy_timing": {"infer_ms"}}
    GET /healthz on the same port -> 200 "OK"

What differs from openpi's own server, on purpose:

- Inference runs on ONE worker thread (a single-thread executor: the GPU serves one batch-1
  request at a time, in arrival order), never on the event loop, so health checks, handshakes
  and other clients' frames are handled while a request computes. Each connection is lock-step,
  so each client gets its own responses in order.
- A request the server refuses (bad msgpack, unknown layout, wrong types or shapes, NaN state,
  a model ``InputError``, or a failure inside the model) gets a SHORT text frame that says why
  — never a traceback; details go to the server log — and the connection is then closed with
  1011, as openpi's server does after an error. openpi-client raises ``RuntimeError`` on the
  text frame; the robot reconnects with a new client. Other connections are not affected.
- A frame larger than ``max_frame_bytes`` is stopped by websockets itself before it is read:
  the connection is closed with 1009 ("message too big") and a one-line reason.
- With an API key, a handshake without ``Authorization: Api-Key <key>`` is refused with HTTP 401
  (header missing) or 403 (key wrong); the comparison is constant-time. /healthz stays open.
- A client that disconnects while its request waits or computes costs at most that inference:
  a queued request is dropped before it starts, a running one finishes and is discarded.
- Browsers: a web page can open a websocket to 127.0.0.1, so a handshake that carries an
  ``Origin`` header (browsers always send one, robot clients never do) is refused with 403
  unless that origin is in ``allowed_origins``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from flash_rt.errors import ConfigError, InputError
from flash_rt.serving import layouts
from flash_rt.serving.msgpack_numpy import WireError, packb, unpackb

logger = logging.getLogger("flash_rt.serving")

DEFAULT_MAX_FRAME_BYTES = 64 * 2**20
ERROR_CLOSE_CODE = 1011  # what openpi's server sends after an error frame
_MAX_ERROR_CHARS = 400


class _ClientGone(Exception):
    """The peer closed the connection while its request was queued or running."""


class _Connection:
    """Per-client state: the prompt a client last sent (openpi clients may omit it later)."""

    def __init__(self, peer):
        self.peer = peer
        self.prompt: str | None = None
        self.requests = 0


class PolicyServer:
    """Serve ``model`` (anything with ``predict(images, prompt, state)``) over openpi's protocol.

    ``start()`` runs the server on a background thread with its own event loop (``port=0``
    picks a free port; read ``.port`` after start); ``stop()`` closes every connection and
    waits for the worker. ``serve_forever()`` runs it on the calling thread until SIGINT/SIGTERM.

    ``num_views``: camera views the model takes (None: ask the frontend, else do not check).
    ``action_dim``: keep the first N action dims (None: the layout's openpi width — LIBERO 7,
    DROID 8, ALOHA 14 — where the model's is wider; 0: never slice). ``default_prompt``: used
    when a client's first observation has no "prompt". ``noise_fn``: called on the worker for
    each request to give ``predict(noise=...)`` (reproducible serving and tests).
    ``allowed_origins``: browser origins allowed to connect (none by default).
    """

    def __init__(
        self,
        model,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        metadata: Mapping | None = None,
        api_key: str | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        num_views: int | None = None,
        action_dim: int | None = None,
        default_prompt: str | None = None,
        noise_fn: Callable[[], np.ndarray] | None = None,
        allowed_origins: Sequence[str] = (),
    ):
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ConfigError(f"metadata must be a dict (a JSON object); got {type(metadata).__name__}")
        if not isinstance(max_frame_bytes, int) or max_frame_bytes < 1024:
            raise ConfigError(f"max_frame_bytes must be an int >= 1024; got {max_frame_bytes!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ConfigError("api_key must be a non-empty string (or None for no key)")
        if action_dim is not None and (not isinstance(action_dim, int) or action_dim < 0):
            raise ConfigError(f"action_dim must be None or an int >= 0; got {action_dim!r}")
        self._model = model
        self._host = host
        self._requested_port = port
        self._metadata_frame = packb(dict(metadata or {}))
        self._expected_auth = None if api_key is None else f"Api-Key {api_key}".encode()
        self._max_frame_bytes = max_frame_bytes
        self._num_views = num_views if num_views is not None else _frontend_num_views(model)
        self._action_dim = action_dim
        self._default_prompt = default_prompt
        self._noise_fn = noise_fn
        self._origins = [None, *allowed_origins]  # None: no Origin header, i.e. not a browser
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._port: int | None = None
        self._warned_narrow = False
        self._on_listening: Callable[[str, int], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not running; call start() first")
        return self._port

    @property
    def host(self) -> str:
        return self._host

    def start(self, timeout: float = 30.0) -> PolicyServer:
        """Bind and serve on a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("PolicyServer.start() called twice")
        self._ready, self._startup_error, self._port = threading.Event(), None, None  # a restart after stop()
        self._thread = threading.Thread(target=self._thread_main, name="flashrt-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the server did not start within {timeout} s")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Close every connection, stop the loop thread and the inference worker."""
        if self._thread is None:
            return
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        self._thread.join(timeout)
        self._thread = None
        self._port = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self, on_listening: Callable[[str, int], None] | None = None) -> None:
        """Serve on this thread until SIGINT or SIGTERM; ``on_listening(host, port)`` is called
        once the port is bound (the CLI prints the address there)."""
        self._on_listening = on_listening
        asyncio.run(self._main(install_signal_handlers=True))

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main(install_signal_handlers=False))
        except BaseException as exc:  # reported to start(), which re-raises it on the caller
            self._startup_error = exc
            self._ready.set()

    async def _main(self, *, install_signal_handlers: bool) -> None:
        try:
            from websockets.asyncio.server import serve  # noqa: PLC0415
        except ImportError:
            raise ConfigError("PolicyServer needs websockets >= 13 (its asyncio server API); "
                              "pip install 'flashrt-core[serve]'") from None

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if install_signal_handlers:
            import signal  # noqa: PLC0415

            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._loop.add_signal_handler(sig, self._stop_event.set)
                except (NotImplementedError, RuntimeError):  # not the main thread / not Unix
                    pass
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashrt-infer")
        try:
            try:
                server = await serve(
                    self._handle,
                    self._host,
                    self._requested_port,
                    compression=None,
                    max_size=self._max_frame_bytes,
                    max_queue=2,  # lock-step clients send one frame at a time; bounds buffered frames
                    origins=self._origins,
                    process_request=self._process_request,
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {self._host}:{self._requested_port}: {exc.strerror or exc}; pick "
                    "another --port (0 picks a free one) or --host"
                ) from None
            async with server:
                self._port = server.sockets[0].getsockname()[1]
                logger.info("flashrt serve: listening on ws://%s:%d", self._host, self._port)
                self._ready.set()
                if self._on_listening is not None:
                    self._on_listening(self._host, self._port)
                await self._stop_event.wait()
        finally:
            # Connections are closed by now; a running inference finishes, queued ones are dropped.
            self._executor.shutdown(wait=True, cancel_futures=True)
            logger.info("flashrt serve: stopped")

    # ------------------------------------------------------------------ HTTP side

    def _process_request(self, connection, request):
        """Before the websocket handshake: /healthz, then the API key."""
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._expected_auth is not None:
            headers = request.headers.get_all("Authorization")
            if len(headers) != 1:
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED, "this server needs one header 'Authorization: Api-Key <key>'\n"
                )
            if not hmac.compare_digest(headers[0].encode("utf-8", "replace"), self._expected_auth):
                return connection.respond(http.HTTPStatus.FORBIDDEN, "wrong API key\n")
        return None

    # ------------------------------------------------------------------ websocket side

    async def _handle(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        conn = _Connection(websocket.remote_address)
        closed = asyncio.ensure_future(websocket.wait_closed())
        logger.info("client %s connected", conn.peer)
        prev_total_ms = None
        try:
            await websocket.send(self._metadata_frame)
            while True:
                cycle_start = time.monotonic()
                frame = await websocket.recv()
                try:
                    reply = await self._answer(frame, conn, closed, prev_total_ms)
                except InputError as exc:
                    logger.info("client %s request %d refused: %s", conn.peer, conn.requests, exc)
                    await self._refuse(websocket, f"flashrt serve: bad observation: {exc}")
                    return
                except _ClientGone:
                    logger.info("client %s left during request %d; result dropped", conn.peer, conn.requests)
                    return
                except Exception as exc:  # a server never dies on one request
                    logger.exception("client %s request %d failed", conn.peer, conn.requests)
                    await self._refuse(
                        websocket,
                        f"flashrt serve: inference failed ({type(exc).__name__}); details are in the server log",
                    )
                    return
                await websocket.send(reply)
                prev_total_ms = (time.monotonic() - cycle_start) * 1000
        except ConnectionClosed:
            pass
        finally:
            closed.cancel()
            logger.info("client %s disconnected after %d request(s)", conn.peer, conn.requests)

    async def _answer(self, frame, conn: _Connection, closed: asyncio.Future, prev_total_ms) -> bytes:
        conn.requests += 1
        if isinstance(frame, str):
            raise WireError("expected a binary msgpack frame; got a text frame")
        received = time.perf_counter()
        policy_input = layouts.to_policy_input(unpackb(frame), num_views=self._num_views)
        prompt = policy_input.prompt or conn.prompt or self._default_prompt
        if prompt is None:
            raise InputError(
                "the observation has no 'prompt' and this connection has not sent one yet; send "
                "'prompt' (the task, e.g. 'pick up the cup') or start the server with --default-prompt"
            )
        conn.prompt = prompt
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._infer, policy_input, prompt, received
        )
        done, _ = await asyncio.wait({future, closed}, return_when=asyncio.FIRST_COMPLETED)
        if future not in done:
            future.cancel()  # dropped if it has not started; a running one finishes unobserved
            raise _ClientGone
        actions, queue_ms, infer_ms = future.result()
        actions = self._fit_actions(actions, policy_input.layout)
        result = {
            "actions": actions,
            "policy_timing": {"infer_ms": infer_ms},
            "server_timing": {"infer_ms": (time.perf_counter() - received) * 1000, "queue_ms": queue_ms},
        }
        if prev_total_ms is not None:
            result["server_timing"]["prev_total_ms"] = prev_total_ms
        return packb(result)

    def _infer(self, policy_input: layouts.PolicyInput, prompt: str, received: float):
        """On the worker thread: the only place the model is called."""
        started = time.perf_counter()
        kwargs = {} if self._noise_fn is None else {"noise": self._noise_fn()}
        actions = self._model.predict(policy_input.images, prompt, policy_input.state, **kwargs)
        finished = time.perf_counter()
        return actions, (started - received) * 1000, (finished - started) * 1000

    def _fit_actions(self, actions, layout: layouts.Layout) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.dtype.kind != "f":
            raise RuntimeError(f"the model returned actions of shape {actions.shape}, dtype {actions.dtype}; "
                               "expected a float (horizon, dim) array")
        if not np.isfinite(actions).all():
            raise RuntimeError("the model returned non-finite actions")
        width = layout.action_dim if self._action_dim is None else (self._action_dim or None)
        if width is not None:
            if actions.shape[1] > width:
                actions = actions[:, :width]
            elif actions.shape[1] < width and not self._warned_narrow:
                self._warned_narrow = True
                logger.warning("the model's action dim %d is narrower than %d (%s); sent as is",
                               actions.shape[1], width, layout.name)
        return np.ascontiguousarray(actions)

    async def _refuse(self, websocket, message: str) -> None:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        message = " ".join(message.split())
        if len(message) > _MAX_ERROR_CHARS:
            message = message[: _MAX_ERROR_CHARS - 3] + "..."
        try:
            await websocket.send(message)  # a str travels as a TEXT frame; openpi-client raises on it
            await websocket.close(code=ERROR_CLOSE_CODE, reason="request refused; see the previous frame")
        except ConnectionClosed:
            pass


def _frontend_num_views(model) -> int | None:
    views = getattr(getattr(model, "frontend", None), "num_views", None)
    return views if isinstance(views, int) and not isinstance(views, bool) else None


def parse_metadata(text: str | None) -> dict:
    """``--metadata`` JSON -> dict (a JSON object, or ConfigError)."""
    if not text:
        return {}
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--metadata must be a JSON object; it does not parse: {exc}") from None
    if not isinstance(metadata, dict):
        raise ConfigError(f"--metadata must be a JSON object such as '{{\"robot\": \"aloha\"}}'; got {type(metadata).__name__}")
    return metadata


def serve(model, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve ``model`` on this thread until SIGINT/SIGTERM (options: see ``PolicyServer``)."""
    PolicyServer(model, host, port, **options).serve_forever()
