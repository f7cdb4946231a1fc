"""The warm-restart inventory snapshot: discovered devices to JSON and back.

Only device data is written (what printers and scanners say about themselves),
never anything about clients. Decoding validates every field and rejects the whole
snapshot on the first problem: a snapshot is a cache, so a doubtful one is dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from nearest_wire import PAPER_CLASSES
from nearestd.core.model import Capabilities, Device, DeviceKind, DeviceState, Endpoint

FORMAT = "nearestd-inventory"
VERSION = 1
MAX_DEVICES = 50_000
MAX_STR = 4096
MAX_ITEMS = 64
MAX_BYTES = 64 * 1024 * 1024
_SCALARS = (str, int, float, bool, type(None))


class InventoryError(ValueError):
    """A snapshot that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Saved:
    """A device as restored from a snapshot, with when it was last heard of."""

    device: Device
    last_seen: float


def device_to_json(device: Device) -> dict[str, Any]:
    """Return a device as a JSON-compatible map (the ``extra`` items that are scalars only)."""
    caps = device.capabilities
    return {
        "id": device.id,
        "kind": str(device.kind),
        "name": device.name,
        "uri": device.uri,
        "make_model": device.make_model,
        "capabilities": {
            "color": caps.color,
            "duplex": caps.duplex,
            "paper_max": caps.paper_max,
            "adf": caps.adf,
            "secure": caps.secure,
        },
        "source": device.source,
        "state": str(device.state),
        "state_reasons": list(device.state_reasons),
        "accepting_jobs": device.accepting_jobs,
        "uuid": device.uuid,
        "instance": device.instance,
        "host": device.host,
        "addresses": list(device.addresses),
        "note": device.note,
        "location_text": device.location_text,
        "geo": list(device.geo) if device.geo is not None else None,
        "endpoints": [
            {"service": e.service, "uri": e.uri, "port": e.port} for e in device.endpoints
        ],
        "origin": device.origin,
        "is_queue": device.is_queue,
        "origin_placement": list(device.origin_placement) if device.origin_placement else None,
        "extra": [[k, v] for k, v in device.extra if isinstance(v, _SCALARS) and _finite(v)],
    }


def encode_inventory(saved: Iterable[Saved], written: float) -> bytes:
    """Return the snapshot file's bytes for these devices."""
    head = {"format": FORMAT, "version": VERSION, "written": written}
    out = bytearray(_dumps(head)[:-1].encode() + b',"devices":[')
    # One small dumps() per device rather than one big one: the writer runs in a thread,
    # and a single C-level dumps of thousands of devices would hold the GIL (and so the
    # event loop) for tens of milliseconds. orjson: about 5x the standard module's speed.
    # Each is appended at once: orjson's result keeps a buffer of 4 KiB or more, and a
    # list of them held about 15x the snapshot's size (15 MB for 1,700 devices).
    for i, s in enumerate(sorted(saved, key=lambda s: s.device.id)):
        if i:
            out += b","
        out += orjson.dumps({"last_seen": s.last_seen, "device": device_to_json(s.device)})
    out += b"]}"
    return bytes(out)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def decode_inventory(data: bytes) -> list[Saved]:
    """Return the devices of a snapshot, or raise InventoryError saying what is wrong."""
    if len(data) > MAX_BYTES:
        raise InventoryError(f"larger than {MAX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InventoryError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InventoryError(f"not a {FORMAT} snapshot")
    if doc.get("version") != VERSION:
        raise InventoryError(
            f"snapshot version {_shown(doc.get('version'))}, this daemon reads version {VERSION}"
        )
    devices = doc.get("devices")
    if not isinstance(devices, list):
        raise InventoryError("devices: expected a list")
    if len(devices) > MAX_DEVICES:
        raise InventoryError(f"devices: more than {MAX_DEVICES}")
    out: list[Saved] = []
    seen: set[str] = set()
    for i, item in enumerate(devices):
        where = f"devices[{i}]"
        if not isinstance(item, dict):
            raise InventoryError(f"{where}: expected a map")
        last_seen = _number(item.get("last_seen"), f"{where}.last_seen")
        device = device_from_json(item.get("device"), f"{where}.device")
        if device.id in seen:
            raise InventoryError(f"{where}.device.id: duplicate id {device.id!r}")
        seen.add(device.id)
        out.append(Saved(device, last_seen))
    return out


def device_from_json(obj: Any, where: str = "device") -> Device:
    """Return a device from its JSON map, or raise InventoryError naming the field."""
    if not isinstance(obj, dict):
        raise InventoryError(f"{where}: expected a map")
    r = _Reader(obj, where)
    caps_obj = obj.get("capabilities")
    if not isinstance(caps_obj, dict):
        raise InventoryError(f"{where}.capabilities: expected a map")
    c = _Reader(caps_obj, f"{where}.capabilities")
    paper = c.opt_text("paper_max")
    if paper is not None and paper not in PAPER_CLASSES:
        raise InventoryError(f"{where}.capabilities.paper_max: unknown value {_shown(paper)}")
    geo_obj = obj.get("geo")
    geo: tuple[float, float] | None = None
    if geo_obj is not None:
        if not isinstance(geo_obj, list) or len(geo_obj) != 2:
            raise InventoryError(f"{where}.geo: expected [lat, lon] or null")
        geo = (_number(geo_obj[0], f"{where}.geo[0]"), _number(geo_obj[1], f"{where}.geo[1]"))
    endpoints = []
    for i, e in enumerate(r.items("endpoints")):
        if not isinstance(e, dict):
            raise InventoryError(f"{where}.endpoints[{i}]: expected a map")
        er = _Reader(e, f"{where}.endpoints[{i}]")
        endpoints.append(Endpoint(er.text("service"), er.text("uri"), er.port("port")))
    origin_placement = _origin_placement(obj.get("origin_placement"), f"{where}.origin_placement")
    extra = []
    for i, pair in enumerate(r.items("extra")):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], _SCALARS)
            or (isinstance(pair[1], str) and len(pair[1]) > MAX_STR)
        ):
            raise InventoryError(f"{where}.extra[{i}]: expected [name, scalar]")
        extra.append((pair[0], pair[1]))
    try:
        kind = DeviceKind(r.text("kind"))
    except ValueError:
        raise InventoryError(f"{where}.kind: expected printer or scanner") from None
    try:
        state = DeviceState(r.text("state"))
    except ValueError:
        raise InventoryError(f"{where}.state: unknown state {_shown(obj.get('state'))}") from None
    device_id = r.text("id")
    if not device_id:
        raise InventoryError(f"{where}.id: empty")
    return Device(
        id=device_id,
        kind=kind,
        name=r.text("name"),
        uri=r.text("uri"),
        make_model=r.text("make_model"),
        capabilities=Capabilities(
            color=c.flag("color"),
            duplex=c.flag("duplex"),
            paper_max=paper,
            adf=c.flag("adf"),
            secure=c.flag("secure"),
        ),
        source=r.text("source"),
        state=state,
        state_reasons=tuple(r.texts("state_reasons")),
        accepting_jobs=r.flag("accepting_jobs"),
        uuid=r.opt_text("uuid"),
        instance=r.opt_text("instance"),
        host=r.opt_text("host"),
        addresses=tuple(r.texts("addresses")),
        note=r.opt_text("note"),
        location_text=r.opt_text("location_text"),
        geo=geo,
        endpoints=tuple(endpoints),
        origin=r.opt_text("origin"),
        is_queue=r.flag("is_queue"),
        origin_placement=origin_placement,
        extra=tuple(extra),
    )


def _origin_placement(v: Any, where: str) -> tuple[str, str, int, str | None, float, float] | None:
    """Return a federated device's (site, building, level, zone, lon, lat), or None."""
    if v is None:
        return None
    if (
        not isinstance(v, list)
        or len(v) != 6
        or not all(isinstance(t, str) and len(t) <= MAX_STR for t in v[:2])
        or isinstance(v[2], bool)
        or not isinstance(v[2], int)
        or not (v[3] is None or (isinstance(v[3], str) and len(v[3]) <= MAX_STR))
    ):
        raise InventoryError(f"{where}: expected [site, building, level, zone, lon, lat] or null")
    return (v[0], v[1], v[2], v[3], _number(v[4], f"{where}[4]"), _number(v[5], f"{where}[5]"))


def _finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InventoryError(f"{where}: expected a finite number")
    return float(v)


class _Reader:
    """Typed field access that names the field in its errors."""

    def __init__(self, obj: dict[str, Any], where: str) -> None:
        self.obj = obj
        self.where = where

    def _fail(self, key: str, what: str) -> InventoryError:
        return InventoryError(f"{self.where}.{key}: expected {what}")

    def text(self, key: str) -> str:
        v = self.obj.get(key)
        if not isinstance(v, str) or len(v) > MAX_STR:
            raise self._fail(key, f"a string of at most {MAX_STR} characters")
        return v

    def opt_text(self, key: str) -> str | None:
        return None if self.obj.get(key) is None else self.text(key)

    def flag(self, key: str) -> bool:
        v = self.obj.get(key)
        if not isinstance(v, bool):
            raise self._fail(key, "a boolean")
        return v

    def port(self, key: str) -> int:
        v = self.obj.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
            raise self._fail(key, "an integer from 0 to 65535")
        return v

    def items(self, key: str) -> list[Any]:
        v = self.obj.get(key)
        if not isinstance(v, list) or len(v) > MAX_ITEMS:
            raise self._fail(key, f"a list of at most {MAX_ITEMS} items")
        return v

    def texts(self, key: str) -> list[str]:
        items = self.items(key)
        if not all(isinstance(s, str) and len(s) <= MAX_STR for s in items):
            raise self._fail(key, "a list of strings")
        return items
