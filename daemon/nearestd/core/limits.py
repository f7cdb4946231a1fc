"""Rate limiting per client address: token buckets in a bounded, self-emptying table.

Each key (a client address) has a bucket of ``burst`` tokens refilled at ``rate`` per
second; a request takes one token or is refused. The table holds at most
``max_keys`` buckets in least-recently-used order, so an attacker cycling through
addresses evicts old buckets instead of growing memory. An evicted bucket would
have been refilled soon anyway; evictions are counted so an operator can see them.
``prune`` drops every bucket that has been idle long enough to be full again: such
a bucket says nothing a fresh one would not, so a client address stays in memory
at most ``burst / rate`` seconds after its last request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class RateLimiter:
    """Token buckets per key with LRU-bounded memory; time is passed in as ``now``."""

    __slots__ = ("_buckets", "burst", "evicted", "limited", "max_keys", "rate")

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate, burst and max_keys must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self.evicted = 0
        self.limited = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, n: int, now: float) -> int:
        """Take up to ``n`` tokens for ``key``; return how many were granted."""
        buckets = self._buckets
        state = buckets.get(key)
        if state is None:
            tokens = self.burst
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
                self.evicted += 1
        else:
            tokens, last = state
            elapsed = now - last
            if elapsed > 0:
                tokens = min(self.burst, tokens + elapsed * self.rate)
            buckets.move_to_end(key)
        granted = n if tokens >= n else int(tokens)
        buckets[key] = (tokens - granted, now)
        if granted < n:
            self.limited += n - granted
        return granted

    def prune(self, now: float) -> int:
        """Drop buckets idle long enough to be full again; return how many."""
        cutoff = now - self.burst / self.rate
        buckets = self._buckets
        n = 0
        # LRU order: the front was touched least recently, so stop at the first recent one.
        while buckets:
            key, (_, last) = next(iter(buckets.items()))
            if last > cutoff:
                break
            del buckets[key]
            n += 1
        return n

    def configure(self, rate: float, burst: int, max_keys: int) -> None:
        """Change the parameters (after a reload); existing buckets are kept."""
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate, burst and max_keys must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        while len(self._buckets) > max_keys:
            self._buckets.popitem(last=False)
            self.evicted += 1


class SpikeWatch:
    """Counts requests per pseudonym per window; says when one crosses the threshold.

    At most ``max_keys`` pseudonyms are counted per window; later newcomers in a full
    window are counted together as ``untracked`` rather than growing memory.
    """

    __slots__ = (
        "_counts",
        "_window_start",
        "max_keys",
        "spikes",
        "threshold",
        "untracked",
        "window",
    )

    def __init__(self, threshold: int, window: float = 60.0, max_keys: int = 65536) -> None:
        self.threshold = threshold
        self.window = window
        self.max_keys = max_keys
        self._counts: dict[bytes, int] = {}
        self._window_start = 0.0
        self.spikes = 0
        self.untracked = 0

    def note(self, key: bytes, now: float) -> bool:
        """Count one request; return True exactly when ``key`` crosses the threshold."""
        if now - self._window_start >= self.window or now < self._window_start:
            self._counts = {}
            self._window_start = now
        counts = self._counts
        n = counts.get(key)
        if n is None:
            if len(counts) >= self.max_keys:
                self.untracked += 1
                return False
            n = 0
        n += 1
        counts[key] = n
        if n == self.threshold + 1:
            self.spikes += 1
            return True
        return False

    def __len__(self) -> int:
        return len(self._counts)
