"""RTC-lite: serve an action chunk at a fixed control rate while the next one is computed.

An action-chunk policy returns H actions per inference, and inference takes longer than one
control tick. :class:`AsyncChunkRunner` hands out one action per tick from the current chunk
while a background worker computes the next chunk from the latest observation, and switches to
it as soon as it is ready. It changes no numerics; it only decides which action goes out when.

Time is measured in ticks (one ``step()`` call each) and, through an injectable clock, in
seconds. A chunk computed from the observation of tick ``s`` has its action 0 meant for tick
``s``; served at tick ``t`` it gives action ``t - s`` (the actions that went stale while the
policy ran are skipped), unless ``skip_elapsed=False``. See ``docs/rtc.md``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flash_rt.errors import ConfigError, InputError

MISS_POLICIES = ("hold_last", "block")


# -- clocks -------------------------------------------------------------------------------------


class MonotonicClock:
    """Wall time: ``time.monotonic`` and ``time.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def poll(self, event: threading.Event, worker: threading.Thread) -> bool:
        return event.is_set()

    def wait(self, event: threading.Event, worker: threading.Thread) -> None:
        while not event.wait(0.1):
            if not worker.is_alive():
                return

    def wake_all(self) -> None:
        pass


class FakeClock:
    """Virtual time for deterministic tests and simulations.

    The thread that creates the clock is the *driver*: its ``sleep(dt)`` (or ``advance(dt)``)
    moves time forward. Any other thread's ``sleep(dt)`` blocks until the driver has moved time
    past its deadline, so a "slow policy" is one that calls ``clock.sleep(latency)``.
    ``poll``/``wait`` let the runner ask, deterministically, whether the worker's chunk is ready
    at the current virtual time: they wait (in real time) until the worker has either finished
    or gone to sleep on this clock. Advance time, then step; never advance twice from
    different threads.
    """

    def __init__(self, start: float = 0.0, *, settle_timeout_s: float = 10.0) -> None:
        self._now = float(start)
        self._cond = threading.Condition()
        self._sleepers: dict[int, float] = {}  # thread ident -> deadline, while blocked
        self._driver = threading.get_ident()
        self._settle_timeout_s = settle_timeout_s
        self._generation = 0  # bumped by wake_all(): releases the sleepers of that moment only

    def now(self) -> float:
        with self._cond:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ConfigError(f"FakeClock.advance() takes seconds >= 0, got {seconds}")
        self._set(self._now + seconds)

    def _set(self, new_now: float) -> None:
        with self._cond:
            self._now = max(self._now, new_now)
            # Drop woken sleepers right away so poll() never mistakes them for still blocked.
            for ident, deadline in list(self._sleepers.items()):
                if deadline <= self._now:
                    del self._sleepers[ident]
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        if threading.get_ident() == self._driver:
            self.advance(max(0.0, seconds))
            return
        me = threading.get_ident()
        with self._cond:
            deadline = self._now + max(0.0, seconds)
            if deadline <= self._now:
                return
            self._sleepers[me] = deadline
            generation = self._generation
            while self._now < deadline and generation == self._generation:
                self._cond.wait()
            self._sleepers.pop(me, None)

    def poll(self, event: threading.Event, worker: threading.Thread) -> bool:
        limit = time.monotonic() + self._settle_timeout_s
        while True:
            if event.is_set():
                return True
            with self._cond:
                if worker.ident in self._sleepers or not worker.is_alive():
                    return event.is_set()
            if time.monotonic() > limit:
                raise RuntimeError(
                    f"FakeClock: the worker neither finished nor slept on the clock within "
                    f"{self._settle_timeout_s}s of real time; a policy under a FakeClock must spend "
                    "its time in clock.sleep()"
                )
            time.sleep(1e-4)

    def wait(self, event: threading.Event, worker: threading.Thread) -> None:
        """Driver side of a blocking wait: jump time to each sleeper's deadline until done."""
        while not self.poll(event, worker):
            with self._cond:
                if not self._sleepers:
                    return  # worker gone
                target = min(self._sleepers.values())
            self._set(target)

    def wake_all(self) -> None:
        with self._cond:
            self._generation += 1
            self._sleepers.clear()
            self._cond.notify_all()


# -- adapters -----------------------------------------------------------------------------------


class ActionChunkAdapter:
    """Something that, given an observation, returns an action chunk of shape (H, D).

    Subclass and implement :meth:`infer_chunk`. Called from the runner's worker thread.
    """

    def infer_chunk(self, observation: Any) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement infer_chunk(observation)")

    def __call__(self, observation: Any) -> np.ndarray:
        return self.infer_chunk(observation)


class CallablePolicyAdapter(ActionChunkAdapter):
    """Wraps any callable: ``VLAModel.predict``, a websocket client's ``infer``, a function.

    ``fn(observation)`` may return an array (H, D) or a dict holding one under ``key``
    (openpi clients return ``{"actions": ...}``). With ``unpack=True`` a dict observation is
    passed as keyword arguments (``predict(images=..., prompt=..., state=...)``).
    """

    def __init__(self, fn: Callable[..., Any], *, key: str = "actions", unpack: bool = False) -> None:
        if not callable(fn):
            raise ConfigError(f"CallablePolicyAdapter needs a callable, got {type(fn).__name__}")
        self.fn, self.key, self.unpack = fn, key, unpack

    def infer_chunk(self, observation: Any) -> np.ndarray:
        if self.unpack:
            if not isinstance(observation, dict):
                raise InputError(f"unpack=True needs dict observations, got {type(observation).__name__}")
            out = self.fn(**observation)
        else:
            out = self.fn(observation)
        if isinstance(out, dict):
            if self.key not in out:
                raise InputError(
                    f"the policy returned a dict without {self.key!r} (keys: {', '.join(map(str, out))}); "
                    "pass key= to CallablePolicyAdapter"
                )
            out = out[self.key]
        return out


def _as_chunk(chunk: Any) -> np.ndarray:
    arr = np.asarray(chunk)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"a policy must return an action chunk of shape (H, D) with H, D >= 1, got {arr.shape}")
    return arr


# -- stats --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RTCStats:
    """A snapshot of a runner's counters. Latencies are seconds on the runner's clock."""

    ticks: int = 0  # step() calls served
    inference_calls: int = 0  # chunks computed (the first included)
    misses: int = 0  # ticks with no fresh action (hold_last repeated one, or block had to wait)
    blocked_ticks: int = 0  # "block": ticks that waited for inference
    blocked_s: float = 0.0  # "block": total time spent waiting (startup excluded)
    startup_s: float = 0.0  # wait for the first chunk
    skipped_actions: int = 0  # stale actions skipped when switching chunks (skip_elapsed)
    chunk_switches: int = 0
    errors: int = 0  # policy calls that raised
    latency_p50_s: float = math.nan
    latency_p99_s: float = math.nan
    latency_mean_s: float = math.nan
    latency_max_s: float = math.nan
    chunk_age_ticks: int = 0  # ticks since the observation the current chunk was computed from
    chunk_age_s: float = math.nan  # seconds since that observation
    chunk_index: int = -1  # index in the current chunk of the last action served

    @property
    def miss_rate(self) -> float:
        return self.misses / self.ticks if self.ticks else 0.0


class _Inbox:
    """The worker's side: one pending job at a time, run on the worker thread."""

    def __init__(self, adapter: ActionChunkAdapter, clock: Any) -> None:
        self.adapter, self.clock = adapter, clock
        self._cond = threading.Condition()
        self._pending: _Job | None = None  # handed over, not yet picked up
        self._stopped = False

    def put(self, job: _Job) -> None:
        with self._cond:
            self._pending = job
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def serve(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                job, self._pending = self._pending, None
            try:
                job.chunk = _as_chunk(self.adapter.infer_chunk(job.observation))
            except BaseException as exc:  # surfaced to the control thread by step()
                job.error = exc
            job.finished_at = self.clock.now()
            job.done.set()


# -- runner -------------------------------------------------------------------------------------


@dataclass
class _Job:
    observation: Any
    obs_tick: int
    requested_at: float
    done: threading.Event
    chunk: np.ndarray | None = None
    error: BaseException | None = None
    finished_at: float = math.nan


@dataclass
class _Chunk:
    actions: np.ndarray
    start_tick: int  # tick at which actions[0] is due
    obs_tick: int
    requested_at: float


class AsyncChunkRunner:
    """Serve one action per control tick; compute the next chunk in the background.

    ``step(observation)`` is called once per tick by the control loop and returns the action
    (D,) for that tick. The first call waits for the first chunk. A new inference starts, from
    the observation of that tick, once the index served in the current chunk reaches
    ``prefetch_at`` (default H // 2; 0 keeps one inference always in flight). When the current
    chunk runs out before the next one is ready, ``miss_policy="hold_last"`` repeats the last
    action and counts a miss; ``"block"`` waits for the inference (and counts a miss too).
    """

    def __init__(
        self,
        adapter: ActionChunkAdapter | Callable[[Any], Any],
        control_hz: float,
        *,
        miss_policy: str = "hold_last",
        clock: Any = None,
        prefetch_at: int | None = None,
        skip_elapsed: bool = True,
        latency_window: int = 1000,
    ) -> None:
        if not callable(getattr(adapter, "infer_chunk", None)):
            adapter = CallablePolicyAdapter(adapter)  # a plain callable
        if miss_policy not in MISS_POLICIES:
            raise ConfigError(f"miss_policy must be one of {', '.join(MISS_POLICIES)}, got {miss_policy!r}")
        if not control_hz or control_hz <= 0:
            raise ConfigError(f"control_hz must be > 0, got {control_hz!r}")
        if prefetch_at is not None and (not isinstance(prefetch_at, int) or prefetch_at < 0):
            raise ConfigError(f"prefetch_at must be an int >= 0 (an index in the chunk) or None, got {prefetch_at!r}")
        self.adapter = adapter
        self.control_hz = float(control_hz)
        self.miss_policy = miss_policy
        self.clock = clock if clock is not None else MonotonicClock()
        self.prefetch_at = prefetch_at
        self.skip_elapsed = skip_elapsed

        self._tick = 0
        self._chunk: _Chunk | None = None
        self._job: _Job | None = None
        self._last_action: np.ndarray | None = None
        self._last_index = -1
        self._action_dim: int | None = None
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._counts = dict(misses=0, blocked_ticks=0, skipped_actions=0, chunk_switches=0, errors=0, calls=0)
        self._blocked_s = 0.0
        self._startup_s = 0.0
        self._closed = False

        # The worker holds only its inbox, never the runner, so an unclosed runner can still be
        # collected (its __del__ then stops the thread).
        self._inbox = _Inbox(self.adapter, self.clock)
        self._worker = threading.Thread(target=self._inbox.serve, name="flashrt-rtc-worker", daemon=True)
        self._worker.start()

    # -- control side ---------------------------------------------------------------------------

    def step(self, observation: Any) -> np.ndarray:
        """The action for this tick, shape (D,). Call once per control tick."""
        if self._closed:
            raise ConfigError("this AsyncChunkRunner is closed; create a new one")
        tick = self._tick
        if self._chunk is None:
            self._startup(observation, tick)
        elif self._job is not None and self.clock.poll(self._job.done, self._worker):
            self._switch(tick)

        chunk = self._chunk
        index = tick - chunk.start_tick
        if index >= len(chunk.actions):
            index = self._on_exhausted(observation, tick)
            chunk = self._chunk
        if index is None:  # hold_last
            action = self._last_action
        else:
            action = chunk.actions[index]
            self._last_action, self._last_index = action, index
        if self._job is None and index is not None and index >= self._prefetch_index(chunk):
            self._submit(observation, tick)
        self._tick += 1
        return np.array(action, copy=True)

    def _prefetch_index(self, chunk: _Chunk) -> int:
        horizon = len(chunk.actions)
        return horizon // 2 if self.prefetch_at is None else min(self.prefetch_at, horizon - 1)

    def _startup(self, observation: Any, tick: int) -> None:
        t0 = self.clock.now()
        if self._job is None:
            self._submit(observation, tick)
        self.clock.wait(self._job.done, self._worker)
        self._startup_s += self.clock.now() - t0
        self._switch(tick)
        if self._chunk is None:
            raise RuntimeError("AsyncChunkRunner: the worker stopped before the first chunk was ready")

    def _on_exhausted(self, observation: Any, tick: int) -> int | None:
        """The current chunk has no action for this tick. Returns the index to serve in the
        (possibly new) current chunk, or None to hold the last action."""
        self._counts["misses"] += 1
        if self.miss_policy == "hold_last":
            if self._job is None:  # prefetch never fired (e.g. a 1-action chunk): start now
                self._submit(observation, tick)
            return None
        if self._job is None:
            self._submit(observation, tick)
        t0 = self.clock.now()
        self.clock.wait(self._job.done, self._worker)
        self._blocked_s += self.clock.now() - t0
        self._counts["blocked_ticks"] += 1
        self._switch(tick)
        return min(tick - self._chunk.start_tick, len(self._chunk.actions) - 1)

    def _submit(self, observation: Any, tick: int) -> None:
        job = _Job(observation=observation, obs_tick=tick, requested_at=self.clock.now(), done=threading.Event())
        self._job = job
        self._inbox.put(job)
        # Under a virtual clock this waits until the worker has started the job (so the policy's
        # clock time starts now, not after the driver's next advance); wall clocks return at once.
        self.clock.poll(job.done, self._worker)

    def _switch(self, tick: int) -> None:
        job, self._job = self._job, None
        if job is None or not job.done.is_set():
            return
        if job.error is not None:
            self._counts["errors"] += 1
            raise job.error
        actions = job.chunk
        if self._action_dim is not None and actions.shape[1] != self._action_dim:
            self._counts["errors"] += 1
            raise InputError(f"the policy returned actions of dim {actions.shape[1]}, earlier chunks had {self._action_dim}")
        self._action_dim = actions.shape[1]
        self._latencies.append(job.finished_at - job.requested_at)
        self._counts["calls"] += 1
        start = job.obs_tick if self.skip_elapsed else tick
        if self._chunk is not None:
            self._counts["chunk_switches"] += 1
        self._counts["skipped_actions"] += max(0, min(tick - start, len(actions)))
        self._chunk = _Chunk(actions=actions, start_tick=start, obs_tick=job.obs_tick, requested_at=job.requested_at)

    # -- a paced loop -----------------------------------------------------------------------------

    def run(
        self,
        get_observation: Callable[[], Any],
        apply_action: Callable[[np.ndarray], Any],
        *,
        num_ticks: int | None = None,
        stop: threading.Event | None = None,
    ) -> RTCStats:
        """Drive ``step`` at ``control_hz`` on the runner's clock until ``num_ticks`` or ``stop``.
        A tick that overruns its slot is not made up for: the schedule restarts from now."""
        period = 1.0 / self.control_hz
        deadline = self.clock.now()
        done = 0
        while (num_ticks is None or done < num_ticks) and not (stop is not None and stop.is_set()):
            apply_action(self.step(get_observation()))
            done += 1
            deadline += period
            now = self.clock.now()
            if now < deadline:
                self.clock.sleep(deadline - now)
            else:
                deadline = now
        return self.stats()

    # -- stats and shutdown -------------------------------------------------------------------------

    def stats(self) -> RTCStats:
        lat = np.asarray(self._latencies, dtype=np.float64)
        has = lat.size > 0
        chunk = self._chunk
        return RTCStats(
            ticks=self._tick,
            inference_calls=self._counts["calls"],
            misses=self._counts["misses"],
            blocked_ticks=self._counts["blocked_ticks"],
            blocked_s=self._blocked_s,
            startup_s=self._startup_s,
            skipped_actions=self._counts["skipped_actions"],
            chunk_switches=self._counts["chunk_switches"],
            errors=self._counts["errors"],
            latency_p50_s=float(np.percentile(lat, 50)) if has else math.nan,
            latency_p99_s=float(np.percentile(lat, 99)) if has else math.nan,
            latency_mean_s=float(lat.mean()) if has else math.nan,
            latency_max_s=float(lat.max()) if has else math.nan,
            chunk_age_ticks=(self._tick - 1 - chunk.obs_tick) if chunk is not None and self._tick else 0,
            chunk_age_s=(self.clock.now() - chunk.requested_at) if chunk is not None else math.nan,
            chunk_index=self._last_index,
        )

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker and join it. An inference in flight is abandoned (its result
        dropped); a policy stuck in real computation is waited for up to ``timeout`` seconds."""
        if self._closed:
            return
        self._closed = True
        self._inbox.stop()
        self.clock.wake_all()
        self._worker.join(timeout)
        if self._worker.is_alive():
            import warnings  # noqa: PLC0415

            warnings.warn(
                f"AsyncChunkRunner.close(): the policy call in flight did not return within {timeout}s; "
                "its (daemon) worker thread is left to finish on its own",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> AsyncChunkRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close(timeout=0.1)
        except Exception:
            pass


__all__ = [
    "ActionChunkAdapter",
    "CallablePolicyAdapter",
    "AsyncChunkRunner",
    "RTCStats",
    "FakeClock",
    "MonotonicClock",
    "MISS_POLICIES",
]
