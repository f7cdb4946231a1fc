"""Bucket counts for answer latency, cheap enough to update on every request.

The socket adapter observes each answer's duration here, on the event loop; the
metrics adapter copies the counts into an immutable snapshot when scraped. No
Prometheus object is touched per request.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in seconds (Prometheus ``le``): most answers take tens of microseconds.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
MAX_SERIES = 16


class Histogram:
    """Counts of observations per bucket (the last one is +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bucket bounds must be distinct and increasing")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (seconds)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """Return how many observations there were."""
        return sum(self.counts)

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """Return (upper bound, observations at or below it) pairs, +Inf last."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return tuple(out)


class Latencies:
    """One latency histogram per interface (tcp, unix, admin, mqtt...), bounded in number."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.by_interface: dict[str, Histogram] = {}

    def for_interface(self, interface: str) -> Histogram:
        """Return the histogram of an interface, creating it on first use."""
        hist = self.by_interface.get(interface)
        if hist is None:
            if len(self.by_interface) >= MAX_SERIES:
                interface = "other"
                hist = self.by_interface.get(interface)
            if hist is None:
                hist = self.by_interface[interface] = Histogram(self.bounds)
        return hist
