"""The MQTT inventory and federation between daemons, without I/O.

Each daemon publishes one retained JSON record per device it knows on
``P/devices/<device_id>`` and its status (``online``/``offline``) on
``P/status/<instance>``. With federation, a daemon reads the others' records back
and serves them as devices of ``source="mqtt"``, tagged with their origin and placed
where the origin placed them. A record is served only while its origin's status is
``online``: a status of ``offline`` (the will, or a clean shutdown) or a cleared
record makes its devices leave. Records that carry this daemon's own instance are
never read back as foreign.

Records are attacker-controlled input, like mDNS TXT records: ``parse_record``
checks every field's type, length and range and builds a fresh ``Device``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote

from nearest_wire import PAPER_CLASSES
from nearestd.core.devices import FEDERATED, Record
from nearestd.core.model import Capabilities, Device, DeviceKind, DeviceState

RECORD_VERSION = 1
SOURCE = FEDERATED
ONLINE = b"online"
OFFLINE = b"offline"
MAX_ID = 256
MAX_TEXT = 256
MAX_URI = 1024
MAX_REASONS = 16
MAX_FOREIGN = 10000
MAX_RECORD = 64 * 1024
UNLOCATED = "_"
# An origin whose heartbeats stop for this many of its own intervals is treated as cut off.
SILENCE_FACTOR = 3.0
MIN_HEARTBEAT, MAX_HEARTBEAT = 0.1, 3600.0
URI_SCHEMES = ("ipp://", "ipps://", "http://", "https://", "socket://", "lpd://")
_SAFE = "-._~"
_TOPIC_WORD = re.compile(r"^[^/+#\x00]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class RecordError(ValueError):
    """A device record that cannot be served; the message names the field."""


def device_topic_id(device_id: str) -> str:
    """Return a device id as one topic level: percent-encoded outside [A-Za-z0-9._~-]."""
    return quote(device_id, safe=_SAFE)


def topic_device_id(level: str) -> str:
    """Return the device id a topic level encodes."""
    return unquote(level)


def name_error(value: str, what: str) -> str | None:
    """Return why a prefix or instance name cannot be used in topics, or None."""
    if what == "instance":
        if not _TOPIC_WORD.match(value):
            return "expected 1-128 characters without '/', '+', '#' or NUL"
        return None
    if not value or value.startswith("/") or value.endswith("/") or value.startswith("$"):
        return "expected a non-empty topic prefix without a leading or trailing '/' or '$'"
    if any(c in value for c in "+#\x00"):
        return "a topic prefix may not hold '+', '#' or NUL"
    return None


# ---- publishing our own records ----------------------------------------------------------
def device_record(rec: Record, instance: str) -> dict[str, Any]:
    """Return the retained record of one of this daemon's devices."""
    d = rec.device
    p = rec.placement
    out: dict[str, Any] = {
        "v": RECORD_VERSION,
        "id": d.id,
        "origin": instance,
        "kind": str(d.kind),
        "name": d.name,
        "uri": d.uri,
        "make_model": d.make_model,
        "capabilities": d.capabilities.to_wire(),
        "state": str(d.state),
        "accepting_jobs": d.accepting_jobs,
        "stale": d.stale,
        "is_queue": d.is_queue,
        "source": d.source,
        "placement": None,
    }
    if d.state_reasons:
        out["state_reasons"] = list(d.state_reasons[:MAX_REASONS])
    if p is not None:
        out["placement"] = {
            "site": p.site,
            "building": p.building,
            "level": p.level,
            "zone": p.zone,
            "lon": round(p.lon, 7),
            "lat": round(p.lat, 7),
            "method": str(p.method),
        }
    return out


def encode_record(record: dict[str, Any]) -> bytes:
    """Return the canonical JSON bytes of a record (stable, so changes can be diffed)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def is_local(device: Device) -> bool:
    """Return whether this daemon publishes a device (federated ones are not republished)."""
    return device.source != SOURCE


def record_origin(payload: bytes) -> str | None:
    """Return the origin instance a record names, or None if it names none."""
    if len(payload) > MAX_RECORD:
        return None
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    origin = obj.get("origin") if isinstance(obj, dict) else None
    return origin if isinstance(origin, str) else None


@dataclass(slots=True)
class Inventory:
    """What this daemon has published as retained records: topic level -> payload."""

    published: dict[str, bytes] = field(default_factory=dict)
    # Encoding every record on every change would cost O(devices): reuse unchanged ones.
    _encoded: dict[str, tuple[Record, str, bytes]] = field(default_factory=dict)

    def diff(
        self, records: Iterable[Record], instance: str
    ) -> tuple[list[tuple[str, bytes]], list[str]]:
        """Return (records to publish, topic levels to clear) to match ``records``."""
        want: dict[str, bytes] = {}
        cache: dict[str, tuple[Record, str, bytes]] = {}
        for rec in records:
            if not is_local(rec.device):
                continue
            hit = self._encoded.get(rec.device.id)
            if hit is not None and hit[0] is rec:
                level, payload = hit[1], hit[2]
            else:
                site = rec.placement.site if rec.placement is not None else None
                level = record_topic(site, rec.device.id)
                payload = encode_record(device_record(rec, instance))
            cache[rec.device.id] = (rec, level, payload)
            want[level] = payload
        self._encoded = cache
        changed = [(k, v) for k, v in want.items() if self.published.get(k) != v]
        gone = [k for k in self.published if k not in want]
        return changed, gone

    def mark(self, published: Iterable[tuple[str, bytes]], cleared: Iterable[str]) -> None:
        """Record what was published and cleared."""
        for key, payload in published:
            self.published[key] = payload
        for key in cleared:
            self.published.pop(key, None)


# ---- reading the others' records ---------------------------------------------------------
def _text(obj: dict[str, Any], key: str, limit: int, required: bool = True, where: str = "") -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise RecordError(f"{where}{key}: expected a non-empty string")
    if len(value) > limit:
        raise RecordError(f"{where}{key}: longer than {limit} characters")
    if _CONTROL.search(value):
        raise RecordError(f"{where}{key}: control characters are not accepted")
    return value


def _flag(obj: dict[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise RecordError(f"{key}: expected true or false")
    return value


def _capabilities(value: Any) -> Capabilities:
    if value is None:
        return Capabilities()
    if not isinstance(value, dict):
        raise RecordError("capabilities: expected an object")
    flags = {}
    for key in ("color", "duplex", "adf", "secure"):
        flags[key] = _flag(value, key, False)
    paper = value.get("paper_max")
    if paper is not None and paper not in PAPER_CLASSES:
        raise RecordError(f"capabilities.paper_max: expected one of {', '.join(PAPER_CLASSES)}")
    return Capabilities(paper_max=paper, **flags)


def _number(obj: dict[str, Any], key: str, low: float, high: float) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"placement.{key}: expected a number")
    if not math.isfinite(value) or not low <= value <= high:
        raise RecordError(f"placement.{key}: expected a number from {low} to {high}")
    return float(value)


def _placement(value: Any) -> tuple[str, str, int, str | None, float, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecordError("placement: expected an object or null")
    site = _text(value, "site", MAX_TEXT, where="placement.")
    building = _text(value, "building", MAX_TEXT, where="placement.")
    level = value.get("level")
    if isinstance(level, bool) or not isinstance(level, int) or not -100 <= level <= 300:
        raise RecordError("placement.level: expected an integer from -100 to 300")
    zone = _text(value, "zone", MAX_TEXT, required=False, where="placement.") or None
    lon = _number(value, "lon", -180.0, 180.0)
    lat = _number(value, "lat", -90.0, 90.0)
    return (site, building, level, zone, lon, lat)


def parse_record(payload: bytes, topic_level: str) -> Device:
    """Build the federated device a foreign record describes, or raise RecordError."""
    if len(payload) > MAX_RECORD:
        raise RecordError(f"record of {len(payload)} bytes; at most {MAX_RECORD}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordError("not a JSON object") from None
    if not isinstance(obj, dict):
        raise RecordError("not a JSON object")
    if obj.get("v") != RECORD_VERSION:
        raise RecordError(f"v: expected {RECORD_VERSION}")
    device_id = _text(obj, "id", MAX_ID)
    if device_topic_id(device_id) != topic_level:
        raise RecordError("id: does not match the record's topic")
    origin = _text(obj, "origin", 128)
    if name_error(origin, "instance"):
        raise RecordError("origin: not a valid instance name")
    kind = obj.get("kind")
    if kind not in ("printer", "scanner"):
        raise RecordError("kind: expected 'printer' or 'scanner'")
    uri = _text(obj, "uri", MAX_URI)
    if not uri.lower().startswith(URI_SCHEMES):
        raise RecordError(f"uri: expected a scheme among {', '.join(URI_SCHEMES)}")
    state = obj.get("state", "unknown")
    if state not in DeviceState.__members__.values():
        raise RecordError("state: not a known device state")
    reasons = obj.get("state_reasons", [])
    if not isinstance(reasons, list) or len(reasons) > MAX_REASONS:
        raise RecordError(f"state_reasons: expected a list of at most {MAX_REASONS} strings")
    for r in reasons:
        if not isinstance(r, str) or len(r) > 128 or _CONTROL.search(r):
            raise RecordError("state_reasons: expected short printable strings")
    return Device(
        id=device_id,
        kind=DeviceKind(kind),
        name=_text(obj, "name", MAX_TEXT),
        uri=uri,
        make_model=_text(obj, "make_model", MAX_TEXT, required=False),
        capabilities=_capabilities(obj.get("capabilities")),
        source=SOURCE,
        state=DeviceState(state),
        state_reasons=tuple(reasons),
        accepting_jobs=_flag(obj, "accepting_jobs", True),
        stale=_flag(obj, "stale", False),
        origin=origin,
        is_queue=_flag(obj, "is_queue", False),
        origin_placement=_placement(obj.get("placement")),
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One change to apply to the device table: upsert ``device`` or remove ``device_id``."""

    device_id: str
    origin: str
    device: Device | None = None


def site_level(site: str | None) -> str:
    """Return a site as one topic level: ``_`` for no site, else percent-encoded (``_`` too)."""
    if site is None:
        return UNLOCATED
    # quote() never escapes "_": escape it by hand, so no site's level is the unlocated "_".
    return quote(site, safe="-.~").replace("_", "%5F")


def record_topic(site: str | None, device_id: str) -> str:
    """Return a device record's topic below ``P/devices/``: ``<site>/<device id>``."""
    return f"{site_level(site)}/{device_topic_id(device_id)}"


def split_key(key: str) -> tuple[str | None, str]:
    """Return (site level or None for the one-level legacy layout, device id level)."""
    site, sep, rest = key.partition("/")
    if not sep:
        return None, key
    return site, rest


def interest(prefix: str, sites: Iterable[str] | None) -> list[str]:
    """Return the device-record subscriptions for a daemon serving ``sites`` (None: all).

    The one-level legacy layout ``P/devices/<id>`` is read for one version, whatever the sites.
    """
    base = f"{prefix}/devices/"
    if sites is None:
        return [f"{base}+/+", f"{base}+"]
    return [f"{base}{site_level(s)}/+" for s in sorted(set(sites))] + [
        f"{base}{UNLOCATED}/+",
        f"{base}+",
    ]


@dataclass(slots=True)
class Federation:
    """The foreign records seen, their origins' status, and which of them are served.

    Theory of operation. A record is served while its origin's status is ``online`` and
    every link to the broker (the daemon's own connection and any bridge that reports its
    state) is up. When the origin goes offline or a link goes down, its devices stay served,
    marked stale, for ``grace`` seconds, then leave the table; the records themselves are
    kept, so a link or an origin that comes back brings them back without a replay. An
    origin that sends heartbeats and then falls silent for ``SILENCE_FACTOR`` of its own
    interval counts as cut off too: that catches a path that fails without any broker
    saying so (a bridge that reconnects without a notification, a partitioned cluster).
    ``shown`` mirrors what the table holds (key -> stale?), so every event yields only the
    table changes it causes.
    """

    instance: str
    max_devices: int = MAX_FOREIGN
    grace: float = 0.0
    sites: frozenset[str] | None = None
    records: dict[str, Device] = field(default_factory=dict)
    status: dict[str, bool] = field(default_factory=dict)
    offline_since: dict[str, float] = field(default_factory=dict)
    down: dict[str, float] = field(default_factory=dict)
    shown: dict[str, bool] = field(default_factory=dict)
    heard: dict[str, tuple[float, float]] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)
    refused: int = 0
    legacy: int = 0
    other_site: int = 0
    expired: int = 0
    _deadline: float | None = None
    _by_origin: dict[str, set[str]] = field(default_factory=dict)
    _unconfirmed: set[str] = field(default_factory=set)
    _unconfirmed_status: set[str] = field(default_factory=set)

    # ---- what is served -----------------------------------------------------------------
    def _want(self, device: Device, now: float) -> bool | None:
        """Return None if not served, else whether it is served stale."""
        origin = device.origin or ""
        since: float | None = None
        if not self.status.get(origin, False):
            since = self.offline_since.get(origin)
            if since is None:
                return None
        elif origin in self.silent:
            at, limit = self.heard[origin]
            since = at + limit
        if self.down:
            first = min(self.down.values())
            since = first if since is None else min(since, first)
        if since is None:
            return False
        if now - since < self.grace:
            end = since + self.grace
            self._deadline = end if self._deadline is None else min(self._deadline, end)
            return True
        return None

    def _sync(self, key: str, now: float, changed: bool = False) -> list[Change]:
        device = self.records[key]
        want = self._want(device, now)
        had = self.shown.get(key)
        if want is None:
            if had is None:
                return []
            del self.shown[key]
            return [Change(device.id, device.origin or "")]
        if had == want and not changed:
            return []
        self.shown[key] = want
        shown = replace(device, stale=True) if want else device
        return [Change(device.id, device.origin or "", shown)]

    def _sync_all(self, now: float, origin: str | None = None) -> list[Change]:
        if origin is None:
            self._deadline = None  # recomputed below, over every record
            keys = list(self.records)
        else:
            # One origin's records only: with hundreds of origins falling silent or coming
            # back, a pass over every foreign record per origin would stall the loop. The
            # deadline is not reset: an early one just costs one full pass in ``tick``.
            keys = sorted(self._by_origin.get(origin, ()))
        changes: list[Change] = []
        for key in keys:
            changes += self._sync(key, now)
        return changes

    def _index(self, key: str, old: Device | None, new: Device | None) -> None:
        """Keep ``_by_origin`` in step with ``records`` for one key."""
        if old is not None and (new is None or old.origin != new.origin):
            keys = self._by_origin.get(old.origin or "")
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_origin[old.origin or ""]
        if new is not None and (old is None or old.origin != new.origin):
            self._by_origin.setdefault(new.origin or "", set()).add(key)

    # ---- events ---------------------------------------------------------------------------
    def on_record(self, key: str, payload: bytes, now: float) -> list[Change]:
        """Take a (retained) record or its clearing; return the table changes it causes."""
        self._unconfirmed.discard(key)
        site, id_level = split_key(key)
        old = self.records.get(key)
        if not payload:
            return self._forget(key)
        try:
            device = parse_record(payload, id_level)
            placed = device.origin_placement[0] if device.origin_placement else None
            if site is not None and site != site_level(placed):
                raise RecordError("placement.site: does not match the record's topic")
        except RecordError:
            self.refused += 1
            raise
        if site is None:
            self.legacy += 1
        if device.origin == self.instance:
            # Our own record (or one from our previous life): never foreign.
            return self._forget(key)
        if self.sites is not None and placed is not None and placed not in self.sites:
            self.other_site += 1
            return self._forget(key)
        if old is None and len(self.records) >= self.max_devices:
            self.refused += 1
            raise RecordError(f"more than {self.max_devices} federated devices")
        changes: list[Change] = []
        if old is not None and old.origin != device.origin and key in self.shown:
            changes += self._forget(key)
        previous = self.records.get(key)
        self.records[key] = device
        self._index(key, previous, device)
        return changes + self._sync(key, now, changed=old != device)

    def _forget(self, key: str) -> list[Change]:
        old = self.records.pop(key, None)
        self._index(key, old, None)
        if old is None or key not in self.shown:
            return []
        del self.shown[key]
        return [Change(old.id, old.origin or "")]

    def on_status(self, origin: str, payload: bytes, now: float) -> list[Change]:
        """Take an origin's status; its devices are served while it is online, then for grace."""
        self._unconfirmed_status.discard(origin)
        if origin == self.instance or payload not in (ONLINE, OFFLINE, b""):
            return []
        online = payload == ONLINE
        was = self.status.get(origin, False)
        if online:
            self.status[origin] = True
            self.offline_since.pop(origin, None)
        else:
            self.status.pop(origin, None)
            if was:
                self.offline_since[origin] = now
        if was == online:
            return []
        return self._sync_all(now, origin)

    def on_heartbeat(self, origin: str, payload: bytes, now: float) -> list[Change]:
        """Take an origin's heartbeat (its interval in seconds, as text); a silent one revives."""
        if origin == self.instance:
            return []
        try:
            interval = float(payload.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return []
        if not MIN_HEARTBEAT <= interval <= MAX_HEARTBEAT:
            return []
        self.heard[origin] = (now, SILENCE_FACTOR * interval)
        if origin in self.silent:
            self.silent.discard(origin)
            return self._sync_all(now, origin)
        return []

    def link_down(self, link: str, now: float) -> list[Change]:
        """A link to the origins went down (the broker, or a bridge): their devices turn stale."""
        if link in self.down:
            return []
        self.down[link] = now
        return self._sync_all(now)

    def link_up(self, link: str, now: float) -> list[Change]:
        """A link came back: what it kept serves again, fresh."""
        if self.down.pop(link, None) is None:
            return []
        return self._sync_all(now)

    def tick(self, now: float) -> list[Change]:
        """Mark origins that fell silent; drop what has been stale for longer than the grace."""
        changes: list[Change] = []
        for origin, (at, limit) in self.heard.items():
            if origin not in self.silent and now >= at + limit:
                self.silent.add(origin)
                changes += self._sync_all(now, origin)
        if self._deadline is None or now < self._deadline:
            return changes
        before = len(self.shown)
        changes += self._sync_all(now)
        self.expired += max(0, before - len(self.shown))
        return changes

    def next_wakeup(self) -> float | None:
        """Return when ``tick`` next has work, or None."""
        times = [at + limit for o, (at, limit) in self.heard.items() if o not in self.silent]
        if self._deadline is not None:
            times.append(self._deadline)
        return min(times, default=None)

    def begin_resync(self) -> None:
        """Start a reconnection: what the broker does not replay by ``end_resync`` is gone."""
        self._unconfirmed = set(self.records)
        self._unconfirmed_status = set(self.status)

    def end_resync(self, now: float) -> list[Change]:
        """Forget records and statuses cleared while we were away; return the table changes."""
        origins, keys = self._unconfirmed_status, self._unconfirmed
        self._unconfirmed, self._unconfirmed_status = set(), set()
        changes: list[Change] = []
        for origin in sorted(origins):
            changes += self.on_status(origin, OFFLINE, now)
        for key in sorted(keys):
            changes += self._forget(key)
        return changes

    def served(self) -> list[Device]:
        """Return every foreign device that the table holds now (fresh or stale)."""
        return [self.records[k] for k in self.shown]

    def stale_count(self) -> int:
        """Return how many served foreign devices are stale."""
        return sum(1 for stale in self.shown.values() if stale)

    def origins_online(self) -> list[str]:
        """Return the other instances currently online."""
        return sorted(o for o, up in self.status.items() if up)
