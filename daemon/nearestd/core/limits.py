"""Fair shares per client source: rate buckets, connection slots, the spike watch.

A client's *source* is its IPv4 address or its IPv6 /64 (:func:`source_key`): both the
rate limiter and the connection slots count by it.

Rate limiting: each key (a client source) has a bucket of ``burst`` tokens refilled at ``rate`` per
second; a request takes one token or is refused. The table holds at most
``max_keys`` buckets in least-recently-used order, so an attacker cycling through
addresses evicts old buckets instead of growing memory. An evicted bucket would
have been refilled soon anyway; evictions are counted so an operator can see them.
``prune`` drops every bucket that has been idle long enough to be full again: such
a bucket says nothing a fresh one would not, so a client address stays in memory
at most ``burst / rate`` seconds after its last request.
"""

from __future__ import annotations

import ipaddress
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

    def __contains__(self, key: Hashable) -> bool:
        return key in self._buckets

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


class RecentKeys:
    """The ``max_keys`` keys noted most recently, in least-recently-noted order."""

    __slots__ = ("_keys", "max_keys")

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self.max_keys = max_keys
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def note(self, key: Hashable) -> None:
        """Remember ``key`` as the most recent, forgetting the oldest beyond ``max_keys``."""
        keys = self._keys
        if key in keys:
            keys.move_to_end(key)
            return
        keys[key] = None
        if len(keys) > self.max_keys:
            keys.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


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


def source_key(ip: str) -> str:
    """Return what per-source limits count by: an IPv4 address, or an IPv6 address's /64.

    One IPv6 host is routinely given a whole /64 (SLAAC, privacy addresses), so it can
    ask from 2**64 addresses: counted per /128 it would have 2**64 rate buckets and
    connection shares. Link-local addresses are the exception: every host on a link
    shares fe80::/64, so each of them counts by its own address. Anything that is not an
    IPv6 address is returned unchanged.
    """
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.is_link_local:
        return str(addr)
    return f"{ipaddress.IPv6Address(addr.packed[:8] + bytes(8))}/64"


class ConnectionSlots:
    """Open connections counted per source, with a share only trusted connections may use.

    ``total`` connections at most; untrusted ones (TCP clients outside ``trusted_peers``)
    may hold at most ``total - reserved`` of them together and ``per_source`` from one
    source key (see :func:`source_key`), so one address cannot take every slot and the
    reserve stays free for trusted peers and Unix-socket clients. The reserve is capped
    at half of ``total`` and the per-source cap at the untrusted share, so a small
    ``total`` still leaves room for both kinds.
    """

    __slots__ = ("_by_source", "open", "per_source", "reserved", "total", "untrusted_open")

    def __init__(self, total: int, per_source: int, reserved: int) -> None:
        self._by_source: dict[str, int] = {}
        self.open = 0
        self.untrusted_open = 0
        self.total = self.per_source = self.reserved = 0
        self.configure(total, per_source, reserved)

    def configure(self, total: int, per_source: int, reserved: int) -> None:
        """Set the caps (at start or after a reload); open connections are kept."""
        if total < 1 or per_source < 1 or reserved < 0:
            raise ValueError("total and per_source must be positive, reserved not negative")
        self.total = total
        self.reserved = min(reserved, total // 2)
        self.per_source = min(per_source, total - self.reserved)

    def admit(self, source: str, trusted: bool) -> str | None:
        """Count a connection in and return None, or return why it is refused.

        Reasons: ``"full"`` (every slot taken), ``"reserved"`` (only the reserve is left,
        and it is not for untrusted clients), ``"per-source"`` (this source holds its share).
        """
        if self.open >= self.total:
            return "full"
        if not trusted:
            if self.untrusted_open >= self.total - self.reserved:
                return "reserved"
            held = self._by_source.get(source, 0)
            if held >= self.per_source:
                return "per-source"
            self._by_source[source] = held + 1
            self.untrusted_open += 1
        self.open += 1
        return None

    def release(self, source: str, trusted: bool) -> None:
        """Count a connection admitted with the same arguments out."""
        self.open -= 1
        if not trusted:
            self.untrusted_open -= 1
            held = self._by_source.get(source, 0) - 1
            if held > 0:
                self._by_source[source] = held
            else:
                self._by_source.pop(source, None)

    def held_by(self, source: str) -> int:
        """Return how many untrusted connections a source key holds."""
        return self._by_source.get(source, 0)

    @property
    def sources(self) -> int:
        """Return how many source keys hold untrusted connections."""
        return len(self._by_source)
