"""RTC-lite on a deterministic fake clock with a deliberately slow policy.

Every expected sequence below was worked out by hand from the rules in docs/rtc.md (tick times
are multiples of 1/8 s so the virtual clock is exact in binary floating point).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from flash_rt.errors import ConfigError, InputError
from flash_rt.runtime.rtc import (
    ActionChunkAdapter,
    AsyncChunkRunner,
    CallablePolicyAdapter,
    FakeClock,
    MonotonicClock,
    RTCStats,
)

HZ = 8.0
TICK = 1.0 / HZ


class SlowPolicy(ActionChunkAdapter):
    """Takes ``latency`` seconds of clock time; chunk k has actions[i] = (k, i, observation)."""

    def __init__(self, clock, latency: float, horizon: int) -> None:
        self.clock, self.latency, self.horizon = clock, latency, horizon
        self.observations: list = []

    def infer_chunk(self, observation):
        call = len(self.observations)
        self.observations.append(observation)
        self.clock.sleep(self.latency)
        idx = np.arange(self.horizon, dtype=np.float64)
        return np.stack([np.full(self.horizon, call), idx, np.full(self.horizon, observation)], axis=1)


def drive(runner, clock, ticks: int) -> list[tuple[int, int]]:
    """Step once per tick with observation = tick number; returns (chunk, index) served."""
    served = []
    for t in range(ticks):
        action = runner.step(t)
        served.append((int(action[0]), int(action[1])))
        clock.advance(TICK)
    return served


def threads_named_rtc() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flashrt-rtc-worker"]


def test_no_misses_when_inference_fits_in_the_chunk():
    clock = FakeClock()
    policy = SlowPolicy(clock, latency=2 * TICK, horizon=8)
    with AsyncChunkRunner(policy, HZ, clock=clock) as runner:  # prefetch at index 8 // 2 = 4
        served = drive(runner, clock, 15)
        stats = runner.stats()
    assert served == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5),
                      (1, 2), (1, 3), (1, 4), (1, 5),
                      (2, 2), (2, 3), (2, 4), (2, 5),
                      (3, 2)]
    assert policy.observations == [0, 4, 8, 12]
    assert stats.misses == 0 and stats.miss_rate == 0.0
    assert stats.ticks == 15
    assert stats.inference_calls == 4 and stats.chunk_switches == 3
    assert stats.skipped_actions == 3 * 2  # two actions went stale during each 2-tick inference
    assert stats.latency_p50_s == pytest.approx(0.25) and stats.latency_p99_s == pytest.approx(0.25)
    assert stats.startup_s == pytest.approx(0.25)
    assert stats.chunk_index == 2 and stats.chunk_age_ticks == 2  # chunk 3 was computed at tick 12
    assert stats.chunk_age_s == pytest.approx(15 * TICK + 0.25 - (12 * TICK + 0.25))


def test_hold_last_repeats_the_last_action_and_counts_misses():
    clock = FakeClock()
    policy = SlowPolicy(clock, latency=3 * TICK, horizon=4)
    with AsyncChunkRunner(policy, HZ, clock=clock, prefetch_at=2, miss_policy="hold_last") as runner:
        served = drive(runner, clock, 12)
        stats = runner.stats()
    assert served == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 3),
                      (1, 3), (1, 3), (1, 3),
                      (2, 3), (2, 3), (2, 3),
                      (3, 3)]
    assert policy.observations == [0, 2, 5, 8, 11]  # tick 11 switched to chunk 3 and prefetched
    assert stats.misses == 5 and stats.blocked_ticks == 0
    assert stats.miss_rate == pytest.approx(5 / 12)
    assert stats.latency_p50_s == pytest.approx(3 * TICK)
    assert stats.latency_max_s == pytest.approx(3 * TICK)


def test_block_waits_for_the_next_chunk():
    clock = FakeClock()
    policy = SlowPolicy(clock, latency=3 * TICK, horizon=4)
    with AsyncChunkRunner(policy, HZ, clock=clock, prefetch_at=2, miss_policy="block") as runner:
        served = drive(runner, clock, 9)
        stats = runner.stats()
    assert served == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3), (3, 2)]
    assert policy.observations == [0, 2, 4, 6, 8]
    assert stats.misses == 3 and stats.blocked_ticks == 3
    assert stats.blocked_s == pytest.approx(3 * TICK)  # each wait ran one tick past the deadline
    # Blocking stretched the timeline: 9 ticks plus 3 blocked ticks plus the 3-tick startup.
    assert clock.now() == pytest.approx((9 + 3 + 3) * TICK)


def test_without_skip_elapsed_a_new_chunk_starts_at_index_zero():
    clock = FakeClock()
    policy = SlowPolicy(clock, latency=2 * TICK, horizon=8)
    with AsyncChunkRunner(policy, HZ, clock=clock, skip_elapsed=False) as runner:
        served = drive(runner, clock, 13)
        stats = runner.stats()
    assert served == [(0, i) for i in range(6)] + [(1, i) for i in range(6)] + [(2, 0)]
    assert policy.observations == [0, 4, 10]
    assert stats.skipped_actions == 0 and stats.misses == 0


def test_prefetch_zero_keeps_one_inference_in_flight():
    clock = FakeClock()
    policy = SlowPolicy(clock, latency=TICK, horizon=4)
    with AsyncChunkRunner(policy, HZ, clock=clock, prefetch_at=0) as runner:
        served = drive(runner, clock, 6)
    # Every chunk is requested the tick the previous one arrives, and arrives one tick later.
    assert served == [(0, 0), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert policy.observations == [0, 0, 1, 2, 3, 4, 5]


def test_callable_adapter_accepts_dicts_and_plain_functions():
    clock = FakeClock()

    def client_infer(obs):  # an openpi websocket client returns {"actions": ...}
        return {"actions": np.full((3, 2), float(obs["t"]))}

    with AsyncChunkRunner(CallablePolicyAdapter(client_infer), HZ, clock=clock) as runner:
        np.testing.assert_array_equal(runner.step({"t": 7}), [7.0, 7.0])
    with AsyncChunkRunner(lambda obs: np.ones((2, 3)) * obs, HZ, clock=clock) as runner:
        np.testing.assert_array_equal(runner.step(5), [5.0, 5.0, 5.0])

    def predict(images, prompt=None, state=None):
        return np.array([[len(images), len(prompt)]], dtype=np.float32)

    adapter = CallablePolicyAdapter(predict, unpack=True)
    np.testing.assert_array_equal(adapter({"images": [1, 2], "prompt": "abc"}), [[2, 3]])
    with pytest.raises(InputError, match="without 'actions'"):
        CallablePolicyAdapter(lambda obs: {"act": 1})(None)


def test_step_returns_a_copy():
    clock = FakeClock()
    chunk = np.arange(8.0).reshape(4, 2)
    with AsyncChunkRunner(lambda obs: chunk, HZ, clock=clock) as runner:
        first = runner.step(0)
        first[:] = -1
        assert chunk[0].tolist() == [0.0, 1.0]


def test_bad_chunks_and_policy_errors_surface_in_step():
    clock = FakeClock()
    with AsyncChunkRunner(lambda obs: np.zeros(5), HZ, clock=clock) as runner:
        with pytest.raises(InputError, match=r"shape \(H, D\).*\(5,\)"):
            runner.step(0)

    def broken(obs):
        raise ValueError("camera unplugged")

    with AsyncChunkRunner(broken, HZ, clock=clock) as runner:
        with pytest.raises(ValueError, match="camera unplugged"):
            runner.step(0)
        assert runner.stats().errors == 1


def test_action_dim_change_is_an_error():
    clock = FakeClock()
    dims = iter([2, 3])
    with AsyncChunkRunner(lambda obs: np.ones((2, next(dims))), HZ, clock=clock, prefetch_at=0) as runner:
        runner.step(0)
        clock.advance(TICK)
        with pytest.raises(InputError, match="dim 3, earlier chunks had 2"):
            runner.step(1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(miss_policy="skip"), "miss_policy must be one of hold_last, block"),
        (dict(prefetch_at=-1), "prefetch_at"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AsyncChunkRunner(lambda obs: np.ones((2, 2)), HZ, **kwargs)
    with pytest.raises(ConfigError, match="control_hz"):
        AsyncChunkRunner(lambda obs: np.ones((2, 2)), 0)


def test_close_joins_the_worker_even_with_inference_in_flight():
    before = len(threads_named_rtc())
    clock = FakeClock()
    policy = SlowPolicy(clock, latency=100.0, horizon=4)  # never finishes on its own
    runner = AsyncChunkRunner(policy, HZ, clock=clock, prefetch_at=0)
    policy.latency = 0.0
    runner.step(0)  # the first chunk is immediate ...
    policy.latency = 100.0
    clock.advance(TICK)
    runner.step(1)  # ... the next is in flight, asleep on the clock
    assert len(threads_named_rtc()) == before + 1
    runner.close()
    assert runner.closed and not runner._worker.is_alive()
    assert len(threads_named_rtc()) == before
    with pytest.raises(ConfigError, match="closed"):
        runner.step(2)
    runner.close()  # idempotent


def test_context_manager_leaves_no_thread_behind():
    before = len(threads_named_rtc())
    clock = FakeClock()
    with AsyncChunkRunner(SlowPolicy(clock, TICK, 4), HZ, clock=clock) as runner:
        drive(runner, clock, 5)
    assert len(threads_named_rtc()) == before


def test_run_paces_on_the_clock():
    clock = FakeClock()
    policy = SlowPolicy(clock, latency=2 * TICK, horizon=8)
    applied = []
    obs = iter(range(100))
    with AsyncChunkRunner(policy, HZ, clock=clock) as runner:
        stats = runner.run(lambda: next(obs), applied.append, num_ticks=10)
    assert len(applied) == 10 and stats.ticks == 10 and stats.misses == 0
    # The 2-tick startup overran tick 0's slot, so tick 1 ran at once and the schedule restarted
    # there; ticks 1..9 then took one slot each.
    assert clock.now() == pytest.approx(2 * TICK + 9 * TICK)
    assert [int(a[0]) for a in applied] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_real_clock_smoke():
    """Wall-clock run with a 5 ms policy at 100 Hz: chunks flow, the worker is joined."""
    before = len(threads_named_rtc())

    def policy(obs):
        time.sleep(0.005)
        return np.full((10, 2), float(obs))

    ticks = iter(range(1000))
    with AsyncChunkRunner(policy, 100.0, clock=MonotonicClock()) as runner:
        stats = runner.run(lambda: next(ticks), lambda a: None, num_ticks=25)
    assert stats.ticks == 25 and stats.inference_calls >= 2
    assert 0.004 <= stats.latency_p50_s < 0.5
    assert len(threads_named_rtc()) == before


def test_stats_defaults():
    stats = RTCStats()
    assert stats.ticks == 0 and stats.miss_rate == 0.0 and np.isnan(stats.latency_p50_s)


def test_an_unclosed_runner_is_collected_and_its_worker_stopped():
    import gc

    before = len(threads_named_rtc())
    clock = FakeClock()
    runner = AsyncChunkRunner(SlowPolicy(clock, TICK, 4), HZ, clock=clock)
    drive(runner, clock, 3)
    worker = runner._worker
    del runner
    gc.collect()
    worker.join(2.0)
    assert not worker.is_alive() and len(threads_named_rtc()) == before


def test_fake_clock_wake_all_releases_only_current_sleepers():
    clock = FakeClock()
    woke = []
    sleeper = threading.Thread(target=lambda: (clock.sleep(5.0), woke.append(clock.now())))
    sleeper.start()
    while not clock._sleepers:
        time.sleep(1e-3)
    clock.wake_all()
    sleeper.join(2.0)
    assert woke == [0.0]
    later = threading.Thread(target=lambda: (clock.sleep(1.0), woke.append(clock.now())))
    later.start()
    while not clock._sleepers:
        time.sleep(1e-3)
    assert len(woke) == 1  # a later sleep waits for time as usual
    clock.advance(1.0)
    later.join(2.0)
    assert woke == [0.0, 1.0]
