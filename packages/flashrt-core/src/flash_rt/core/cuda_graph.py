"""CUDA graph capture and replay, with or without torch.

    g = CUDAGraph()
    with g.capture() as stream:        # stream: the capture stream as an int cudaStream_t
        kernels(..., stream)           # raw-pointer kernels and/or torch ops
    g.replay()                         # one launch for the whole captured sequence

Two backends. ``"cuda"`` drives cuda-python directly (stream capture, instantiate, launch) and
needs no torch. ``"torch"`` wraps ``torch.cuda.CUDAGraph`` so that torch ops captured in the
block use torch's graph-safe allocator pool. ``"auto"`` (default) picks torch when the caller
has already imported it, else cuda. Nothing here touches CUDA before ``capture``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

from flash_rt.core.cuda_buffer import _rt, _stream, cuda_check, on_device
from flash_rt.errors import ConfigError, HardwareError

BACKENDS = ("auto", "torch", "cuda")
CAPTURE_MODES = ("thread_local", "global", "relaxed")


class CUDAGraph:
    """One captured sequence of GPU work, replayable with one launch."""

    def __init__(self, backend: str = "auto", *, device: int = 0) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"CUDAGraph backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "auto":
            backend = "torch" if "torch" in sys.modules else "cuda"
        self.backend = backend
        self.device = int(device)
        self._graph = None  # cudaGraph_t (cuda) or torch.cuda.CUDAGraph (torch)
        self._exec = None  # cudaGraphExec_t (cuda)
        self._own_stream = None  # stream this object created (cuda backend)
        self._stream = 0  # the capture stream, the default replay stream
        self._captured = False

    @property
    def captured(self) -> bool:
        return self._captured

    @property
    def stream(self) -> int:
        """The capture stream (an int cudaStream_t); created on first use when none was given."""
        if not self._stream:
            self._stream = self._new_stream()
        return self._stream

    @property
    def torch_graph(self):
        """The underlying torch.cuda.CUDAGraph (torch backend), e.g. for ``pool()`` sharing."""
        if self.backend != "torch":
            raise ConfigError("torch_graph exists only for CUDAGraph(backend='torch')")
        return self._graph

    # -- capture -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self, stream=None, *, mode: str = "thread_local", pool=None):
        """Capture the GPU work issued on the capture stream inside the block.

        ``stream``: an int cudaStream_t, a torch stream, or None (a private non-blocking stream).
        The legacy default stream (0) cannot be captured. ``pool`` (torch backend) shares a
        memory pool with another graph.
        """
        if self._captured:
            raise ConfigError("this CUDAGraph is already captured; call reset() before capturing again")
        if mode not in CAPTURE_MODES:
            raise ConfigError(f"capture mode must be one of {', '.join(CAPTURE_MODES)}, got {mode!r}")
        if stream is not None:
            self._stream = _stream(stream)
            if self._stream == 0:
                raise HardwareError(
                    "cannot capture a CUDA graph on the legacy default stream (0); pass a stream you created "
                    "(cudaStreamCreate / torch.cuda.Stream()) or stream=None for a private one"
                )
        body = self._capture_torch if self.backend == "torch" else self._capture_cuda
        with body(mode, pool) as handle:
            yield handle
        self._captured = True

    @contextlib.contextmanager
    def _capture_cuda(self, mode: str, pool):
        if pool is not None:
            raise ConfigError("pool= applies to the torch backend only")
        rt = _rt()
        with on_device(self.device):
            handle = self.stream
            mode_enum = getattr(rt.cudaStreamCaptureMode, f"cudaStreamCaptureMode{_camel(mode)}")
            cuda_check(rt.cudaStreamBeginCapture(handle, mode_enum), "cudaStreamBeginCapture")
            try:
                yield handle
            except BaseException:
                err, graph = rt.cudaStreamEndCapture(handle)  # leave capture mode, drop the graph
                if err == rt.cudaError_t.cudaSuccess and graph is not None:
                    rt.cudaGraphDestroy(graph)
                raise
            graph = cuda_check(
                rt.cudaStreamEndCapture(handle),
                "cudaStreamEndCapture (was an operation in the block not capturable, e.g. a sync or "
                "work on another stream?)",
            )
            try:
                self._exec = cuda_check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            except HardwareError:
                rt.cudaGraphDestroy(graph)
                raise
            self._graph = graph

    @contextlib.contextmanager
    def _capture_torch(self, mode: str, pool):
        torch = _torch_cuda(self.device)
        with torch.cuda.device(self.device):
            side = torch.cuda.ExternalStream(self._stream) if self._stream else torch.cuda.Stream()
            self._torch_stream = side  # keep the stream object alive as long as the graph
            self._stream = int(side.cuda_stream)
            graph = torch.cuda.CUDAGraph()
            ctx = torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode=mode)
            try:
                ctx.__enter__()
            except RuntimeError as exc:
                raise HardwareError(f"torch CUDA graph capture could not start: {exc}") from exc
            try:
                yield self._stream
            except BaseException:
                with contextlib.suppress(Exception):
                    ctx.__exit__(*sys.exc_info())
                raise
            try:
                ctx.__exit__(None, None, None)
            except RuntimeError as exc:
                raise HardwareError(
                    f"torch CUDA graph capture failed: {exc}. Work in the block must stay on the capture "
                    "stream and must not synchronise"
                ) from exc
            self._graph = graph

    # -- replay ------------------------------------------------------------------------------------

    def replay(self, stream=None) -> None:
        """Launch the captured work on ``stream``. Default: torch's current stream for the torch
        backend (as ``torch.cuda.CUDAGraph.replay``), the capture stream for the cuda backend."""
        if not self._captured:
            raise ConfigError("CUDAGraph.replay() before capture(); capture the work first")
        if self.backend == "torch":
            import torch  # noqa: PLC0415

            if stream is None:
                on_stream = contextlib.nullcontext()
            elif hasattr(stream, "cuda_stream"):
                on_stream = torch.cuda.stream(stream)
            else:
                on_stream = torch.cuda.stream(self._torch_stream_for(_stream(stream)))
            with torch.cuda.device(self.device), on_stream:
                try:
                    self._graph.replay()
                except RuntimeError as exc:
                    raise HardwareError(f"CUDA graph replay failed: {exc}") from exc
            return
        handle = self._stream if stream is None else _stream(stream)
        rt = _rt()
        with on_device(self.device):
            cuda_check(rt.cudaGraphLaunch(self._exec, handle), "cudaGraphLaunch")

    def synchronize(self) -> None:
        """Wait for the replays: the whole device (torch backend), the capture stream (cuda)."""
        if self.backend == "torch":
            _torch_cuda(self.device).cuda.synchronize(self.device)
        elif self._stream:
            with on_device(self.device):
                cuda_check(_rt().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def _torch_stream_for(self, handle: int):
        """A cached torch view of stream ``handle`` (no cuda-python on the torch path)."""
        import torch  # noqa: PLC0415

        if handle == 0:
            return torch.cuda.default_stream(self.device)
        cache = self.__dict__.setdefault("_torch_streams", {})
        if handle not in cache:
            cache[handle] = torch.cuda.ExternalStream(handle, device=self.device)
        return cache[handle]

    # -- lifetime ----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop the captured graph (the stream is kept) so the object can capture again."""
        if self.backend == "torch":
            if self._graph is not None:
                with contextlib.suppress(Exception):
                    self._graph.reset()
        else:
            rt = _rt() if (self._exec is not None or self._graph is not None) else None
            if self._exec is not None:
                rt.cudaGraphExecDestroy(self._exec)
            if self._graph is not None:
                rt.cudaGraphDestroy(self._graph)
        self._graph = self._exec = None
        self._captured = False

    def free(self) -> None:
        """Release the graph and the private stream."""
        self.reset()
        if self._own_stream is not None:
            with contextlib.suppress(Exception):
                _rt().cudaStreamDestroy(self._own_stream)
            if self._stream == int(self._own_stream):
                self._stream = 0
            self._own_stream = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.free()

    def _new_stream(self) -> int:
        if self.backend == "torch":
            torch = _torch_cuda(self.device)
            with torch.cuda.device(self.device):
                self._torch_stream = torch.cuda.Stream()  # kept alive with the graph
            return int(self._torch_stream.cuda_stream)
        rt = _rt()
        with on_device(self.device):
            self._own_stream = cuda_check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        return int(self._own_stream)


def capture_callable(fn, *, warmup: int = 2, stream=None, backend: str = "auto", device: int = 0, mode: str = "thread_local") -> CUDAGraph:
    """Run ``fn`` ``warmup`` times on the capture stream (first-call allocations, autotuning,
    lazy init happen there, not in the graph), then capture one call and return the graph.
    ``fn`` takes no argument or one: the stream as an int."""
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    graph = CUDAGraph(backend, device=device)
    if stream is not None:
        graph._stream = _stream(stream)
    wants_stream = _takes_argument(fn)

    def call(handle: int):
        return fn(handle) if wants_stream else fn()

    if graph.backend == "torch":
        torch = _torch_cuda(device)
        with torch.cuda.device(device):
            side = torch.cuda.ExternalStream(graph.stream)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    call(graph.stream)
            torch.cuda.current_stream().wait_stream(side)
    else:
        for _ in range(warmup):
            call(graph.stream)
        graph.synchronize()
    with graph.capture(mode=mode) as handle:
        call(handle)
    return graph


def _takes_argument(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return bool(positional)


def _camel(mode: str) -> str:
    return "".join(part.capitalize() for part in mode.split("_"))


def _torch_cuda(device: int):
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise HardwareError(
            f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; "
            "CUDAGraph needs an NVIDIA GPU (use CUDAGraph(backend='cuda') without torch)"
        )
    if not 0 <= device < torch.cuda.device_count():
        raise HardwareError(f"CUDA device {device} requested, but torch sees {torch.cuda.device_count()}")
    return torch


__all__ = ["CUDAGraph", "capture_callable", "BACKENDS", "CAPTURE_MODES"]
