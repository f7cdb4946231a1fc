"""DNS-SD services in, devices out: TXT parsing, merging, endpoint choice, expiry.

Theory of operation. The mDNS adapter resolves each browsed service instance into a
:class:`ServiceRecord` (one DNS-SD instance of one base type, with its raw TXT strings)
and hands it to :class:`Merger`. The merger keeps every live record by its key
``(base type, lower-cased instance name)`` and partitions them into groups, one per
physical device and function: services that carry the same ``UUID`` belong together;
a service without one joins the group of a service with the same instance name and
host (the Bonjour "one name for every protocol" convention), else forms its own group
keyed by that name and host, so two printers that share an instance name on different
hosts stay apart. Printers and scanners are separate functions because a device
answers one kind of query: an MFP becomes one printer and one scanner that share a
UUID. CUPS-shared queues (``printer-type`` key or ``_cups`` subtype) never merge with
devices. Every change returns the devices to upsert or remove, recomputed only for the
groups it touched. Nothing here reads a clock: time comes in as ``now``.

TXT rules follow RFC 6763 section 6: keys are case-insensitive, the first occurrence
of a key wins, ``key`` (present, no value) differs from ``key=`` (empty value), values
are opaque bytes. Problems are returned as values, never raised: a broken record still
yields a device with what could be parsed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nearest_wire import PAPER_CLASSES
from nearestd.core.model import Capabilities, Device, DeviceKind, Endpoint

SOURCE = "mdns"
DOMAIN = ".local."

# Base types browsed for data, best first within each function.
PRINTER_TYPES = ("_ipps._tcp", "_ipp._tcp", "_pdl-datastream._tcp", "_printer._tcp")
SCANNER_TYPES = ("_uscans._tcp", "_uscan._tcp", "_scanner._tcp")
BASE_TYPES = tuple(t + DOMAIN for t in PRINTER_TYPES + SCANNER_TYPES)
# Subtypes are browsed as flags only: a subtype browser never sees TXT updates.
SUBTYPE_FLAGS = {
    f"_{sub}._sub.{base}{DOMAIN}": sub
    for sub in ("universal", "print", "cups")
    for base in ("_ipp._tcp", "_ipps._tcp")
}
SUBTYPES = tuple(SUBTYPE_FLAGS)

SCHEMES = {
    "_ipps._tcp": "ipps",
    "_ipp._tcp": "ipp",
    "_pdl-datastream._tcp": "socket",
    "_printer._tcp": "lpd",
    "_uscans._tcp": "https",
    "_uscan._tcp": "http",
}
ENDPOINT_NAMES = {
    "_ipps._tcp": "ipps",
    "_ipp._tcp": "ipp",
    "_pdl-datastream._tcp": "raw",
    "_printer._tcp": "lpd",
    "_uscans._tcp": "escl-https",
    "_uscan._tcp": "escl",
    "_scanner._tcp": "scanner",
}
SECURE_TYPES = frozenset(("_ipps._tcp", "_uscans._tcp"))
TEXT_MAX = 255
_UUID_SAFE = re.compile(r"[0-9a-z][0-9a-z-]{0,63}")
# Control characters, and the bidirectional controls that can make a name read as
# another (U+200E/F marks, U+202A-202E embeddings and overrides, U+2066-2069 isolates).
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL = CONTROL_CHARS
_HOSTNAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?")
# What a plain path segment of a TXT ``rp`` or ``rs`` may not hold: '%', '?', '#', '\\',
# control characters ('.' and '..' are refused separately).
_NOT_IN_SEGMENT = re.compile(r"[%?#\\\x00-\x1f\x7f-\x9f]")
_URI_SAFE = "-._~!$&'()*+,;=:@"
PATH_MAX = 255


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses a discovered device may have, besides never loopback and the like.

    Not the daemon's own; and, unless ``link_local_ok`` (the daemon has no routable
    address), not link-local. ``loopback_ok`` is for a daemon that browses nothing but
    loopback (a single-host demo or test): there every peer is on this host.
    """

    own: frozenset[str] = frozenset()
    link_local_ok: bool = False
    loopback_ok: bool = False


def address_refusal(addr: str, policy: AddressPolicy) -> str | None:
    """Return why a device may not have an address (loopback, own-address, ...), or None."""
    host = addr.partition("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "not-an-address"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if policy.loopback_ok else "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    if ip.is_link_local and not policy.link_local_ok:
        return "link-local"
    if str(ip) in policy.own:
        return "own-address"
    return None


def plain_path(text: str | None) -> str | None:
    """Return a TXT ``rp``/``rs`` as a URI path ("/a/b"), or None when it is not plain.

    Plain: segments of unreserved and sub-delimiter characters joined by single
    slashes, none of them '.' or '..', with at most one leading and one trailing
    slash; absent or empty is the root.
    """
    if not text:
        return "/"
    if len(text) > PATH_MAX:
        return None
    inner = text[1:] if text.startswith("/") else text
    inner = inner[:-1] if inner.endswith("/") else inner
    if not inner:
        return "/"
    segments = inner.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or _NOT_IN_SEGMENT.search(segment):
            return None
    return "/" + "/".join(urllib.parse.quote(seg, safe=_URI_SAFE) for seg in segments)


class Problem:
    """The kinds of TXT trouble counted and logged (once per service and kind)."""

    TRUNCATED = "truncated-txt"
    NO_KEY = "string-without-key"
    BAD_KEY = "non-ascii-key"
    DUPLICATE = "duplicate-key"
    NON_UTF8 = "non-utf8-value"
    BAD_PAPER = "bad-papermax"
    BAD_BOOL = "bad-boolean"
    BAD_PATH = "bad-path"


@dataclass(frozen=True, slots=True)
class Txt:
    """A parsed TXT record: lower-cased keys to raw values (None: present without '=')."""

    values: Mapping[str, bytes | None]
    problems: tuple[tuple[str, str], ...] = ()

    def has(self, key: str) -> bool:
        """Return whether a key is present, with or without a value."""
        return key in self.values

    def text(self, key: str) -> str | None:
        """Return a value as display-safe text, or None when absent or valueless."""
        raw = self.values.get(key)
        if raw is None:
            return None
        return clean_text(raw.decode("utf-8", "replace"))

    def raw_text(self, key: str) -> str | None:
        """Return a value decoded but not cleaned (to validate), or None."""
        raw = self.values.get(key)
        return None if raw is None else raw.decode("utf-8", "replace")

    def flag(self, key: str) -> bool | None:
        """Return a T/F value (case-insensitive), or None when absent or neither."""
        raw = self.values.get(key)
        if raw is None:
            return None
        low = raw.strip().lower()
        if low in (b"t", b"true"):
            return True
        if low in (b"f", b"false"):
            return False
        return None


def split_txt(wire: bytes) -> tuple[list[bytes], list[tuple[str, str]]]:
    """Split a TXT record's wire form into its length-prefixed strings."""
    out: list[bytes] = []
    problems: list[tuple[str, str]] = []
    i = 0
    while i < len(wire):
        n = wire[i]
        end = i + 1 + n
        if end > len(wire):
            problems.append((Problem.TRUNCATED, f"string at byte {i} claims {n} bytes"))
            out.append(wire[i + 1 :])
            break
        out.append(wire[i + 1 : end])
        i = end
    return out, problems


def parse_txt(strings: Iterable[bytes]) -> Txt:
    """Parse TXT strings by RFC 6763 section 6; problems are returned, never raised."""
    values: dict[str, bytes | None] = {}
    problems: list[tuple[str, str]] = []
    for s in strings:
        if not s:
            continue  # the empty TXT record is a single empty string
        raw_key, eq, value = s.partition(b"=")
        if not raw_key:
            problems.append((Problem.NO_KEY, "a string starts with '='"))
            continue
        try:
            key = raw_key.decode("ascii").lower()
        except UnicodeDecodeError:
            problems.append((Problem.BAD_KEY, f"key {raw_key[:32]!r}"))
            continue
        if not key.isprintable():
            problems.append((Problem.BAD_KEY, f"key {raw_key[:32]!r}"))
            continue
        if key in values:
            problems.append((Problem.DUPLICATE, f"key {key!r}: the first occurrence counts"))
            continue
        val: bytes | None = value if eq else None
        if val is not None:
            try:
                val.decode("utf-8")
            except UnicodeDecodeError:
                problems.append((Problem.NON_UTF8, f"key {key!r}"))
        values[key] = val
    return Txt(values, tuple(problems))


def clean_text(text: str, limit: int = TEXT_MAX) -> str:
    """Return untrusted text without control characters, trimmed and bounded."""
    return _CONTROL.sub(" ", text).strip()[:limit]


def base_type(type_: str) -> str:
    """Return ``_ipp._tcp`` for ``_ipp._tcp.local.`` (and for its subtypes)."""
    t = type_.lower()
    if t.endswith(DOMAIN):
        t = t[: -len(DOMAIN)]
    if "._sub." in t:
        t = t.split("._sub.", 1)[1]
    return t


def instance_of(name: str, type_: str) -> str:
    """Return the instance label of a full service name (labels may contain dots)."""
    suffix = "." + base_type(type_) + DOMAIN
    if name.lower().endswith(suffix):
        return name[: -len(suffix)]
    return name.split(".", 1)[0]


def normalise_uuid(text: str | None) -> str | None:
    """Return a UUID in lower case without ``urn:uuid:``, or None when empty."""
    if not text:
        return None
    u = text.strip().lower()
    if u.startswith("urn:uuid:"):
        u = u[9:]
    return u or None


def host_of(server: str | None) -> str | None:
    """Return an SRV target without its trailing dot, in lower case."""
    if not server:
        return None
    return server.rstrip(".").lower() or None


ServiceKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """One resolved DNS-SD service instance of a base type."""

    type: str
    name: str
    host: str | None
    port: int
    addresses: tuple[str, ...] = ()
    txt: tuple[bytes, ...] = ()
    txt_problems: tuple[tuple[str, str], ...] = ()
    flags: frozenset[str] = frozenset()
    priority: int = 50
    interface: str = ""

    @property
    def base(self) -> str:
        """Return the base type without the domain."""
        return base_type(self.type)

    @property
    def instance(self) -> str:
        """Return the instance label."""
        return instance_of(self.name, self.type)

    @property
    def key(self) -> ServiceKey:
        """Return the identity of this service: interface, base type, lower-cased name."""
        return (self.interface, self.base, self.name.lower())


@dataclass(frozen=True, slots=True)
class Parsed:
    """A service record with its TXT parsed and its role decided."""

    record: ServiceRecord
    txt: Txt
    kind: DeviceKind | None
    is_queue: bool
    uuid: str | None
    placeholder: bool
    problems: tuple[tuple[str, str], ...]

    @property
    def name_key(self) -> tuple[str, str, str]:
        """Return (instance, host, interface), the fallback merge key: names are per link."""
        return (self.record.instance.casefold(), self.record.host or "", self.record.interface)


def kind_of(base: str) -> DeviceKind | None:
    """Return the function a base type serves."""
    if base in PRINTER_TYPES:
        return DeviceKind.PRINTER
    if base in SCANNER_TYPES:
        return DeviceKind.SCANNER
    return None


def analyse(record: ServiceRecord) -> Parsed:
    """Parse a service's TXT and decide what it contributes."""
    txt = parse_txt(record.txt)
    problems = list(record.txt_problems) + list(txt.problems)
    base = record.base
    kind = kind_of(base)
    is_queue = kind is DeviceKind.PRINTER and (txt.has("printer-type") or "cups" in record.flags)
    # Port 0 on _printer._tcp only defends the name (Bonjour printing spec); _scanner._tcp
    # is a hint that a device scans, not a protocol a client can use.
    placeholder = record.port == 0 or base == "_scanner._tcp"
    paper = txt.text("papermax")
    if paper is not None and paper not in PAPER_CLASSES:
        problems.append((Problem.BAD_PAPER, f"PaperMax {paper[:32]!r}"))
    for key in ("color", "duplex"):
        if txt.values.get(key) is not None and txt.flag(key) is None:
            problems.append((Problem.BAD_BOOL, f"key {key!r}: expected T or F"))
    path_key = _path_key(base)
    if path_key is not None and plain_path(txt.raw_text(path_key)) is None:
        shown = ascii((txt.raw_text(path_key) or "")[:64])
        problems.append((Problem.BAD_PATH, f"key {path_key!r}: not a plain path: {shown}"))
    return Parsed(
        record=record,
        txt=txt,
        kind=kind,
        is_queue=is_queue,
        uuid=normalise_uuid(txt.text("uuid")),
        placeholder=placeholder,
        problems=tuple(problems),
    )


# ---- endpoints and URIs ----------------------------------------------------------------


def address_rank(addr: str) -> tuple[int, int]:
    """Order addresses: IPv4 routable, IPv4 link-local, IPv6 global, IPv6 link-local."""
    host, _, _ = addr.partition("%")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (9, 0)
    if ip.version == 4:
        return (1 if ip.is_link_local else 0, 0)
    if ip.is_link_local:
        return (3, 0)
    return (2, 0)


def order_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """Return addresses best first, keeping the given order within one rank."""
    seen: dict[str, None] = {}
    for a in addresses:
        seen.setdefault(a, None)
    return tuple(sorted(seen, key=address_rank))


def _usable(addr: str) -> bool:
    """Return False for an IPv6 link-local address without its zone: no one can connect."""
    if "%" in addr or ":" not in addr:
        return True
    try:
        return not ipaddress.ip_address(addr).is_link_local
    except ValueError:
        return False


def host_literal(addr: str) -> str:
    """Return an address as a URI host: IPv6 bracketed, a zone as ``%25zone`` (RFC 6874)."""
    if ":" not in addr:
        return addr
    host, pct, zone = addr.partition("%")
    return f"[{host}%25{zone}]" if pct else f"[{host}]"


def _path_key(base: str) -> str | None:
    """Return the TXT key that gives a base type's request path (None: no path)."""
    if base in ("_uscan._tcp", "_uscans._tcp"):
        return "rs"
    if base == "_pdl-datastream._tcp" or base not in SCHEMES:
        return None
    return "rp"


def service_uris(p: Parsed) -> list[str]:
    """Return a service's URIs: address literals first (no .local needed), then the host."""
    base = p.record.base
    scheme = SCHEMES.get(base)
    if scheme is None:
        return []
    path: str | None
    if base in ("_uscan._tcp", "_uscans._tcp"):
        # sane-airscan: absent rs means /eSCL/, an empty one means the root.
        rs = p.txt.raw_text("rs")
        path = "/eSCL/" if rs is None and not p.txt.has("rs") else plain_path(rs)
        if path is not None and not path.endswith("/"):
            path += "/"
    elif base == "_pdl-datastream._tcp":
        path = ""  # rp means nothing for raw sockets (Bonjour printing 9.2.2)
    else:
        path = plain_path(p.txt.raw_text("rp"))
    if path is None:
        return []  # a path with '..', '?', '%', ...: no request goes there
    port = p.record.port
    hosts = [host_literal(a) for a in order_addresses(p.record.addresses) if _usable(a)]
    # Only an mDNS host name: "localhost" or a DNS name would send clients elsewhere.
    if p.record.host and _HOSTNAME.fullmatch(p.record.host) and p.record.host.endswith(".local"):
        hosts.append(p.record.host)
    return [f"{scheme}://{h}:{port}{path}" for h in hosts]


def _priority(p: Parsed) -> int:
    raw = p.txt.text("priority")
    try:
        return int(raw) if raw is not None else 50
    except ValueError:
        return 50


# ---- merging ---------------------------------------------------------------------------

GroupKey = tuple[str, ...]


def device_id(kind: DeviceKind, group: GroupKey) -> str:
    """Return a stable device id: from the UUID when it is safe, else a hash."""
    prefix = f"mdns-{kind}-queue" if group[1] == "q" else f"mdns-{kind}"
    if group[0] == "u" and _UUID_SAFE.fullmatch(group[2]):
        return f"{prefix}-{group[2]}"
    digest = hashlib.sha256("\x00".join(group).encode("utf-8", "replace")).hexdigest()[:20]
    return f"{prefix}-{digest}"


def build_device(kind: DeviceKind, group: GroupKey, members: list[Parsed]) -> Device | None:
    """Return the device a group of services describes, or None when none is usable."""
    usable = [m for m in members if not m.placeholder]
    if not usable:
        return None
    order = PRINTER_TYPES if kind is DeviceKind.PRINTER else SCANNER_TYPES
    usable.sort(key=lambda m: (order.index(m.record.base), _priority(m), m.record.name.lower()))
    best = usable[0]
    endpoints: dict[str, Endpoint] = {}
    for m in usable:
        for uri in service_uris(m):
            endpoints.setdefault(uri, Endpoint(ENDPOINT_NAMES[m.record.base], uri, m.record.port))
    if not endpoints:
        return None  # nothing a client could connect to (yet)
    everyone = sorted(members, key=lambda m: (m.placeholder, order.index(m.record.base)))

    def first_text(key: str) -> str | None:
        for m in everyone:
            value = m.txt.text(key)
            if value:
                return value
        return None

    def any_flag(key: str) -> bool:
        return any(m.txt.flag(key) is True for m in everyone)

    paper = first_text("papermax")
    if paper not in PAPER_CLASSES:
        paper = None
    if kind is DeviceKind.SCANNER:
        sources = {s.strip().lower() for s in (first_text("is") or "").split(",")}
        spaces = {s.strip().lower() for s in (first_text("cs") or "").split(",")}
        caps = Capabilities(
            color="color" in spaces or any_flag("color"),
            duplex=any_flag("duplex"),
            paper_max=paper,
            adf="adf" in sources,
            secure=any(m.record.base in SECURE_TYPES for m in usable),
        )
    else:
        caps = Capabilities(
            color=any_flag("color"),
            duplex=any_flag("duplex"),
            paper_max=paper,
            secure=any(m.record.base in SECURE_TYPES for m in usable),
        )
    make_model = first_text("ty") or ""
    if not make_model:
        product = first_text("product") or ""
        if product.startswith("(") and product.endswith(")"):
            make_model = product[1:-1].strip()
    addresses = order_addresses(a for m in everyone for a in m.record.addresses)
    flags = sorted({f for m in everyone for f in m.record.flags})
    return Device(
        id=device_id(kind, group),
        kind=kind,
        name=clean_text(best.record.instance) or best.record.host or "unnamed",
        uri=next(iter(endpoints)),
        make_model=make_model,
        capabilities=caps,
        source=SOURCE,
        uuid=group[2] if group[0] == "u" else best.uuid,
        instance=best.record.instance,
        host=best.record.host,
        addresses=addresses,
        note=first_text("note"),
        endpoints=tuple(endpoints.values()),
        is_queue=any(m.is_queue for m in everyone),
        extra=(
            ("flags", tuple(flags)),
            ("services", len(members)),
            # Republished by unicast DNS-SD (core/dnssd.py) as the device said them.
            ("pdl", first_text("pdl")),
            ("urf", first_text("urf")),
            ("adminurl", first_text("adminurl")),
        ),
    )


@dataclass(slots=True)
class Change:
    """What the table must do: upsert ``device``, or remove ``device_id`` when it is None."""

    device_id: str
    device: Device | None


@dataclass(slots=True)
class Merger:
    """Live services by key, grouped into devices; bounded by ``max_devices``."""

    max_devices: int = 5000
    # Devices one source (the address a device is announced at) may have at most.
    max_per_source: int = 256
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    services: dict[ServiceKey, Parsed] = field(default_factory=dict)
    flags: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    heard: dict[ServiceKey, float] = field(default_factory=dict)
    refused: int = 0
    # Services refused or trimmed for what they announced, by reason: each (service,
    # reason) counted once.
    refused_by: Counter[str] = field(default_factory=Counter)
    _refusals: dict[tuple[ServiceKey, str], None] = field(default_factory=dict)
    _group_of: dict[ServiceKey, tuple[DeviceKind, GroupKey]] = field(default_factory=dict)
    _groups: dict[tuple[DeviceKind, GroupKey], set[ServiceKey]] = field(default_factory=dict)
    _by_name: dict[tuple[Any, ...], set[ServiceKey]] = field(default_factory=dict)
    _devices: dict[tuple[DeviceKind, GroupKey], Device] = field(default_factory=dict)
    _probed: dict[ServiceKey, float] = field(default_factory=dict)
    _by_full_name: dict[tuple[str, str], set[ServiceKey]] = field(default_factory=dict)
    _by_host: dict[tuple[str, str], set[ServiceKey]] = field(default_factory=dict)
    _expired: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    # Says whether a service claims a pinned identity from the wrong place. Such a service
    # is grouped on its own, so it can neither merge into (and withhold or hijack) the
    # real device that shares its UUID or name, nor be served: the table quarantines it.
    suspect: Callable[[Parsed], bool] | None = None
    # Says whether a service matches a site-map pin: such a device is always admitted.
    pinned: Callable[[Parsed], bool] | None = None
    # UUID claims refused because another host holds the UUID, by service: the reason.
    _conflicts: dict[ServiceKey, str] = field(default_factory=dict)
    # Devices by source, and each device group's source, for ``max_per_source``.
    _per_source: Counter[str] = field(default_factory=Counter)
    _source_of: dict[tuple[DeviceKind, GroupKey], str] = field(default_factory=dict)
    # Device groups seen before (bounded): a known device comes back even when full.
    _known: dict[tuple[DeviceKind, GroupKey], None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._devices)

    def devices(self) -> list[Device]:
        """Return every device the live services make."""
        return list(self._devices.values())

    def set_flag(self, interface: str, name: str, flag: str, present: bool) -> list[Change]:
        """Note a subtype flag (``universal``, ``print``, ``cups``) for a service name."""
        fkey = (interface, name.lower())
        if present and fkey not in self.flags and len(self.flags) >= 4 * self.max_devices:
            return []  # bounded: a flood of subtype names must not grow memory
        current = self.flags.setdefault(fkey, set())
        if (flag in current) == present:
            if not current:
                del self.flags[fkey]
            return []
        if present:
            current.add(flag)
        else:
            current.discard(flag)
            if not current:
                del self.flags[fkey]
        changes: list[Change] = []
        for key in list(self._by_full_name.get(fkey, ())):
            rec = self.services[key].record
            changes += self.upsert(replace(rec, flags=frozenset(self.flags.get(fkey, ()))))[0]
        return changes

    # ---- liveness ------------------------------------------------------------------------
    def hear(self, interface: str, record_name: str, now: float) -> tuple[str, str] | None:
        """Note that a record (of a service or a host) was heard.

        Return (type, name) of a service this expired that speaks again: its records,
        unchanged in python-zeroconf's cache, raise no browser event, so it must be
        resolved anew.
        """
        low = (interface, record_name.lower())
        keys = self._by_full_name.get(low)
        if keys is None:
            keys = self._by_host.get((interface, low[1].rstrip(".")))
        if keys is None:
            return self._expired.pop(low, None)
        for k in keys:
            self.heard[k] = now
        return None

    def due_probes(self, now: float, interval: float) -> list[tuple[str, str, str]]:
        """Return (interface, type, name) of services silent for ``interval``, not yet asked."""
        out = []
        for key, p in self.services.items():
            if now - self.heard.get(key, now) >= interval and (
                now - self._probed.get(key, -1e18) >= interval
            ):
                self._probed[key] = now
                out.append((p.record.interface, p.record.type, p.record.name))
        return out

    def device_heard(self) -> dict[str, float]:
        """Return when each device was last heard: its most recently heard service."""
        out: dict[str, float] = {}
        for g, keys in self._groups.items():
            dev = self._devices.get(g)
            if dev is not None:
                out[dev.id] = max((self.heard.get(k, 0.0) for k in keys), default=0.0)
        return out

    def expire(self, now: float, expire_after: float) -> list[Change]:
        """Forget services not heard for ``expire_after``; return the device changes."""
        changes: list[Change] = []
        for key in [k for k, t in self.heard.items() if expired(t, now, expire_after)]:
            p = self.services.get(key)
            if p is not None:
                rec = p.record
                changes += self.remove(rec.interface, rec.type, rec.name)
                if len(self._expired) >= 4 * self.max_devices:
                    self._expired.pop(next(iter(self._expired)))
                self._expired[(rec.interface, rec.name.lower())] = (rec.type, rec.name)
        return changes

    def upsert(
        self, record: ServiceRecord, now: float | None = None
    ) -> tuple[list[Change], Parsed | None]:
        """Add or replace a service; return the device changes and the parsed service."""
        flags = frozenset(self.flags.get((record.interface, record.name.lower()), ()))
        if not flags <= record.flags:
            record = replace(record, flags=record.flags | flags)
        key = record.key
        old = self.services.get(key)
        if record.addresses:
            kept = []
            for addr in record.addresses:
                why = address_refusal(addr, self.policy)
                if why is None:
                    kept.append(addr)
                else:
                    self._refusal(key, f"address-{why}")
            if not kept:
                # Every address is one no device may have: never placed, served or polled.
                return (self.remove(*key_parts(old)) if old is not None else []), None
            if len(kept) != len(record.addresses):
                record = replace(record, addresses=tuple(kept))
        parsed = analyse(record)
        if parsed.kind is None:
            return [], None
        conflict = self._uuid_conflict(key, parsed)
        was_conflict = key in self._conflicts
        if old is None:
            full = self._would_overflow(parsed, conflict is not None)
            if full is not None:
                self.refused += 1
                self._refusal(key, full)
                return [], None
        if conflict is None:
            self._conflicts.pop(key, None)
        else:
            if key not in self._conflicts:
                self._refusal(key, "uuid-conflict")
            self._conflicts[key] = conflict
        if now is not None:
            self.heard[key] = now
        self._expired.pop((record.interface, record.name.lower()), None)
        if old is not None and old.record == record and was_conflict == (conflict is not None):
            return [], parsed
        affected = self._detach(key)
        self.services[key] = parsed
        self._by_full_name.setdefault((record.interface, record.name.lower()), set()).add(key)
        if record.host:
            self._by_host.setdefault((record.interface, record.host), set()).add(key)
        self._by_name.setdefault(self._name_index(parsed), set()).add(key)
        affected |= self._siblings(parsed)
        affected.add(key)
        return self._regroup(affected), parsed

    def remove(self, interface: str, type_: str, name: str) -> list[Change]:
        """Forget a service (goodbye or expiry); return the device changes."""
        key = (interface, base_type(type_), name.lower())
        if key not in self.services:
            return []
        affected = self._detach(key)
        del self.services[key]
        self.heard.pop(key, None)
        self._probed.pop(key, None)
        self._conflicts.pop(key, None)
        return self._regroup(affected)

    def drop_links(self, keep: set[str]) -> list[Change]:
        """Forget every service seen on a link not in ``keep``; return the device changes."""
        changes: list[Change] = []
        for key, p in list(self.services.items()):
            if key[0] not in keep:
                changes += self.remove(key[0], p.record.type, p.record.name)
        self.flags = {k: v for k, v in self.flags.items() if k[0] in keep}
        self._expired = {k: v for k, v in self._expired.items() if k[0] in keep}
        return changes

    def clear(self) -> list[Change]:
        """Forget everything; return the removals."""
        changes = [Change(d.id, None) for d in self._devices.values()]
        for table in (
            self.services,
            self._group_of,
            self._groups,
            self._by_name,
            self._devices,
            self.heard,
            self._probed,
            self._by_full_name,
            self._by_host,
            self._expired,
            self._conflicts,
            self._per_source,
            self._source_of,
        ):
            table.clear()
        return changes

    # ---- internals -----------------------------------------------------------------------
    def _refusal(self, key: ServiceKey, reason: str) -> None:
        """Count a refusal once per service and reason (bounded memory)."""
        mark = (key, reason)
        if mark in self._refusals:
            return
        if len(self._refusals) >= 4 * self.max_devices:
            self._refusals.pop(next(iter(self._refusals)))
        self._refusals[mark] = None
        self.refused_by[reason] += 1

    def _would_overflow(self, parsed: Parsed, conflict: bool = False) -> str | None:
        """Return why a new service may not make a new device ('table-full', ...), or None.

        Joining an existing device is always allowed, and so is a device seen before or
        one a site-map pin names: a flood can neither evict nor lock out known devices.
        """
        g: tuple[DeviceKind, GroupKey]
        if conflict:
            rec = parsed.record
            q = "q" if parsed.is_queue else "d"
            assert parsed.kind is not None
            g = (parsed.kind, ("c", q, rec.interface, rec.host or "", rec.instance.casefold()))
        else:
            g = self._group_key(parsed)
        if g in self._groups or g in self._known:
            return None
        if self.pinned is not None and self.pinned(parsed) and not conflict:
            return None
        if len(self._devices) >= self.max_devices:
            return "table-full"
        if self._per_source[source_of(parsed)] >= self.max_per_source:
            return "source-cap"
        return None

    def _uuid_conflict(self, key: ServiceKey, p: Parsed) -> str | None:
        """Return why a service may not have its UUID (another host holds it), or None.

        A UUID belongs to the host of the live services that first showed it: their mDNS
        host names and addresses. A service with the UUID from another host name and
        none of those addresses is a rogue claim, never merged.
        """
        if not p.uuid or (self.suspect is not None and self.suspect(p)):
            return None
        owners = [
            m
            for kind in (DeviceKind.PRINTER, DeviceKind.SCANNER)
            for q in ("d", "q")
            for k in self._groups.get((kind, ("u", q, p.uuid)), ())
            if k != key and (m := self.services.get(k)) is not None
        ]
        if not owners:
            return None
        rec = p.record
        hosts = {m.record.host for m in owners if m.record.host}
        addrs = {a for m in owners for a in m.record.addresses}
        if (rec.host and rec.host in hosts) or addrs.intersection(rec.addresses):
            return None
        held = ", ".join(sorted(hosts)[:2] + sorted(addrs)[:2]) or "another host"
        shown = ", ".join(rec.addresses[:4]) or clean_text(rec.host or "", 64) or "no address"
        return f"claims the uuid {p.uuid[:64]} held by {clean_text(held, 200)} from {shown}"

    @staticmethod
    def _name_index(p: Parsed) -> tuple[Any, ...]:
        return (p.kind, p.is_queue, *p.name_key)

    def _siblings(self, p: Parsed) -> set[ServiceKey]:
        return set(self._by_name.get(self._name_index(p), ()))

    @staticmethod
    def _unindex(index: dict[Any, set[ServiceKey]], at: Any, key: ServiceKey) -> set[ServiceKey]:
        keys = index.get(at, set())
        keys.discard(key)
        if not keys:
            index.pop(at, None)
        return keys

    def _detach(self, key: ServiceKey) -> set[ServiceKey]:
        """Take a service out of its indexes; return it and the services near it."""
        old = self.services.get(key)
        if old is None:
            return set()
        rec = old.record
        self._unindex(self._by_full_name, (rec.interface, rec.name.lower()), key)
        if rec.host:
            self._unindex(self._by_host, (rec.interface, rec.host), key)
        sibs = set(self._unindex(self._by_name, self._name_index(old), key))
        affected = {key} | sibs
        g = self._group_of.get(key)
        if g is not None:
            affected |= self._groups.get(g, set())
        return affected

    def _group_key(self, p: Parsed) -> tuple[DeviceKind, GroupKey]:
        assert p.kind is not None
        q = "q" if p.is_queue else "d"
        if self.suspect is not None and self.suspect(p):
            rec = p.record
            return (p.kind, ("r", q, rec.interface, rec.host or "", rec.instance.casefold()))
        if p.record.key in self._conflicts:
            rec = p.record
            return (p.kind, ("c", q, rec.interface, rec.host or "", rec.instance.casefold()))
        if p.uuid:
            return (p.kind, ("u", q, p.uuid))
        uuids = sorted(s.uuid for k in self._siblings(p) if (s := self.services.get(k)) and s.uuid)
        if uuids:
            return (p.kind, ("u", q, uuids[0]))
        return (p.kind, ("n", q, *p.name_key))

    def _regroup(self, affected: set[ServiceKey]) -> list[Change]:
        touched: set[tuple[DeviceKind, GroupKey]] = set()
        for key in affected:
            g = self._group_of.pop(key, None)
            if g is not None:
                touched.add(g)
                members = self._groups.get(g)
                if members is not None:
                    members.discard(key)
                    if not members:
                        del self._groups[g]
        for key in affected:
            p = self.services.get(key)
            if p is None:
                continue
            g = self._group_key(p)
            self._group_of[key] = g
            self._groups.setdefault(g, set()).add(key)
            touched.add(g)
        changes: list[Change] = []
        for g in sorted(touched, key=repr):
            parsed = [self.services[k] for k in sorted(self._groups.get(g, ()))]
            kind, gkey = g
            dev = build_device(kind, gkey, parsed) if parsed else None
            if dev is not None and gkey[0] == "c":
                reason = next((self._conflicts[m.record.key] for m in parsed), "")
                dev = replace(dev, extra=(*dev.extra, ("conflict", reason)))
            old = self._devices.get(g)
            if dev is None:
                if old is not None:
                    del self._devices[g]
                    changes.append(Change(old.id, None))
                    src = self._source_of.pop(g, None)
                    if src is not None:
                        self._per_source[src] -= 1
                        if self._per_source[src] <= 0:
                            del self._per_source[src]
                continue
            if old is None:
                src = source_of(parsed[0])
                self._source_of[g] = src
                self._per_source[src] += 1
                self._known[g] = None
                if len(self._known) > 4 * self.max_devices:
                    self._known.pop(next(iter(self._known)))
            if old != dev:
                self._devices[g] = dev
                changes.append(Change(dev.id, dev))
        return changes


def source_of(p: Parsed) -> str:
    """Return where a service is announced from, for the per-source cap: its best address."""
    addresses = order_addresses(p.record.addresses)
    if addresses:
        return addresses[0].partition("%")[0]
    return "host:" + (p.record.host or p.record.instance.casefold())


def key_parts(p: Parsed) -> tuple[str, str, str]:
    """Return (interface, type, name) of a parsed service, as ``Merger.remove`` takes them."""
    return (p.record.interface, p.record.type, p.record.name)


def expired(last_heard: float, now: float, expire_after: float) -> bool:
    """Return whether a device not heard since ``last_heard`` should leave."""
    return now - last_heard >= expire_after
