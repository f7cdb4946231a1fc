"""The rate limiter's token buckets, their bounded memory, and the spike watch."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core.limits import RateLimiter, SpikeWatch


def test_burst_then_refill() -> None:
    rl = RateLimiter(rate=10, burst=5, max_keys=100)
    assert rl.take("a", 3, 0.0) == 3
    assert rl.take("a", 3, 0.0) == 2
    assert rl.take("a", 1, 0.0) == 0
    assert rl.limited == 2
    assert rl.take("a", 1, 0.1) == 1  # 0.1 s at 10/s is one token
    assert rl.take("a", 10, 100.0) == 5  # never more than the burst
    assert rl.take("b", 5, 0.0) == 5  # another address is not affected


@pytest.mark.parametrize(
    ("steps", "granted"),
    [
        # The daemon's defaults in test_security_daemon.py: 20/s, a burst of 20.
        ([(0.0, 100)], [20]),
        ([(0.0, 100), (0.5, 30)], [20, 10]),  # half a second refills ten
        ([(0.0, 100), (0.5, 30), (0.5, 5)], [20, 10, 0]),
        ([(0.0, 20), (10.0, 30)], [20, 20]),  # a long pause refills the burst, no more
        ([(0.0, 1), (0.05, 20)], [1, 20]),  # 0.05 s brings back the one token used
    ],
)
def test_refill_follows_now(steps: list[tuple[float, int]], granted: list[int]) -> None:
    rl = RateLimiter(rate=20, burst=20, max_keys=10)
    assert [rl.take("greedy", n, now) for now, n in steps] == granted


def test_clock_going_backwards_grants_nothing_extra() -> None:
    rl = RateLimiter(rate=10, burst=2, max_keys=10)
    assert rl.take("a", 2, 100.0) == 2
    assert rl.take("a", 1, 50.0) == 0


def test_memory_is_bounded_under_address_cycling() -> None:
    rl = RateLimiter(rate=1, burst=1, max_keys=1000)
    for i in range(100_000):
        rl.take(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1, 0.0)
    assert len(rl) == 1000
    assert rl.evicted == 99_000
    assert sys.getsizeof(rl._buckets) < 200_000


def test_prune_forgets_idle_addresses_once_their_bucket_is_full_again() -> None:
    rl = RateLimiter(rate=100, burst=200, max_keys=10)
    rl.take("old", 1, 0.0)
    rl.take("new", 1, 1.5)
    assert rl.prune(1.9) == 0  # "old" needs 2 s to be full again
    assert rl.prune(2.0) == 1
    assert len(rl) == 1
    assert rl.prune(10.0) == 1
    assert len(rl) == 0


def test_lru_keeps_the_active_address() -> None:
    rl = RateLimiter(rate=1, burst=2, max_keys=2)
    rl.take("busy", 2, 0.0)
    rl.take("x", 1, 0.0)
    rl.take("busy", 1, 0.0)  # refused, but touched: now most recent
    rl.take("y", 1, 0.0)  # evicts "x", not "busy"
    assert rl.take("busy", 1, 0.0) == 0


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0, 1, 1)
    rl = RateLimiter(1, 1, 5)
    for i in range(5):
        rl.take(i, 1, 0.0)
    rl.configure(2, 3, 2)
    assert len(rl) == 2


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.5, 1000),
    st.integers(1, 50),
    st.lists(st.tuples(st.integers(1, 20), st.floats(0, 2, allow_nan=False)), max_size=80),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, calls: list[tuple[int, float]]
) -> None:
    rl = RateLimiter(rate, burst, 10)
    now = 0.0
    total = 0
    for n, dt in calls:
        now += dt
        got = rl.take("k", n, now)
        assert 0 <= got <= n
        total += got
        assert total <= burst + rate * now + 1e-6


def test_spike_watch_fires_once_per_window() -> None:
    sw = SpikeWatch(threshold=3, window=60.0, max_keys=2)
    fired = [sw.note(b"p", float(t)) for t in range(6)]
    assert fired == [False, False, False, True, False, False]
    assert sw.spikes == 1
    assert [sw.note(b"p", 61.0 + t) for t in range(4)][-1] is True  # a new window
    sw.note(b"q", 62.0)
    assert sw.note(b"r", 62.0) is False  # over max_keys: untracked, not stored
    assert sw.untracked == 1
    assert len(sw) == 2
