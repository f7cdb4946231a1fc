"""The poll schedule as a pure function of events and ``now`` (core/schedule.py)."""

from __future__ import annotations

import math

import pytest

from nearestd.core.schedule import PollSchedule
from nearestd.core.state import PollTarget

A = PollTarget("ipp", "http://198.18.1.2:631/ipp/print", "ipp://198.18.1.2:631/ipp/print")
B = PollTarget("ipp", "http://198.18.1.3:631/ipp/print", "ipp://198.18.1.3:631/ipp/print")
A_MOVED = PollTarget("ipp", "http://198.18.1.9:631/ipp/print", "ipp://198.18.1.9:631/ipp/print")


def sched(started_at: float = 0.0) -> PollSchedule:
    return PollSchedule(interval=30.0, max_backoff=300.0, jitter=0.0, started_at=started_at)


def test_first_polls_at_start_are_spread_over_one_interval() -> None:
    s = sched()
    targets = {f"d{i}": PollTarget("ipp", f"http://10.0.0.{i}/", "") for i in range(50)}
    assert len(s.follow(targets, 0.0, 0.3)) == 50
    dues = sorted(s.due.values())
    assert dues[0] >= 0 and dues[-1] < 30.0
    # Evenly: no 3-second window holds more than a fifth of them.
    assert max(sum(1 for d in dues if t <= d < t + 3) for t in range(30)) <= 10


@pytest.mark.parametrize(
    ("started_at", "now", "within"),
    [
        (0.0, 10.0, 30.0),  # still in the first interval: spread like the others
        (0.0, 100.0, 2.0),  # later: asked soon
    ],
)
def test_a_new_device_is_asked_within_its_window(
    started_at: float, now: float, within: float
) -> None:
    s = sched(started_at)
    s.follow({"a": A}, now, 0.999)
    assert now <= s.due["a"] < now + within


def test_a_device_at_a_new_address_starts_over_and_a_gone_one_is_dropped() -> None:
    s = sched()
    s.follow({"a": A, "b": B}, 0.0, 0.5)
    s.on_result("a", False, 1.0, 0.5)
    assert s.failures == {"a": 1}
    assert s.follow({"a": A_MOVED}, 100.0, 0.5) == ["a"]
    assert s.failures == {} and set(s.targets) == {"a"} and "b" not in s.due
    assert s.follow({"a": A_MOVED}, 101.0, 0.5) == []  # unchanged: nothing to do


@pytest.mark.parametrize(
    ("outcomes", "next_in"),
    [
        ([True], 30.0),
        ([False], 30.0),  # the first failure waits one interval
        ([False, False], 60.0),
        ([False, False, False], 120.0),
        ([False] * 5, 300.0),  # capped at max_backoff
        ([False] * 40, 300.0),
        ([False, False, True], 30.0),  # an answer ends the streak
    ],
)
def test_backoff_doubles_per_failure_after_the_first(outcomes: list[bool], next_in: float) -> None:
    s = sched()
    s.follow({"a": A}, 0.0, 0.0)
    now = 1000.0
    for ok in outcomes:
        s.in_flight.add("a")
        s.on_result("a", ok, now, 0.5)
    assert s.due["a"] == pytest.approx(now + next_in)


def test_jitter_spreads_each_wait_both_ways() -> None:
    s = PollSchedule(interval=30.0, max_backoff=300.0, jitter=0.1)
    s.follow({"a": A}, 0.0, 0.0)
    s.on_result("a", True, 0.0, 0.0)
    low = s.due["a"]
    s.on_result("a", True, 0.0, 0.999999)
    assert (low, round(s.due["a"], 3)) == (27.0, 33.0)


def test_due_devices_are_handed_out_once_until_their_result_is_in() -> None:
    s = sched()
    s.follow({"a": A, "b": B}, 0.0, 0.0)
    s.due.update({"a": 5.0, "b": 50.0})
    assert s.next_wakeup() == 5.0
    assert s.take_due(4.9) == []
    assert s.take_due(5.0) == [("a", A)]
    assert s.take_due(6.0) == []  # in flight
    assert s.next_wakeup() == 50.0
    s.on_result("a", True, 7.0, 0.5)
    assert s.next_wakeup() == 37.0
    assert [d for d, _ in s.take_all()] == ["a", "b"]
    assert s.take_all() == [] and s.next_wakeup() is None


def test_a_failing_device_heard_again_is_asked_at_once_once_per_streak() -> None:
    s = sched()
    s.follow({"a": A}, 0.0, 0.0)
    s.on_result("a", False, 10.0, 0.5, last_seen=8.0)
    assert s.due["a"] == 40.0
    assert s.heard("a", 8.0, 12.0) is False  # nothing new from discovery
    assert s.heard("a", 11.0, 12.0) is True and s.due["a"] == 12.0
    assert s.heard("a", 13.0, 14.0) is False  # once per streak
    s.on_result("a", False, 15.0, 0.5, last_seen=13.0)  # still failing: the streak goes on
    assert s.heard_at_failure["a"] == math.inf
    s.on_result("a", True, 20.0, 0.5)
    assert "a" not in s.heard_at_failure
    assert s.heard("a", 30.0, 31.0) is False  # answering devices are not hurried


def test_a_result_for_a_forgotten_device_is_ignored() -> None:
    s = sched()
    s.follow({"a": A}, 0.0, 0.0)
    s.take_all()
    s.follow({}, 1.0, 0.0)
    assert s.on_result("a", False, 2.0, 0.5) == 0
    assert s.due == {} and s.failures == {} and s.in_flight == set()
