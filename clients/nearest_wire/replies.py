"""Replies of the wire protocol as frozen values, each with ``to_wire`` and ``from_wire``.

The daemon builds every reply through these types, so the shape on the wire is written
once. The types a query's answer is built from (``Where``, ``Capabilities``, ``Supply``,
``DeviceView``, ``NearestReply``) are NamedTuples: built for every uncached answer, a
tuple costs a third of what a frozen dataclass's ``__init__`` does. Clients read
replies with ``parse_reply``, which checks each field it reads and names the one at fault (``devices[2].distance_m: expected a number, got str``). Keys a
newer daemon adds are ignored, so an old client keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from nearest_wire.errors import ErrorCode

VERSION = 1


class ReplyError(ValueError):
    """A reply that does not have the contract's shape; the message names the field."""


T = TypeVar("T")


def _typename(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def _get(obj: Mapping[str, Any], key: str, typ: type[T] | tuple[type, ...], path: str) -> T:
    """Return ``obj[key]`` if it has type ``typ``, else raise ReplyError naming the field."""
    if key not in obj:
        raise ReplyError(f"{path}{key}: missing")
    value = obj[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, (int, float))):
        raise ReplyError(f"{path}{key}: expected {_expected(typ)}, got {_typename(value)}")
    return value  # type: ignore[return-value]


def _opt(obj: Mapping[str, Any], key: str, typ: type[T] | tuple[type, ...], path: str) -> T | None:
    """Return ``obj[key]`` when present and not nil, checked like ``_get``."""
    if obj.get(key) is None:
        return None
    return _get(obj, key, typ, path)


def _expected(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "a map", list: "an array"}
    if typ == (int, float):
        return "a number"
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _map(obj: object, path: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise ReplyError(f"{path.rstrip('.') or 'reply'}: expected a map, got {_typename(obj)}")
    return obj


def _strs(obj: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    items = _opt(obj, key, list, path) or []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ReplyError(f"{path}{key}[{i}]: expected a string, got {_typename(item)}")
    return tuple(items)


class Where(NamedTuple):
    """Where the daemon places a client: site, building, level and zone."""

    site: str
    building: str
    level: int
    zone: str
    zone_name: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """Return the contract's ``where`` map."""
        return {
            "site": self.site,
            "building": self.building,
            "level": self.level,
            "zone": self.zone,
            "zone_name": self.zone_name,
        }

    @classmethod
    def from_wire(cls, obj: object, path: str = "where.") -> Where:
        """Read a ``where`` map, or raise ReplyError naming the field."""
        m = _map(obj, path)
        return cls(
            site=_get(m, "site", str, path),
            building=_get(m, "building", str, path),
            level=_get(m, "level", int, path),
            zone=_get(m, "zone", str, path),
            zone_name=_opt(m, "zone_name", str, path),
        )


class Capabilities(NamedTuple):
    """What a device states it can do; anything not stated is absent."""

    color: bool = False
    duplex: bool = False
    paper_max: str | None = None
    adf: bool = False
    secure: bool = False

    def to_wire(self) -> dict[str, Any]:
        """Return the ``capabilities`` map."""
        return {
            "color": self.color,
            "duplex": self.duplex,
            "paper_max": self.paper_max,
            "adf": self.adf,
            "secure": self.secure,
        }

    @classmethod
    def from_wire(cls, obj: object, path: str) -> Capabilities:
        """Read a ``capabilities`` map."""
        m = _map(obj, path)
        return cls(
            color=bool(_opt(m, "color", bool, path)),
            duplex=bool(_opt(m, "duplex", bool, path)),
            paper_max=_opt(m, "paper_max", str, path),
            adf=bool(_opt(m, "adf", bool, path)),
            secure=bool(_opt(m, "secure", bool, path)),
        )


class Supply(NamedTuple):
    """One supply a device reports; ``level`` in percent, None when the device does not know."""

    name: str
    type: str
    level: int | None

    def to_wire(self) -> dict[str, Any]:
        """Return the supply's map."""
        return {"name": self.name, "type": self.type, "level": self.level}

    @classmethod
    def from_wire(cls, obj: object, path: str) -> Supply:
        """Read a supply's map."""
        m = _map(obj, path)
        return cls(
            _get(m, "name", str, path), _get(m, "type", str, path), _opt(m, "level", int, path)
        )


@dataclass(frozen=True, slots=True)
class Inventory:
    """What ``devices`` adds to a device for operators: placement method, endpoints, source."""

    source: str
    placed_by: str | None
    located: bool
    position: tuple[float, float] | None
    endpoints: tuple[str, ...]
    is_queue: bool
    last_seen: float
    visible_to: tuple[str, ...] | None = None
    quarantined: str | None = None
    first_seen: float | None = None

    def update_wire(self, out: dict[str, Any]) -> None:
        """Add the inventory keys to a device's map."""
        pos = self.position
        out["source"] = self.source
        out["placed_by"] = self.placed_by
        out["located"] = self.located
        out["position"] = {"lon": pos[0], "lat": pos[1]} if pos is not None else None
        out["endpoints"] = list(self.endpoints)
        out["is_queue"] = self.is_queue
        out["last_seen"] = self.last_seen
        if self.visible_to is not None:
            out["visible_to"] = list(self.visible_to)
        if self.quarantined is not None:
            out["quarantined"] = self.quarantined
            out["first_seen"] = self.first_seen

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], path: str) -> Inventory:
        """Read the inventory keys of a device's map."""
        pos = _opt(m, "position", dict, path)
        position = None
        if pos is not None:
            position = (
                float(_get(pos, "lon", (int, float), f"{path}position.")),
                float(_get(pos, "lat", (int, float), f"{path}position.")),
            )
        first_seen = _opt(m, "first_seen", (int, float), path)
        return cls(
            source=_get(m, "source", str, path),
            placed_by=_opt(m, "placed_by", str, path),
            located=_get(m, "located", bool, path),
            position=position,
            endpoints=_strs(m, "endpoints", path),
            is_queue=bool(_opt(m, "is_queue", bool, path)),
            last_seen=float(_get(m, "last_seen", (int, float), path)),
            visible_to=_strs(m, "visible_to", path) if "visible_to" in m else None,
            quarantined=_opt(m, "quarantined", str, path),
            first_seen=None if first_seen is None else float(first_seen),
        )


class DeviceView(NamedTuple):
    """A device as the wire shows it; ``distance_m`` in ``nearest``, ``inventory`` in ``devices``."""

    id: str
    name: str
    kind: str
    uri: str
    make_model: str | None
    site: str | None
    building: str | None
    level: int | None
    zone: str | None
    capabilities: Capabilities
    state: str
    stale: bool = False
    state_reasons: tuple[str, ...] = ()
    accepting_jobs: bool = True
    supplies: tuple[Supply, ...] = ()
    distance_m: float | None = None
    origin: str | None = None
    inventory: Inventory | None = None

    def to_wire(self) -> dict[str, Any]:
        """Return the device's map; optional keys only when they say something."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "uri": self.uri,
            "make_model": self.make_model,
            "site": self.site,
            "building": self.building,
            "level": self.level,
            "zone": self.zone,
            "capabilities": self.capabilities.to_wire(),
            "state": self.state,
            "stale": self.stale,
        }
        if self.state_reasons:
            out["state_reasons"] = list(self.state_reasons)
        if not self.accepting_jobs:
            out["accepting_jobs"] = False
        if self.supplies:
            out["supplies"] = [s.to_wire() for s in self.supplies]
        if self.distance_m is not None:
            out["distance_m"] = self.distance_m
        if self.origin:
            out["origin"] = self.origin
        if self.inventory is not None:
            self.inventory.update_wire(out)
        return out

    @classmethod
    def from_wire(cls, obj: object, path: str = "device.") -> DeviceView:
        """Read a device's map, or raise ReplyError naming the field."""
        m = _map(obj, path)
        supplies = _opt(m, "supplies", list, path) or []
        distance = _opt(m, "distance_m", (int, float), path)
        accepting = _opt(m, "accepting_jobs", bool, path)
        return cls(
            id=_get(m, "id", str, path),
            name=_get(m, "name", str, path),
            kind=_get(m, "kind", str, path),
            uri=_get(m, "uri", str, path),
            make_model=_opt(m, "make_model", str, path),
            site=_opt(m, "site", str, path),
            building=_opt(m, "building", str, path),
            level=_opt(m, "level", int, path),
            zone=_opt(m, "zone", str, path),
            capabilities=Capabilities.from_wire(m.get("capabilities", {}), f"{path}capabilities."),
            state=_get(m, "state", str, path),
            stale=bool(_opt(m, "stale", bool, path)),
            state_reasons=_strs(m, "state_reasons", path),
            accepting_jobs=accepting is not False,
            supplies=tuple(
                Supply.from_wire(s, f"{path}supplies[{i}].") for i, s in enumerate(supplies)
            ),
            distance_m=None if distance is None else float(distance),
            origin=_opt(m, "origin", str, path),
            inventory=Inventory.from_wire(m, path) if "located" in m else None,
        )


def _devices(m: Mapping[str, Any]) -> tuple[DeviceView, ...]:
    items = _get(m, "devices", list, "")
    return tuple(DeviceView.from_wire(d, f"devices[{i}].") for i, d in enumerate(items))


class NearestReply(NamedTuple):
    """``nearest``: where the asker is and the k nearest matching devices, nearest first."""

    id: int
    where: Where
    devices: tuple[DeviceView, ...]

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {
            "v": VERSION,
            "id": self.id,
            "ok": True,
            "where": self.where.to_wire(),
            "devices": [d.to_wire() for d in self.devices],
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> NearestReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""), Where.from_wire(m.get("where")), _devices(m))


@dataclass(frozen=True, slots=True)
class LocateReply:
    """``locate``: where the daemon places the asker (or the named client)."""

    id: int
    where: Where

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {"v": VERSION, "id": self.id, "ok": True, "where": self.where.to_wire()}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> LocateReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""), Where.from_wire(m.get("where")))


@dataclass(frozen=True, slots=True)
class DevicesReply:
    """``devices``: one page of the inventory, and the cursor of the next one if any remain."""

    id: int
    devices: tuple[DeviceView, ...]
    next_cursor: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map (``next_cursor`` only when more remain)."""
        out: dict[str, Any] = {
            "v": VERSION,
            "id": self.id,
            "ok": True,
            "devices": [d.to_wire() for d in self.devices],
        }
        if self.next_cursor is not None:
            out["next_cursor"] = self.next_cursor
        return out

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> DevicesReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""), _devices(m), _opt(m, "next_cursor", str, ""))


@dataclass(frozen=True, slots=True)
class PingReply:
    """``ping``: the daemon's version."""

    id: int
    version: str

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {"v": VERSION, "id": self.id, "ok": True, "version": self.version}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> PingReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""), _get(m, "version", str, ""))


@dataclass(frozen=True, slots=True)
class ReloadReply:
    """``reload`` (admin): the new configuration is in use."""

    id: int

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {"v": VERSION, "id": self.id, "ok": True, "reloaded": True}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> ReloadReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""))


@dataclass(frozen=True, slots=True)
class StatsReply:
    """``stats`` (admin): counters and sizes, a map whose keys grow with the daemon."""

    id: int
    stats: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {"v": VERSION, "id": self.id, "ok": True, "stats": dict(self.stats)}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> StatsReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""), _get(m, "stats", dict, ""))


@dataclass(frozen=True, slots=True)
class MapReply:
    """``map`` (admin): one floor drawn as SVG."""

    id: int
    svg: str

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {"v": VERSION, "id": self.id, "ok": True, "svg": self.svg}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> MapReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""), _get(m, "svg", str, ""))


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One location-log entry of a subject-access export (``ts``: seconds since the epoch)."""

    ts: float
    zone: str | None
    op: str
    devices: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        """Return the entry's map."""
        return {"ts": self.ts, "zone": self.zone, "op": self.op, "devices": list(self.devices)}

    @classmethod
    def from_wire(cls, obj: object, path: str) -> ExportEntry:
        """Read an entry's map."""
        m = _map(obj, path)
        return cls(
            float(_get(m, "ts", (int, float), path)),
            _opt(m, "zone", str, path),
            _get(m, "op", str, path),
            _strs(m, "devices", path),
        )


@dataclass(frozen=True, slots=True)
class ExportReply:
    """``privacy.export`` (admin): every entry still held for one IP."""

    id: int
    entries: tuple[ExportEntry, ...]

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {
            "v": VERSION,
            "id": self.id,
            "ok": True,
            "entries": [e.to_wire() for e in self.entries],
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> ExportReply:
        """Read the reply map."""
        items = _get(m, "entries", list, "")
        return cls(
            _get(m, "id", int, ""),
            tuple(ExportEntry.from_wire(e, f"entries[{i}].") for i, e in enumerate(items)),
        )


@dataclass(frozen=True, slots=True)
class EraseReply:
    """``privacy.erase`` (admin): how many entries were deleted."""

    id: int
    erased: int

    def to_wire(self) -> dict[str, Any]:
        """Return the reply map."""
        return {"v": VERSION, "id": self.id, "ok": True, "erased": self.erased}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> EraseReply:
        """Read the reply map."""
        return cls(_get(m, "id", int, ""), _get(m, "erased", int, ""))


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The contract's failure: a code and a sentence naming the field at fault.

    ``id`` is None when the request had no valid id; ``problems`` lists a refused
    reload's problems.
    """

    id: int | None
    code: str
    message: str
    problems: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """Return the failure map."""
        out: dict[str, Any] = {
            "v": VERSION,
            "id": self.id,
            "ok": False,
            "error": {"code": str(self.code), "message": self.message},
        }
        if self.problems:
            out["problems"] = list(self.problems)
        return out

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> ErrorReply:
        """Read the failure map."""
        err = _get(m, "error", dict, "")
        rid = m.get("id")
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            raise ReplyError(f"id: expected an integer or nil, got {_typename(rid)}")
        return cls(
            rid,
            _get(err, "code", str, "error."),
            _get(err, "message", str, "error."),
            _strs(m, "problems", ""),
        )


Reply = (
    NearestReply
    | LocateReply
    | DevicesReply
    | PingReply
    | ReloadReply
    | StatsReply
    | ExportReply
    | EraseReply
    | MapReply
)
REPLY_TYPES: dict[str, type[Reply]] = {
    "nearest": NearestReply,
    "locate": LocateReply,
    "devices": DevicesReply,
    "ping": PingReply,
    "reload": ReloadReply,
    "stats": StatsReply,
    "privacy.export": ExportReply,
    "privacy.erase": EraseReply,
    "map": MapReply,
}


def parse_reply(obj: object, op: str) -> Reply | ErrorReply:
    """Read the reply to a request of ``op``: its success type, or ErrorReply."""
    m = _map(obj, "")
    ok = m.get("ok")
    if ok is False:
        return ErrorReply.from_wire(m)
    if ok is not True:
        raise ReplyError(f"ok: expected true or false, got {_typename(ok)}")
    return REPLY_TYPES[op].from_wire(m)


def error_reply(request_id: int | None, code: ErrorCode | str, message: str) -> dict[str, Any]:
    """Build the contract's failure map."""
    return ErrorReply(request_id, str(code), message).to_wire()
