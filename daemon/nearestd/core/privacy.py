"""The location log: keyed pseudonyms of client IPs, short-lived and bounded.

Each entry holds a timestamp, HMAC-SHA256(key, ip) truncated to 16 bytes, the zone,
the op and the devices answered. The key is random (supplied by the caller, since
the core makes no randomness), lives for one retention period, and is kept after
that only while entries made with it exist; then it is dropped, which makes the
old pseudonyms unlinkable to anything. Entries older than the retention period are
purged by ``purge``; the number of entries is capped, oldest dropped first.

Keys are held in a ``bytearray`` that is overwritten with zeros when the key is
dropped (best effort: CPython may have copied it, e.g. into the HMAC state, which
is dropped at the same moment). Nothing here logs or returns key material; the
subject-access export carries no pseudonym either.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, NamedTuple

PSEUDONYM_BYTES = 16


class LogEntry(NamedTuple):
    """One answered request, without the IP (a tuple: one is made per query)."""

    ts: float
    epoch: int
    pseudonym: bytes
    zone: str | None
    op: str
    devices: tuple[str, ...]

    def to_export(self) -> dict[str, Any]:
        """Return the subject-access form (no key material)."""
        return {
            "ts": self.ts,
            "zone": self.zone,
            "op": self.op,
            "devices": list(self.devices),
        }


# An entry as held: a plain tuple (ts, epoch, pseudonym, zone, op, devices). The cyclic
# collector stops tracking a plain tuple of atoms, but never a LogEntry: as LogEntry, the
# 100,000 entries a busy log holds made every full collection walk them (about 80 ms with
# the loop stopped, measured under the DNS-SD bench); as rows they cost it nothing.
Row = tuple[float, int, bytes, str | None, str, tuple[str, ...]]


def entry_bytes(entry: Row) -> int:
    """Return the memory an entry holds of its own (zone, op and device ids are shared)."""
    return (
        sys.getsizeof(entry)
        + sys.getsizeof(entry[0])
        + sys.getsizeof(entry[2])
        + sys.getsizeof(entry[5])
    )


@dataclass(slots=True)
class _Epoch:
    number: int
    start: float
    key: bytearray | None
    mac: Any = None

    def __post_init__(self) -> None:
        if self.key is not None:
            self.mac = hmac.new(self.key, digestmod=hashlib.sha256)

    def destroy(self) -> None:
        if self.key is not None:
            self.key[:] = bytes(len(self.key))
        self.key = None
        self.mac = None


class LocationLog:
    """In-memory, retention-bounded log of who was located where, by pseudonym."""

    def __init__(self, retention: float, max_entries: int, key: bytes, now: float) -> None:
        if len(key) < 32:
            raise ValueError("the pseudonym key must be at least 256 bits")
        self.retention = retention
        self.max_entries = max_entries
        self._entries: deque[Row] = deque()
        self._epochs: list[_Epoch] = [_Epoch(0, now, bytearray(key))]
        # Entries held per key epoch, so dropping unused keys costs O(epochs), not O(entries).
        self._per_epoch: Counter[int] = Counter()
        self.dropped = 0
        self.purged = 0
        # What the entries themselves occupy in memory, kept as they come and go.
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[LogEntry]:
        """Return every entry held, oldest first."""
        return [LogEntry._make(e) for e in self._entries]

    @property
    def oldest(self) -> float | None:
        """Return the time of the oldest entry held, or None when the log is empty."""
        return self._entries[0][0] if self._entries else None

    @property
    def keys_held(self) -> int:
        """Return how many keys are still held (current plus old ones with entries)."""
        return sum(1 for e in self._epochs if e.key is not None)

    @property
    def epoch(self) -> int:
        """Return the current key epoch number."""
        return self._epochs[-1].number

    def needs_rotation(self, now: float) -> bool:
        """Return whether the current key has lived one retention period."""
        return now - self._epochs[-1].start >= self.retention

    def rotate(self, key: bytes, now: float) -> None:
        """Start a new key epoch."""
        if len(key) < 32:
            raise ValueError("the pseudonym key must be at least 256 bits")
        self._epochs.append(_Epoch(self._epochs[-1].number + 1, now, bytearray(key)))
        self._drop_unused_keys()

    def pseudonym(self, ip: str, epoch: _Epoch | None = None) -> bytes:
        """Return the keyed pseudonym of an IP under the current (or given) key."""
        ep = epoch or self._epochs[-1]
        assert ep.mac is not None
        mac = ep.mac.copy()
        mac.update(ip.encode("ascii"))
        return mac.digest()[:PSEUDONYM_BYTES]  # type: ignore[no-any-return]

    def record(
        self, ip: str, zone: str | None, op: str, devices: tuple[str, ...], now: float
    ) -> bytes:
        """Add an entry; return the pseudonym used."""
        pseudo = self.pseudonym(ip)
        self._append((now, self._epochs[-1].number, pseudo, zone, op, devices))
        return pseudo

    def _append(self, entry: Row) -> None:
        entries = self._entries
        entries.append(entry)
        self._per_epoch[entry[1]] += 1
        self.bytes += entry_bytes(entry)
        if len(entries) > self.max_entries:
            old = entries.popleft()
            self._per_epoch[old[1]] -= 1
            self.bytes -= entry_bytes(old)
            self.dropped += 1

    def purge(self, now: float) -> int:
        """Drop entries older than the retention period; return how many."""
        cutoff = now - self.retention
        n = 0
        entries = self._entries
        per_epoch = self._per_epoch
        while entries and entries[0][0] <= cutoff:
            old = entries.popleft()
            per_epoch[old[1]] -= 1
            self.bytes -= entry_bytes(old)
            n += 1
        self.purged += n
        self._drop_unused_keys()
        return n

    def _drop_unused_keys(self) -> None:
        if len(self._epochs) == 1:
            return
        per_epoch = self._per_epoch
        current = self._epochs[-1].number
        for ep in self._epochs:
            if ep.number != current and per_epoch[ep.number] <= 0:
                ep.destroy()
                per_epoch.pop(ep.number, None)
        self._epochs = [ep for ep in self._epochs if ep.key is not None]

    def _matching(self, ip: str) -> dict[int, bytes]:
        return {ep.number: self.pseudonym(ip, ep) for ep in self._epochs if ep.key is not None}

    def export(self, ip: str) -> list[dict[str, Any]]:
        """Return every entry still held for this IP."""
        wanted = self._matching(ip)
        return [LogEntry._make(e).to_export() for e in self._entries if wanted.get(e[1]) == e[2]]

    def erase(self, ip: str) -> int:
        """Delete every entry held for this IP; return how many."""
        wanted = self._matching(ip)
        kept = deque(e for e in self._entries if wanted.get(e[1]) != e[2])
        n = len(self._entries) - len(kept)
        self._entries = kept
        self._per_epoch = Counter(e[1] for e in kept)
        self.bytes = sum(entry_bytes(e) for e in kept)
        self._drop_unused_keys()
        return n

    def record_action(self, op: str, count: int, now: float) -> None:
        """Log an admin action with its count and no IP."""
        self._append((now, self._epochs[-1].number, b"", None, op, (str(count),)))
