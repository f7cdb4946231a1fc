"""Requests of the wire protocol as frozen values that validate when parsed.

The same maps travel over TCP, Unix sockets and MQTT. ``parse_request`` turns a
decoded map into one of the request types or raises ``WireError`` naming the field.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from nearest_wire.errors import ErrorCode, WireError

T = TypeVar("T")

VERSION = 1
KINDS = ("printer", "scanner")
MAX_K = 20
# Any integer MessagePack carries: int64 and uint64.
MIN_ID = -(2**63)
MAX_ID = 2**64 - 1
# Bonjour PaperMax classes, smallest first; a device's class is its index here.
PAPER_CLASSES = ("<legal-A4", "legal-A4", "tabloid-A3", "isoC-A2", ">isoC-A2")
# What a request's need.paper asks for: the smallest acceptable PaperMax class.
PAPER_NEEDS = {
    "A4": "legal-A4",
    "letter": "legal-A4",
    "legal": "legal-A4",
    "A3": "tabloid-A3",
    "tabloid": "tabloid-A3",
    "A2": "isoC-A2",
}
NEED_FLAGS = ("color", "duplex", "adf", "secure")
PUBLIC_OPS = ("nearest", "locate", "devices", "ping")
ADMIN_OPS = ("privacy.export", "privacy.erase", "reload", "stats", "map")
MAX_ZONE_LEN = 128
# A devices reply holds at most this many records; ``limit`` asks for fewer.
DEFAULT_LIMIT = 200
MAX_LIMIT = 200
MAX_CURSOR_LEN = 512


@dataclass(frozen=True, slots=True)
class Need:
    """Capabilities a request asks for; ``paper`` is a PaperMax class or None."""

    color: bool = False
    duplex: bool = False
    adf: bool = False
    secure: bool = False
    paper: str | None = None
    any_state: bool = False

    def to_wire(self) -> dict[str, Any]:
        """Return the map form used in requests."""
        out: dict[str, Any] = {f: True for f in NEED_FLAGS if getattr(self, f)}
        if self.paper is not None:
            out["paper"] = next(k for k, v in PAPER_NEEDS.items() if v == self.paper)
        if self.any_state:
            out["state"] = "any"
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_common(req: Any) -> None:
    """Validate the fields every request has (h11 style: a request is valid once built)."""
    rid = req.id
    if not _is_int(rid) or not MIN_ID <= rid <= MAX_ID:
        raise _bad(f"id: expected an integer from {MIN_ID} to {MAX_ID}", None)


def _check_where(req: Any) -> None:
    """Validate and normalise ``client_ip`` and ``zone``."""
    if req.client_ip is not None:
        object.__setattr__(req, "client_ip", check_ip(req.client_ip, "client_ip", req.id))
    _check_str(req.zone, "zone", req.id)


def _check_str(value: object, key: str, rid: int | None, limit: int = MAX_ZONE_LEN) -> None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > limit):
        raise _bad(f"{key}: expected a non-empty string of at most {limit} bytes", rid)


def _wire(req: Any, *keys: str) -> dict[str, Any]:
    """Return a request's map: v, id, op, then each of ``keys`` that is set."""
    out: dict[str, Any] = {"v": VERSION, "id": req.id, "op": req.op}
    for key in keys:
        value = getattr(req, key)
        if value is not None:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class NearestRequest:
    """Ask for the k nearest devices of one kind that meet ``need``."""

    id: int
    kind: str
    k: int = 1
    need: Need = Need()
    client_ip: str | None = None
    zone: str | None = None
    op: str = "nearest"

    def __post_init__(self) -> None:
        _check_common(self)
        if not _is_int(self.k) or not 1 <= self.k <= MAX_K:
            raise _bad(f"k: expected an integer from 1 to {MAX_K}", self.id)
        _kind(self.kind, self.id, required=True)
        if not isinstance(self.need, Need):
            raise _bad(f"need: expected a map, got {_type_name(self.need)}", self.id)
        _check_where(self)

    def to_wire(self) -> dict[str, Any]:
        """Return the request map."""
        out = _wire(self, "kind", "k", "client_ip", "zone")
        need = self.need.to_wire()
        if need:
            out["need"] = need
        return out


@dataclass(frozen=True, slots=True)
class LocateRequest:
    """Ask where the daemon places the asker, or ``client_ip``."""

    id: int
    client_ip: str | None = None
    zone: str | None = None
    op: str = "locate"

    def __post_init__(self) -> None:
        _check_common(self)
        _check_where(self)

    def to_wire(self) -> dict[str, Any]:
        """Return the request map."""
        return _wire(self, "client_ip", "zone")


@dataclass(frozen=True, slots=True)
class DevicesRequest:
    """Ask for one page of the inventory (``limit`` records from ``cursor``), of a kind or site."""

    id: int
    kind: str | None = None
    site: str | None = None
    client_ip: str | None = None
    zone: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None
    op: str = "devices"

    def __post_init__(self) -> None:
        _check_common(self)
        _kind(self.kind, self.id, required=False)
        _check_str(self.site, "site", self.id)
        _check_where(self)
        if not _is_int(self.limit) or not 1 <= self.limit <= MAX_LIMIT:
            raise _bad(f"limit: expected an integer from 1 to {MAX_LIMIT}", self.id)
        _check_str(self.cursor, "cursor", self.id, MAX_CURSOR_LEN)

    def to_wire(self) -> dict[str, Any]:
        """Return the request map (``limit`` only when not the default)."""
        out = _wire(self, "kind", "site", "client_ip", "zone", "cursor")
        if self.limit != DEFAULT_LIMIT:
            out["limit"] = self.limit
        return out


@dataclass(frozen=True, slots=True)
class PingRequest:
    """Liveness check."""

    id: int
    op: str = "ping"

    def __post_init__(self) -> None:
        _check_common(self)

    def to_wire(self) -> dict[str, Any]:
        """Return the request map."""
        return _wire(self)


@dataclass(frozen=True, slots=True)
class ReloadRequest:
    """Admin: re-read the configuration and site maps."""

    id: int
    op: str = "reload"

    def __post_init__(self) -> None:
        _check_common(self)

    def to_wire(self) -> dict[str, Any]:
        """Return the request map."""
        return _wire(self)


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Admin: counters and sizes."""

    id: int
    op: str = "stats"

    def __post_init__(self) -> None:
        _check_common(self)

    def to_wire(self) -> dict[str, Any]:
        """Return the request map."""
        return _wire(self)


@dataclass(frozen=True, slots=True)
class PrivacyRequest:
    """Admin: export or erase the location-log entries of one IP."""

    id: int
    op: str
    ip: str

    def __post_init__(self) -> None:
        _check_common(self)
        if self.op not in ("privacy.export", "privacy.erase"):
            raise _bad("op: expected 'privacy.export' or 'privacy.erase'", self.id)
        object.__setattr__(self, "ip", check_ip(self.ip, "ip", self.id))

    def to_wire(self) -> dict[str, Any]:
        """Return the request map."""
        return _wire(self, "ip")


def _unchecked(cls: type[T], **values: Any) -> T:
    """Build a request from values the parser has already checked (h11's ``_parsed``)."""
    req = object.__new__(cls)
    for f in fields(cls):  # type: ignore[arg-type]
        object.__setattr__(req, f.name, values.get(f.name, f.default))
    return req


@dataclass(frozen=True, slots=True)
class MapRequest:
    """Admin: one floor drawn as SVG."""

    id: int
    site: str
    building: str
    level: int
    op: str = "map"

    def __post_init__(self) -> None:
        _check_common(self)
        if not _is_int(self.level) or not -1000 <= self.level <= 1000:
            raise _bad("level: expected an integer from -1000 to 1000", self.id)
        for key in ("site", "building"):
            value = getattr(self, key)
            if value is None:
                raise _bad(f"{key}: missing; expected a string", self.id)
            _check_str(value, key, self.id)

    def to_wire(self) -> dict[str, Any]:
        """Return the request map."""
        return _wire(self, "site", "building", "level")


Request = (
    NearestRequest
    | LocateRequest
    | DevicesRequest
    | PingRequest
    | ReloadRequest
    | StatsRequest
    | PrivacyRequest
    | MapRequest
)

_COMMON = {"v", "id", "op"}
_ALLOWED: dict[str, set[str]] = {
    "nearest": _COMMON | {"kind", "k", "need", "client_ip", "zone"},
    "locate": _COMMON | {"client_ip", "zone"},
    "devices": _COMMON | {"kind", "site", "client_ip", "zone", "limit", "cursor"},
    "ping": _COMMON,
    "reload": _COMMON,
    "stats": _COMMON,
    "privacy.export": _COMMON | {"ip"},
    "privacy.erase": _COMMON | {"ip"},
    "map": _COMMON | {"site", "building", "level"},
}
# Keys a transport may add around the request (MQTT 3.1.1 reply address).
TRANSPORT_KEYS = {"reply_to", "correlation"}


def _bad(msg: str, rid: int | None) -> WireError:
    return WireError(ErrorCode.BAD_REQUEST, msg, rid)


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def request_id(obj: dict[str, Any]) -> int | None:
    """Return the request's id if it is a valid one, for echoing in an error."""
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and MIN_ID <= rid <= MAX_ID:
        return rid
    return None


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def check_ip(value: object, field: str, rid: int | None) -> str:
    """Return a normalised IP address string or raise bad-request naming ``field``."""
    if not isinstance(value, str):
        raise _bad(f"{field}: expected an IP address string, got {_type_name(value)}", rid)
    if len(value) > 64:
        raise _bad(f"{field}: expected an IP address, got a string of {len(value)} bytes", rid)
    if ":" not in value:
        # Fast path for IPv4 (every query names one): inet_pton accepts exactly the
        # dotted quads ipaddress does (no leading zeros), which are already canonical.
        try:
            socket.inet_pton(socket.AF_INET, value)
        except (OSError, ValueError, UnicodeError):
            pass
        else:
            return value
    else:
        # Fast path for IPv6 without a zone index: glibc's inet_pton accepts exactly what
        # ipaddress does, and inet_ntop writes the same RFC 5952 text unless it embeds an
        # IPv4 address (mapped or compatible), which ipaddress prints otherwise. Both
        # claims are checked against ipaddress in tests/test_wire_fastpaths.py.
        try:
            packed = socket.inet_pton(socket.AF_INET6, value)
        except (OSError, ValueError, UnicodeError):
            pass
        else:
            text = socket.inet_ntop(socket.AF_INET6, packed)
            if "." not in text and packed[:12] != _MAPPED_PREFIX:
                return text
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise _bad(f"{field}: not an IPv4 or IPv6 address", rid) from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if addr.scope_id is not None:
            # A zone index (fe80::1%eth0) names a link of the asker, not part of the address.
            return str(ipaddress.IPv6Address(value.split("%", 1)[0]))
    return str(addr)


def _opt_str(
    obj: dict[str, Any], key: str, rid: int | None, limit: int = MAX_ZONE_LEN
) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(f"{key}: expected a non-empty string of at most {limit} bytes", rid)
    return value


def _kind(value: object, rid: int | None, required: bool) -> str | None:
    if value is None and not required:
        return None
    if value not in KINDS:
        shown = repr(value) if isinstance(value, str) else _type_name(value)
        raise _bad(f"kind: expected 'printer' or 'scanner', got {shown[:40]}", rid)
    return str(value)


# Every valid need is one of these few values, numbered by _need's fast path: a bit for
# each of NEED_FLAGS, one for any_state, then 1 + the PaperMax class index (0: no paper).
_FLAG_BITS = {flag: 1 << i for i, flag in enumerate(NEED_FLAGS)}
_ANY_STATE = 1 << len(NEED_FLAGS)
_PAPER_SHIFT = len(NEED_FLAGS) + 1
_PAPER_CODES = {
    paper: (1 + PAPER_CLASSES.index(cls)) << _PAPER_SHIFT for paper, cls in PAPER_NEEDS.items()
}
_NEEDS = {
    flags | paper | any_state: Need(
        paper=PAPER_CLASSES[(paper >> _PAPER_SHIFT) - 1] if paper else None,
        any_state=bool(any_state),
        **{f: bool(flags & bit) for f, bit in _FLAG_BITS.items()},
    )
    for flags in range(1 << len(NEED_FLAGS))
    for paper in (0, *_PAPER_CODES.values())
    for any_state in (0, _ANY_STATE)
}
_NO_NEED = _NEEDS[0]


def _need(value: object, rid: int | None) -> Need:
    """Return the need a request names: a shared value, built once at import."""
    if value is None:
        return _NO_NEED
    if type(value) is not dict:
        return _parse_need(value, rid)
    # Fast path: exact types only, so anything unusual and every error takes the full
    # check below, which also words the error.
    code = 0
    for key, val in value.items():
        if type(key) is not str:
            return _parse_need(value, rid)
        if val is True:
            bit = _FLAG_BITS.get(key)
            if bit is None:
                return _parse_need(value, rid)
            code |= bit
        elif val is False:
            if key not in _FLAG_BITS:
                return _parse_need(value, rid)
        elif key == "paper":
            if val is None:
                continue
            if type(val) is not str or val not in _PAPER_CODES:
                return _parse_need(value, rid)
            code |= _PAPER_CODES[val]
        elif key == "state" and type(val) is str and val in ("any", "available"):
            if val == "any":
                code |= _ANY_STATE
        else:
            return _parse_need(value, rid)
    return _NEEDS[code]


def _parse_need(value: object, rid: int | None) -> Need:
    """Validate a need map the plain way; every error about a need is worded here."""
    if not isinstance(value, dict):
        raise _bad(f"need: expected a map, got {_type_name(value)}", rid)
    flags: dict[str, bool] = {}
    paper: str | None = None
    any_state = False
    for key, val in value.items():
        if key in NEED_FLAGS:
            if not isinstance(val, bool):
                raise _bad(f"need.{key}: expected true or false, got {_type_name(val)}", rid)
            flags[key] = val
        elif key == "paper":
            if val is None:
                continue
            if not isinstance(val, str) or val not in PAPER_NEEDS:
                allowed = ", ".join(PAPER_NEEDS)
                raise _bad(f"need.paper: expected one of {allowed}", rid)
            paper = PAPER_NEEDS[val]
        elif key == "state":
            if val not in ("any", "available"):
                raise _bad("need.state: expected 'any' or 'available'", rid)
            any_state = val == "any"
        else:
            raise _bad(f"need.{str(key)[:40]}: unknown capability", rid)
    return Need(paper=paper, any_state=any_state, **flags)


# NearestRequest is built for every query, and its frozen __init__ sets each field
# through object.__setattr__. Setting the slots directly builds the same value faster.
_NEAREST_FIELDS = ("id", "kind", "k", "need", "client_ip", "zone", "op")
if tuple(f.name for f in fields(NearestRequest)) != _NEAREST_FIELDS:  # pragma: no cover
    raise ImportError("NearestRequest's fields changed: update _NEAREST_FIELDS")
_set_id, _set_kind, _set_k, _set_need, _set_client_ip, _set_zone, _set_op = (
    vars(NearestRequest)[name].__set__ for name in _NEAREST_FIELDS
)


def _nearest_request(
    rid: int, kind: str, k: int, need: Need, client_ip: str | None, zone: str | None
) -> NearestRequest:
    """Return ``NearestRequest(rid, kind, k, need, client_ip, zone)``."""
    req = object.__new__(NearestRequest)
    _set_id(req, rid)
    _set_kind(req, kind)
    _set_k(req, k)
    _set_need(req, need)
    _set_client_ip(req, client_ip)
    _set_zone(req, zone)
    _set_op(req, "nearest")
    return req


def parse_request(obj: dict[str, Any], *, extra_keys: frozenset[str] = frozenset()) -> Request:
    """Validate a decoded map and return the typed request, or raise WireError."""
    # Each check first accepts the usual value by its exact type; anything else goes
    # through the full check, which words the error. The order of the checks is the
    # order in which errors are reported.
    rid = obj.get("id")
    if type(rid) is not int or not MIN_ID <= rid <= MAX_ID:
        rid = request_id(obj)
        if "id" not in obj:
            raise _bad("id: missing; expected an integer", None)
        if rid is None:
            raise _bad(f"id: expected an integer from {MIN_ID} to {MAX_ID}", None)
    v = obj.get("v")
    if type(v) is not int or v != VERSION:
        if v is None:
            raise _bad("v: missing; expected 1", rid)
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad(f"v: expected the integer 1, got {_type_name(v)}", rid)
        if v != VERSION:
            raise WireError(
                ErrorCode.UNSUPPORTED_VERSION, f"v: version {v} is not supported; this is 1", rid
            )
    op = obj.get("op")
    if not isinstance(op, str):
        raise _bad(f"op: expected a string, got {_type_name(op)}", rid)
    allowed = _ALLOWED.get(op)
    if allowed is None:
        ops = ", ".join(PUBLIC_OPS + ADMIN_OPS)
        raise _bad(f"op: unknown operation {op[:40]!r}; expected one of {ops}", rid)
    if not obj.keys() <= allowed:
        for key in obj:
            if key not in allowed and key not in extra_keys:
                raise _bad(f"{str(key)[:40]}: unknown field for op {op!r}", rid)
    client_ip = obj.get("client_ip")
    if client_ip is not None:
        client_ip = check_ip(client_ip, "client_ip", rid)
    if op == "nearest":
        k = obj.get("k", 1)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise _bad(f"k: expected an integer from 1 to {MAX_K}", rid)
        kind = obj.get("kind")
        if type(kind) is not str or kind not in KINDS:
            kind = _kind(kind, rid, required=True)
            assert kind is not None
        need = _need(obj.get("need"), rid)
        zone = obj.get("zone")
        if zone is not None:
            zone = _opt_str(obj, "zone", rid)
        return _nearest_request(rid, kind, k, need, client_ip, zone)
    if op == "locate":
        return _unchecked(
            LocateRequest, id=rid, client_ip=client_ip, zone=_opt_str(obj, "zone", rid)
        )
    if op == "devices":
        kind = _kind(obj.get("kind"), rid, required=False)
        site = _opt_str(obj, "site", rid)
        zone = _opt_str(obj, "zone", rid)
        limit = obj.get("limit", DEFAULT_LIMIT)
        if not _is_int(limit) or not 1 <= limit <= MAX_LIMIT:
            raise _bad(f"limit: expected an integer from 1 to {MAX_LIMIT}", rid)
        cursor = _opt_str(obj, "cursor", rid, MAX_CURSOR_LEN)
        return _unchecked(
            DevicesRequest,
            id=rid,
            kind=kind,
            site=site,
            client_ip=client_ip,
            zone=zone,
            limit=limit,
            cursor=cursor,
        )
    if op == "ping":
        return _unchecked(PingRequest, id=rid)
    if op == "reload":
        return _unchecked(ReloadRequest, id=rid)
    if op == "stats":
        return _unchecked(StatsRequest, id=rid)
    if op == "map":
        level = obj.get("level")
        if not isinstance(level, int) or isinstance(level, bool) or not -1000 <= level <= 1000:
            raise _bad("level: expected an integer from -1000 to 1000", rid)
        site, building = _opt_str(obj, "site", rid), _opt_str(obj, "building", rid)
        if site is None or building is None:
            raise _bad(f"{'site' if site is None else 'building'}: missing; expected a string", rid)
        return _unchecked(MapRequest, id=rid, site=site, building=building, level=level)
    if "ip" not in obj:
        raise _bad("ip: missing; expected an IP address", rid)
    return _unchecked(PrivacyRequest, id=rid, op=op, ip=check_ip(obj["ip"], "ip", rid))
