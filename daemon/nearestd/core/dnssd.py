"""Unicast DNS-SD per location: which records answer a question, from the device table.

A pure function of the question (labels, type, class), the querier's zone, the site map,
the device table and the ranking: the adapter parses and builds DNS messages, this module
decides the rcode and the records (RFC 6763 11-12, RFC 8766 5-6, the contract's
"Zero-install discovery"). Names are tuples of raw labels (bytes); comparisons ignore
ASCII case, as DNS does, and owner names echo the question's own spelling.

Under ``<zone-label>.D`` each service type lists the devices ``nearest`` answers for a
client in that zone, ``per_type`` of them, keeping those that have such an endpoint; so the
SRV targets and ports are the hosts and ports of those devices' URIs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from nearest_wire import Need
from nearestd.core.devices import DeviceTable, Record
from nearestd.core.model import Device, DeviceKind, Zone
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import SiteMap

Name = tuple[bytes, ...]

# RR types and classes (RFC 1035, 3596, 2782, 5936, 1995, 6891).
A, NS, SOA, PTR, HINFO, TXT, AAAA, SRV, OPT, IXFR, AXFR, ANY = (
    1, 2, 6, 12, 13, 16, 28, 33, 41, 251, 252, 255,
)  # fmt: skip
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

BROWSE = (b"b", b"db", b"lb")
REGISTER = (b"r", b"dr")
DNSSD_UDP = (b"_dns-sd", b"_udp")
IN_ADDR = (b"in-addr", b"arpa")
IP6 = (b"ip6", b"arpa")
UNIVERSAL = b"_universal"


class ServiceType(NamedTuple):
    """A service type the daemon publishes: its labels, device kind and endpoint."""

    labels: Name
    kind: DeviceKind
    endpoint: str
    scheme: str
    default_port: int
    subtypes: tuple[bytes, ...]


SERVICE_TYPES: tuple[ServiceType, ...] = (
    ServiceType((b"_ipp", b"_tcp"), DeviceKind.PRINTER, "ipp", "ipp", 631, (UNIVERSAL,)),
    ServiceType((b"_ipps", b"_tcp"), DeviceKind.PRINTER, "ipps", "ipps", 631, (UNIVERSAL,)),
    ServiceType((b"_uscan", b"_tcp"), DeviceKind.SCANNER, "escl", "http", 80, ()),
    ServiceType((b"_uscans", b"_tcp"), DeviceKind.SCANNER, "escl-https", "https", 443, ()),
)
_TYPE_BY_LABEL = {st.labels[0]: st for st in SERVICE_TYPES}
# Instance labels leave room for " (NNN)" within DNS's 63 bytes.
INSTANCE_MAX = 56
TXT_STRING_MAX = 255
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_ZONE_LABEL_BAD = re.compile(r"[^a-z0-9-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RR(NamedTuple):
    """One resource record: owner labels, type, TTL and type-specific data.

    Data: PTR and NS a Name; SRV (priority, weight, port, target Name); TXT a tuple of
    byte strings; A and AAAA an address text; SOA (mname, rname, serial, refresh, retry,
    expire, minimum); HINFO (cpu, os) bytes.
    """

    name: Name
    rtype: int
    ttl: int
    data: Any


class Scene(NamedTuple):
    """What an answer is drawn from: the device table, the site map and the ranking."""

    table: DeviceTable
    sitemap: SiteMap
    ranking: Ranking


@dataclass(frozen=True, slots=True)
class Reply:
    """The decision for one question: rcode, sections, and what the location log notes."""

    rcode: int
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    authoritative: bool = True
    zone: str | None = None
    devices: tuple[str, ...] = ()
    # The (zone id, service type label) lists the answer was built from: while they are
    # unchanged the answer stands, whatever else changed in the table.
    depends: tuple[tuple[str, bytes], ...] = ()


REFUSE = Reply(REFUSED, authoritative=False)


class Instance(NamedTuple):
    """One published service instance."""

    device_id: str
    label: bytes
    port: int
    target: Name
    address: str | None
    txt: tuple[bytes, ...]


def lower(name: Iterable[bytes]) -> Name:
    """Return a name with ASCII letters folded to lower case."""
    return tuple(label.lower() for label in name)


def zone_labels(zone_ids: Iterable[str]) -> dict[str, bytes]:
    """Return a unique DNS label per zone id: lower-case letters, digits and hyphens."""
    out: dict[str, bytes] = {}
    taken: set[bytes] = set()
    for zid in sorted(zone_ids):
        base = _ZONE_LABEL_BAD.sub("-", zid.lower()).strip("-")[:60].strip("-") or "zone"
        if base.startswith(("h-", "h6-")) or base in ("ns", "_udp", "_tcp"):
            base = "z-" + base  # host labels and fixed names keep their meaning
        label, n = base, 1
        while label.encode() in taken:
            n += 1
            label = f"{base[: 60 - len(str(n))]}-{n}"
        taken.add(label.encode())
        out[zid] = label.encode()
    return out


def host_label(address: str) -> bytes | None:
    """Return the label a host with this address literal is published under, or None."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if not usable(ip):
        return None
    if ip.version == 4:
        return b"h-" + str(ip).replace(".", "-").encode()
    return b"h6-" + str(ip).replace(":", "-").encode()


def address_of_label(label: bytes) -> str | None:
    """Return the address a host label names, or None when it is not one we would publish."""
    text = label.lower().decode("ascii", "replace")
    if text.startswith("h-"):
        raw = text[2:].replace("-", ".")
    elif text.startswith("h6-"):
        raw = text[3:].replace("-", ":")
    else:
        return None
    try:
        ip = ipaddress.ip_address(raw)
    except ValueError:
        return None
    return str(ip) if host_label(str(ip)) == label.lower() else None


def usable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Return whether an address may be handed out (RFC 8766 5.5.2: not link-local)."""
    return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def reverse_network(labels: Name) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """Return the network a reverse-mapping name stands for (octets or nibbles), or None."""
    low = lower(labels)
    if low[-2:] == IN_ADDR:
        octets = low[:-2][::-1]
        if not 1 <= len(octets) <= 4 or not all(
            o.isdigit() and len(o) <= 3 and int(o) <= 255 and (o == b"0" or o[:1] != b"0")
            for o in octets
        ):
            return None
        parts = [int(o) for o in octets] + [0] * (4 - len(octets))
        return ipaddress.IPv4Network((bytes(parts), 8 * len(octets)))
    if low[-2:] == IP6:
        nibbles = low[:-2][::-1]
        if not 1 <= len(nibbles) <= 32 or not all(
            len(n) == 1 and n in b"0123456789abcdef" for n in nibbles
        ):
            return None
        hexa = b"".join(nibbles).decode().ljust(32, "0")
        return ipaddress.IPv6Network((int(hexa, 16), 4 * len(nibbles)))
    return None


def place_text(rec: Record, sitemap: SiteMap) -> str:
    """Return the ``note`` of a device: building, floor and zone name."""
    p = rec.placement
    if p is None:
        return ""
    parts = [p.building, f"floor {p.level}"]
    zone = sitemap.zones.get(p.zone) if p.zone else None
    if zone is not None:
        parts.append(zone.name)
    return ", ".join(parts)


def _txt(pairs: Iterable[tuple[str, str]]) -> tuple[bytes, ...]:
    out = []
    for key, value in pairs:
        item = f"{key}={_CONTROL.sub(' ', value)}".encode()
        if len(item) > TXT_STRING_MAX:
            item = item[:TXT_STRING_MAX].decode("utf-8", "ignore").encode()
        out.append(item)
    return tuple(out)


def txt_record(rec: Record, st: ServiceType, path: str, sitemap: SiteMap) -> tuple[bytes, ...]:
    """Return the TXT strings of an instance, rebuilt from what the daemon knows."""
    d = rec.device
    caps = d.capabilities
    extra = dict(d.extra)
    pairs: list[tuple[str, str]] = [("txtvers", "1")]
    ty = d.make_model or d.name
    note = place_text(rec, sitemap)
    if st.kind is DeviceKind.PRINTER:
        pdl = str(extra.get("pdl") or "application/pdf,image/pwg-raster")
        urf = extra.get("urf")
        if urf and str(urf).lower() != "none" and "image/urf" not in pdl:
            pdl += ",image/urf"
        pairs += [("rp", path.strip("/")), ("ty", ty), ("note", note), ("pdl", pdl)]
        if urf:
            pairs.append(("URF", str(urf)))
        pairs += [("Color", "T" if caps.color else "F"), ("Duplex", "T" if caps.duplex else "F")]
        if caps.paper_max:
            pairs.append(("PaperMax", caps.paper_max))
    else:
        sources = "platen,adf" if caps.adf else "platen"
        spaces = "color,grayscale" if caps.color else "grayscale"
        pairs += [("rs", path.strip("/")), ("ty", ty), ("note", note)]
        pairs += [("is", sources), ("cs", spaces), ("duplex", "T" if caps.duplex else "F")]
    if d.uuid:
        pairs.append(("UUID", d.uuid.removeprefix("urn:uuid:")))
    if st.scheme in ("ipps", "https"):
        pairs.append(("TLS", "1.2"))
    admin = extra.get("adminurl")
    if isinstance(admin, str) and admin.startswith(("http://", "https://")):
        pairs.append(("adminurl", admin))
    return _txt(pairs)


def endpoint_uri(device: Device, st: ServiceType) -> str | None:
    """Return the URI a device is published with for a service type, or None.

    The device's own URI when its scheme is the type's (what ``nearest`` answers), else
    its first endpoint of that type.
    """
    if device.uri.lower().startswith(st.scheme + "://") and (
        st.kind is DeviceKind.SCANNER or st.scheme.startswith("ipp")
    ):
        return device.uri
    for ep in device.endpoints:
        if ep.service == st.endpoint:
            return ep.uri
    return None


@dataclass(slots=True)
class Publisher:
    """Answers DNS-SD questions for one domain from the device table; keeps instance names."""

    domain: str
    per_type: int
    ttl: int
    ns_addresses: tuple[str, ...] = ()
    _domain: Name = ()
    _sitemap: SiteMap | None = None
    _labels: dict[str, bytes] = field(default_factory=dict)
    _zones: dict[bytes, str] = field(default_factory=dict)
    _names: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    _taken: dict[bytes, str] = field(default_factory=dict)
    _lists: dict[tuple[str, bytes], tuple[Instance, ...]] = field(default_factory=dict)
    _generation: int = -1
    _touched: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._domain = tuple(x.encode() for x in self.domain.lower().strip(".").split("."))

    def configure(self, per_type: int, ttl: int, ns_addresses: tuple[str, ...]) -> None:
        """Take new settings for the same domain; instance names are kept."""
        self.per_type = per_type
        self.ttl = ttl
        self.ns_addresses = ns_addresses
        self._lists.clear()

    @property
    def origin(self) -> Name:
        """Return the domain's labels (lower case)."""
        return self._domain

    def zone_domain(self, zone_id: str) -> Name | None:
        """Return the browse domain of a zone, ``<zone-label>.D``."""
        label = self._labels.get(zone_id)
        return None if label is None else (label, *self._domain)

    def sync(self, table: DeviceTable, sitemap: SiteMap) -> None:
        """Follow the site map and the table: drop the lists of an older generation."""
        if sitemap is not self._sitemap:
            self._sitemap = sitemap
            self._labels = zone_labels(sitemap.zones)
            self._zones = {v: k for k, v in self._labels.items()}
        if table.generation != self._generation:
            self._generation = table.generation
            self._lists.clear()
            if len(self._names) > 2 * len(table) + 1024:
                for device_id in [i for i in self._names if table.get(i) is None]:
                    self._release(device_id)

    # ---- the decision ------------------------------------------------------------------
    def answer(
        self,
        qname: Name,
        qtype: int,
        qclass: int,
        querier: Zone | None,
        scene: Scene,
    ) -> Reply:
        """Return the reply to one question from a querier placed in ``querier``."""
        self._touched = []
        reply = self._answer(qname, qtype, qclass, querier, scene)
        if self._touched:
            reply = replace(reply, depends=tuple(dict.fromkeys(self._touched)))
        return reply

    def lists(
        self,
        depends: Iterable[tuple[str, bytes]],
        scene: Scene,
    ) -> tuple[tuple[Instance, ...], ...] | None:
        """Return the current instance lists an answer depends on (None: a zone is gone)."""
        self.sync(scene.table, scene.sitemap)
        out = []
        for zid, label in depends:
            zone = scene.sitemap.zones.get(zid)
            if zone is None:
                return None
            out.append(self.published(zone, _TYPE_BY_LABEL[label], scene))
        return tuple(out)

    def _answer(
        self,
        qname: Name,
        qtype: int,
        qclass: int,
        querier: Zone | None,
        scene: Scene,
    ) -> Reply:
        self.sync(scene.table, scene.sitemap)
        if qclass not in (CLASS_IN, ANY) or qtype in (AXFR, IXFR, OPT) or qtype == 0:
            return REFUSE
        low = lower(qname)
        n = len(self._domain)
        if len(low) >= n and low[len(low) - n :] == self._domain:
            rel = qname[: len(qname) - n]
            return self._in_domain(qname, rel, qtype, querier, scene)
        if len(low) >= 5 and low[1:3] == DNSSD_UDP and low[0] in BROWSE + REGISTER:
            net = reverse_network(qname[3:])
            if net is not None:
                return self._reverse(qname, low[0], net, qtype, scene.sitemap)
        return REFUSE

    def _reverse(
        self,
        qname: Name,
        which: bytes,
        net: ipaddress.IPv4Network | ipaddress.IPv6Network,
        qtype: int,
        sitemap: SiteMap,
    ) -> Reply:
        zid = sitemap.prefixes.lookup(str(net.network_address))
        if which in REGISTER or zid is None:
            return Reply(NOERROR, zone=zid)
        target = self.zone_domain(zid)
        if target is None:
            return Reply(NOERROR)
        if qtype not in (PTR, ANY):
            return Reply(NOERROR, zone=zid)
        return Reply(NOERROR, (RR(qname, PTR, self.ttl, target),), zone=zid)

    def _soa(self) -> RR:
        mname = (b"ns", *self._domain)
        rname = (b"hostmaster", *self._domain)
        data = (mname, rname, 0, 3600, 600, 86400, self.ttl)
        return RR(self._domain, SOA, self.ttl, data)

    def _nodata(self, zone: str | None = None) -> Reply:
        return Reply(NOERROR, authority=(self._soa(),), zone=zone)

    def _nxdomain(self, zone: str | None = None) -> Reply:
        return Reply(NXDOMAIN, authority=(self._soa(),), zone=zone)

    def _in_domain(
        self,
        qname: Name,
        rel: Name,
        qtype: int,
        querier: Zone | None,
        scene: Scene,
    ) -> Reply:
        r = lower(rel)[::-1]
        if not r:
            if qtype == ANY:
                return self._any(qname)
            if qtype == SOA:
                return Reply(NOERROR, (self._soa(),))
            if qtype == NS:
                return Reply(NOERROR, (RR(qname, NS, self.ttl, (b"ns", *self._domain)),))
            return self._nodata()
        if r == (b"ns",):
            return self._addresses(qname, qtype, self.ns_addresses)
        if r in ((b"_udp",), (b"_udp", b"_dns-sd")):
            return self._nodata()  # _udp.D and _dns-sd._udp.D: empty non-terminals
        if len(r) == 3 and r[:2] == (b"_udp", b"_dns-sd"):
            if r[2] in REGISTER:
                return self._nodata()
            if r[2] not in BROWSE:
                return self._nxdomain()
            zid = querier.id if querier is not None else None
            target = self.zone_domain(zid) if zid is not None else None
            if target is None or qtype not in (PTR, ANY):
                return self._nodata(zid)
            return Reply(NOERROR, (RR(qname, PTR, self.ttl, target),), zone=zid)
        if len(r) == 1 and (address := address_of_label(r[0])) is not None:
            return self._addresses(qname, qtype, (address,))
        zid = self._zones.get(r[0])
        zone = scene.sitemap.zones.get(zid) if zid is not None else None
        if zone is None:
            return self._nxdomain()
        return self._in_zone(qname, r[1:], qtype, zone, scene)

    def _any(self, qname: Name) -> Reply:
        # RFC 8482: a name that exists answers ANY with one small synthesised record.
        return Reply(NOERROR, (RR(qname, HINFO, self.ttl, (b"RFC8482", b"")),))

    def _addresses(self, qname: Name, qtype: int, addresses: Iterable[str]) -> Reply:
        want = {A: 4, AAAA: 6}.get(qtype)
        if qtype == ANY:
            return self._any(qname)
        rrs = []
        for a in addresses:
            ip = ipaddress.ip_address(a)
            if ip.version == want and usable(ip):
                rrs.append(RR(qname, qtype, self.ttl, str(ip)))
        return Reply(NOERROR, tuple(rrs)) if rrs else self._nodata()

    def _in_zone(
        self,
        qname: Name,
        r: Name,
        qtype: int,
        zone: Zone,
        scene: Scene,
    ) -> Reply:
        zid = zone.id
        if not r or r in ((b"_udp",), (b"_udp", b"_dns-sd"), (b"_tcp",)):
            return self._any(qname) if qtype == ANY else self._nodata(zid)
        if r == (b"_udp", b"_dns-sd", b"_services"):
            if qtype not in (PTR, ANY):
                return self._nodata(zid)
            base = qname[3:]
            rrs = tuple(
                RR(qname, PTR, self.ttl, (*st.labels, *base))
                for st in SERVICE_TYPES
                if self.published(zone, st, scene)
            )
            return Reply(NOERROR, rrs, zone=zid) if rrs else self._nodata(zid)
        if r[0] != b"_tcp" or len(r) < 2 or r[1] not in _TYPE_BY_LABEL:
            return self._nxdomain(zid)
        st = _TYPE_BY_LABEL[r[1]]
        rest = r[2:]
        if not rest or (len(rest) == 2 and rest[0] == b"_sub" and rest[1] in st.subtypes):
            if qtype == ANY:
                return self._any(qname)
            if qtype != PTR:
                return self._nodata(zid)
            found = self.published(zone, st, scene)
            if not found:
                return self._nodata(zid)
            base = qname[len(qname) - 3 - len(self._domain) :]  # _type._tcp.<zone>.D
            answers = tuple(RR(qname, PTR, self.ttl, (i.label, *base)) for i in found)
            extra: list[RR] = []
            for i in found:
                owner = (i.label, *base)
                extra += self._instance_rrs(owner, i)
                extra += self._target_rrs(i)
            return Reply(NOERROR, answers, (), tuple(extra), zone=zid, devices=_ids(found))
        if rest == (b"_sub",):
            return self._nodata(zid)
        if len(rest) != 1:
            return self._nxdomain(zid)
        label = rest[0].lower()
        for i in self.published(zone, st, scene):
            if i.label.lower() == label:
                break
        else:
            return self._nxdomain(zid)
        if qtype == ANY:
            return Reply(NOERROR, (self._instance_rrs(qname, i)[0],), zone=zid)
        if qtype == SRV:
            return Reply(
                NOERROR,
                (self._instance_rrs(qname, i)[0],),
                (),
                tuple(self._target_rrs(i)),
                zone=zid,
                devices=(i.device_id,),
            )
        if qtype == TXT:
            return Reply(
                NOERROR, (self._instance_rrs(qname, i)[1],), zone=zid, devices=(i.device_id,)
            )
        return self._nodata(zid)

    def _instance_rrs(self, owner: Name, i: Instance) -> list[RR]:
        return [
            RR(owner, SRV, self.ttl, (0, 0, i.port, i.target)),
            RR(owner, TXT, self.ttl, i.txt),
        ]

    def _target_rrs(self, i: Instance) -> list[RR]:
        if i.address is None:
            return []
        rtype = AAAA if ":" in i.address else A
        return [RR(i.target, rtype, self.ttl, i.address)]

    # ---- what is published -------------------------------------------------------------
    def published(self, zone: Zone, st: ServiceType, scene: Scene) -> tuple[Instance, ...]:
        """Return the instances of a type under a zone: ``nearest``'s answer, those it can."""
        key = (zone.id, st.labels[0])
        self._touched.append(key)
        found = self._lists.get(key)
        if found is not None:
            return found
        table, sitemap, ranking = scene
        policy = sitemap.visibility
        visible = policy.client_mask(zone.id, None) if policy.active else -1
        hits = table.index.nearest(zone, str(st.kind), Need(), self.per_type, ranking, visible)
        out = []
        for hit in hits:
            rec = table.get(hit.device_id)
            if rec is None:
                continue
            inst = self._instance(rec, st, table, sitemap)
            if inst is not None:
                out.append(inst)
        found = tuple(out)
        self._lists[key] = found
        return found

    def _instance(
        self, rec: Record, st: ServiceType, table: DeviceTable, sitemap: SiteMap
    ) -> Instance | None:
        uri = endpoint_uri(rec.device, st)
        if uri is None:
            return None
        try:
            parts = urlsplit(uri)
            host = parts.hostname
            port = parts.port or st.default_port
        except ValueError:
            return None
        if not host or not 0 < port < 65536:
            return None
        address: str | None = None
        label = host_label(host)
        if label is not None:
            target: Name = (label, *self._domain)
            address = str(ipaddress.ip_address(host))
        else:
            try:
                ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                pass
            else:
                return None  # an address literal we may not hand out (link-local)
            labels = host.rstrip(".").split(".")
            if not all(_HOSTNAME.fullmatch(x) for x in labels):
                return None
            target = tuple(x.encode() for x in labels)
        name = self.instance_name(rec.device, table)
        return Instance(
            rec.device.id,
            name,
            port,
            target,
            address,
            txt_record(rec, st, parts.path, sitemap),
        )

    def instance_name(self, device: Device, table: DeviceTable) -> bytes:
        """Return a device's instance label: its name, unique, kept while the device stays."""
        base = _instance_base(device.name)
        held = self._names.get(device.id)
        if held is not None and held[0] == base:
            return held[1]
        if held is not None:
            self._release(device.id)
        n = 1
        while True:
            label = base.encode() if n == 1 else f"{base} ({n})".encode()
            holder = self._taken.get(label.lower())
            if holder is None or table.get(holder) is None:
                if holder is not None:
                    self._release(holder)
                self._taken[label.lower()] = device.id
                self._names[device.id] = (base, label)
                return label
            n += 1

    def _release(self, device_id: str) -> None:
        held = self._names.pop(device_id, None)
        if held is not None and self._taken.get(held[1].lower()) == device_id:
            del self._taken[held[1].lower()]


def _instance_base(name: str) -> str:
    text = " ".join(_CONTROL.sub(" ", name).split()) or "Device"
    raw = text.encode()
    if len(raw) > INSTANCE_MAX:
        text = raw[:INSTANCE_MAX].decode("utf-8", "ignore").rstrip()
    return text


def _ids(found: Iterable[Instance]) -> tuple[str, ...]:
    return tuple(i.device_id for i in found)
