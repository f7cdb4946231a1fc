"""When each device is polled next: the poller's schedule, without I/O, clocks or randomness.

The poller adapter owns the sockets and threads; this decides. Every call takes ``now``
and, where a spread is wanted, a uniform random number ``rand`` in [0, 1) that the caller
draws. The rules:

- a device seen when polling starts is first asked at a point spread over one interval,
  so a daemon's start is a trickle, not a burst; one that appears later (or moves to a
  new address) is asked within ``min(interval, 2 s)``;
- after an answer the next poll is one interval away, after the first failure too; each
  further failure doubles the wait up to ``max_backoff`` (``state.next_delay``), every
  wait spread by +/- ``jitter``;
- a failing device that discovery hears from again is asked at once, once per streak
  of failures (so a printer that comes back is served again within a tick, and a flapping
  one cannot make the poller spin);
- a device with a poll in flight is never handed out again until its result is in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from nearestd.core.state import PollTarget, first_delay, next_delay

NEW_DEVICE_WITHIN = 2.0


@dataclass(slots=True)
class PollSchedule:
    """The due time, failure streak and in-flight mark of every pollable device."""

    interval: float
    max_backoff: float
    jitter: float = 0.1
    started_at: float = 0.0
    targets: dict[str, PollTarget] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    # When discovery last heard of each failing device, as of its first failed poll;
    # infinity once it has been asked again for being heard.
    heard_at_failure: dict[str, float] = field(default_factory=dict)

    def follow(self, targets: Mapping[str, PollTarget], now: float, rand: float) -> list[str]:
        """Follow the pollable devices: schedule new or moved ones, drop gone ones.

        Return the ids newly scheduled. ``rand`` spreads the first polls (each new device
        takes its own offset from it, so one draw per call is enough).
        """
        added = []
        for i, (device_id, target) in enumerate(targets.items()):
            old = self.targets.get(device_id)
            if old == target:
                continue
            starting = old is None and now - self.started_at < self.interval
            window = self.interval if starting else min(self.interval, NEW_DEVICE_WITHIN)
            self.targets[device_id] = target
            self.failures.pop(device_id, None)
            self.heard_at_failure.pop(device_id, None)
            # Golden-ratio steps from one draw spread a batch evenly over the window.
            self.due[device_id] = now + first_delay(window, (rand + i * 0.6180339887) % 1.0)
            added.append(device_id)
        for device_id in [d for d in self.targets if d not in targets]:
            self.forget(device_id)
        return added

    def forget(self, device_id: str) -> None:
        """Drop a device from the schedule (a result still in flight is then ignored)."""
        self.targets.pop(device_id, None)
        self.due.pop(device_id, None)
        self.failures.pop(device_id, None)
        self.heard_at_failure.pop(device_id, None)

    def heard(self, device_id: str, last_seen: float, now: float) -> bool:
        """Discovery heard from a device at ``last_seen``: ask a failing one at once, once."""
        at_failure = self.heard_at_failure.get(device_id)
        if at_failure is None or last_seen <= at_failure:
            return False
        self.due[device_id] = min(now, self.due.get(device_id, now))
        self.heard_at_failure[device_id] = math.inf
        return True

    def take_due(self, now: float) -> list[tuple[str, PollTarget]]:
        """Return every device due now and not in flight, and mark them in flight."""
        out = []
        for device_id, due in self.due.items():
            if due <= now and device_id not in self.in_flight:
                self.in_flight.add(device_id)
                out.append((device_id, self.targets[device_id]))
        return out

    def take_all(self) -> list[tuple[str, PollTarget]]:
        """Return every device not in flight, and mark them in flight (poll everything now)."""
        out = [(d, t) for d, t in self.targets.items() if d not in self.in_flight]
        self.in_flight.update(d for d, _ in out)
        return out

    def on_result(
        self, device_id: str, ok: bool, now: float, rand: float, last_seen: float = 0.0
    ) -> int:
        """Take one poll's outcome; schedule the next; return the failure streak (0 if ok).

        ``last_seen`` is when discovery last heard of the device, remembered at the first
        failure so that ``heard`` can tell a device that speaks again.
        """
        self.in_flight.discard(device_id)
        if device_id not in self.targets:
            return 0
        if ok:
            failures = 0
            self.failures.pop(device_id, None)
            self.heard_at_failure.pop(device_id, None)
        else:
            failures = self.failures.get(device_id, 0) + 1
            self.failures[device_id] = failures
            if failures == 1:
                self.heard_at_failure[device_id] = last_seen
        self.due[device_id] = now + next_delay(
            failures, self.interval, self.max_backoff, rand, self.jitter
        )
        return failures

    def next_wakeup(self) -> float | None:
        """Return the earliest due time of a device not in flight, or None."""
        times = [t for d, t in self.due.items() if d not in self.in_flight]
        return min(times, default=None)

    def failing(self) -> int:
        """Return how many devices are in a failure streak."""
        return len(self.failures)
