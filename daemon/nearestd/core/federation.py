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
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from nearest_wire import PAPER_CLASSES
from nearestd.core.devices import Record
from nearestd.core.model import Capabilities, Device, DeviceKind, DeviceState

RECORD_VERSION = 1
SOURCE = "mqtt"
ONLINE = b"online"
OFFLINE = b"offline"
MAX_ID = 256
MAX_TEXT = 256
MAX_URI = 1024
MAX_REASONS = 16
MAX_FOREIGN = 10000
MAX_RECORD = 64 * 1024
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
                level = device_topic_id(rec.device.id)
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


@dataclass(slots=True)
class Federation:
    """The foreign records seen, their origins' status, and which of them are served."""

    instance: str
    max_devices: int = MAX_FOREIGN
    records: dict[str, Device] = field(default_factory=dict)
    status: dict[str, bool] = field(default_factory=dict)
    refused: int = 0
    _unconfirmed: set[str] = field(default_factory=set)
    _unconfirmed_status: set[str] = field(default_factory=set)

    def _served(self, device: Device) -> bool:
        return self.status.get(device.origin or "", False)

    def on_record(self, topic_level: str, payload: bytes) -> list[Change]:
        """Take a (retained) record or its clearing; return the table changes it causes."""
        self._unconfirmed.discard(topic_level)
        old = self.records.get(topic_level)
        if not payload:
            if old is None:
                return []
            del self.records[topic_level]
            return [Change(old.id, old.origin or "")] if self._served(old) else []
        try:
            device = parse_record(payload, topic_level)
        except RecordError:
            self.refused += 1
            raise
        if device.origin == self.instance:
            # Our own record (or one from our previous life): never foreign.
            if old is not None:
                del self.records[topic_level]
                return [Change(old.id, old.origin or "")] if self._served(old) else []
            return []
        if old is None and len(self.records) >= self.max_devices:
            self.refused += 1
            raise RecordError(f"more than {self.max_devices} federated devices")
        self.records[topic_level] = device
        changes = []
        if old is not None and old.origin != device.origin and self._served(old):
            changes.append(Change(old.id, old.origin or ""))
        if self._served(device):
            changes.append(Change(device.id, device.origin or "", device))
        return changes

    def on_status(self, origin: str, payload: bytes) -> list[Change]:
        """Take an origin's status; its devices are served only while it is online."""
        self._unconfirmed_status.discard(origin)
        if origin == self.instance:
            return []
        online = payload == ONLINE
        if payload not in (ONLINE, OFFLINE, b""):
            return []
        was = self.status.get(origin, False)
        if online:
            self.status[origin] = True
        else:
            self.status.pop(origin, None)
        if was == online:
            return []
        mine = [d for d in self.records.values() if d.origin == origin]
        if online:
            return [Change(d.id, origin, d) for d in mine]
        return [Change(d.id, origin) for d in mine]

    def begin_resync(self) -> None:
        """Start a reconnection: what the broker does not replay by ``end_resync`` is gone."""
        self._unconfirmed = set(self.records)
        self._unconfirmed_status = set(self.status)

    def end_resync(self) -> list[Change]:
        """Forget records and statuses cleared while we were away; return the removals."""
        origins, keys = self._unconfirmed_status, self._unconfirmed
        self._unconfirmed, self._unconfirmed_status = set(), set()
        changes: list[Change] = []
        for origin in sorted(origins):
            changes += self.on_status(origin, OFFLINE)
        for key in sorted(keys):
            changes += self.on_record(key, b"")
        return changes

    def served(self) -> list[Device]:
        """Return every foreign device that should be in the table now."""
        return [d for d in self.records.values() if self._served(d)]

    def origins_online(self) -> list[str]:
        """Return the other instances currently online."""
        return sorted(o for o, up in self.status.items() if up)
