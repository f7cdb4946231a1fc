"""The rate limiter's token buckets, their bounded memory, the spike watch, connection slots."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core.limits import ConnectionSlots, RateLimiter, RecentKeys, SpikeWatch, source_key


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


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::ffff", "2001:db8:1:2::/64"),  # one /64 however it is written
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::1"),  # a link's hosts all share fe80::/64
        ("fe80::2", "fe80::2"),
        ("::1", "::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_source_key_is_the_ipv4_address_or_the_ipv6_64(ip: str, key: str) -> None:
    assert source_key(ip) == key


def test_one_64_shares_one_rate_bucket() -> None:
    rl = RateLimiter(rate=1, burst=10, max_keys=100)
    granted = sum(rl.take(source_key(f"2001:db8:0:1::{i:x}"), 1, 0.0) for i in range(1, 51))
    assert granted == 10
    assert rl.take(source_key("2001:db8:0:2::1"), 1, 0.0) == 1  # the next /64 is another client
    assert len(rl) == 2


# (total, per_source, reserved, steps, expected): each step is (source, trusted) to admit,
# or ("-source", trusted) to release; expected is the result of each admit in order.
SLOT_CASES = [
    # One untrusted source stops at its share; another source still gets in.
    (10, 3, 2, [("a", False)] * 4 + [("b", False)], [None, None, None, "per-source", None]),
    # Untrusted clients together stop short of the reserve; trusted ones use it.
    (
        6,
        6,
        2,
        [("a", False), ("b", False), ("c", False), ("d", False), ("e", False), ("t", True)],
        [None, None, None, None, "reserved", None],
    ),
    # The reserve holds while untrusted clients are at their limit; then everything is full.
    (
        4,
        4,
        2,
        [("a", False), ("a", False), ("a", False), ("t", True), ("u", True), ("v", True)],
        [None, None, "reserved", None, None, "full"],
    ),
    # Trusted clients are not capped per source, only by the total.
    (5, 1, 1, [("t", True)] * 6, [None] * 5 + ["full"]),
    # A release gives the source its share back.
    (10, 2, 0, [("a", False), ("a", False), ("a", False), ("-a", False), ("a", False)],
     [None, None, "per-source", None]),
    # The reserve is at most half of the total, the share at most what untrusted may hold.
    (4, 100, 100, [("a", False)] * 3, [None, None, "reserved"]),
]  # fmt: skip


@pytest.mark.parametrize(("total", "per_source", "reserved", "steps", "expected"), SLOT_CASES)
def test_connection_slots(
    total: int,
    per_source: int,
    reserved: int,
    steps: list[tuple[str, bool]],
    expected: list[str | None],
) -> None:
    slots = ConnectionSlots(total, per_source, reserved)
    got: list[str | None] = []
    for source, trusted in steps:
        if source.startswith("-"):
            slots.release(source[1:], trusted)
        else:
            got.append(slots.admit(source, trusted))
    assert got == expected
    assert 0 <= slots.untrusted_open <= slots.open <= total


def test_connection_slots_release_everything_and_reconfigure() -> None:
    slots = ConnectionSlots(8, 2, 2)
    admitted = [("a", False), ("a", False), ("b", False), ("t", True)]
    for s, t in admitted:
        assert slots.admit(s, t) is None
    assert slots.held_by("a") == 2 and slots.sources == 2
    for s, t in admitted:
        slots.release(s, t)
    assert (slots.open, slots.untrusted_open, slots.sources) == (0, 0, 0)
    slots.configure(8, 1, 0)
    assert slots.admit("a", False) is None
    assert slots.admit("a", False) == "per-source"
    with pytest.raises(ValueError):
        slots.configure(0, 1, 0)


def test_recent_keys_forget_the_least_recently_noted() -> None:
    recent = RecentKeys(max_keys=2)
    recent.note("a")
    recent.note("b")
    recent.note("a")  # "a" is the most recent again
    recent.note("c")  # forgets "b"
    assert ("a" in recent, "b" in recent, "c" in recent, len(recent)) == (True, False, True, 2)
    with pytest.raises(ValueError):
        RecentKeys(0)
