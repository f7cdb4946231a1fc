"""Unicast DNS-SD server: UDP and TCP on each ``[dnssd] listen`` address (dnslib).

The decisions are ``core.dnssd``'s; this adapter parses questions and builds replies with
dnslib (measured here: parse about 1.3x, parse-and-build about 5x dnspython's rate, see
docs/dnssd.md), and keeps every reply it built as wire bytes keyed by the query's bytes
after the ID and the querier's zone. When the device table's generation has moved since a
reply was built, it is served again only if the device lists it was built from are
unchanged (else rebuilt); a new site map or config drops the cache. The hot path of a
repeated question is one dict lookup and two byte slices (the ID patched in).

Defences: the question must be one class-IN query (else FORMERR/NOTIMP/REFUSED); replies
over UDP are cut to the asker's EDNS size (512 without EDNS, at most 1232): additional
records are dropped first, then TC is set; token buckets per source /24 (IPv4) or /56
(IPv6) drop queries over the rate, except from ``trusted_resolvers``; TCP connections are
capped and closed when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from dnslib import (
    AAAA,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
    EDNSOption,
)
from dnslib.dns import RD

from nearestd.core import dnssd as core
from nearestd.core.limits import RateLimiter
from nearestd.core.netset import NetSet, normalise_peer

if TYPE_CHECKING:
    from nearestd.config import Config, DnssdConfig
    from nearestd.service import Service

LOG = logging.getLogger("nearestd.dnssd")
UDP_MAX = 1232  # DNS flag day 2020: no fragmented UDP answers
UDP_DRAIN = 64  # datagrams read per wakeup
UDP_READ = 65535  # the largest datagram taken
CACHE_MAX = 65536
RATE = 100.0  # queries per second per source prefix
BURST = 200
RATE_KEYS = 16384
TCP_MAX = 128
TCP_IDLE = 10.0
TCP_READ = 5.0
ECS = 8
SERVER_EDNS = 1232
LOG_MEMO = 65536
_UNKNOWN: Any = object()
QTYPE_NAMES = {
    n: str(QTYPE[n])
    for n in (1, 2, 5, 6, 12, 13, 15, 16, 28, 33, 35, 41, 43, 48, 64, 65, 251, 252, 255, 257)
}


class Entry(NamedTuple):
    """A built reply: UDP and TCP wire (the ID left out, as cached), and what to count and log."""

    udp: bytes
    tcp: bytes
    qtype: str
    rcode: str
    truncated: bool
    zone: str | None
    devices: tuple[str, ...]
    client: str | None
    generation: int = -1
    depends: tuple[tuple[str, bytes], ...] = ()
    lists: tuple[Any, ...] = ()


def source_prefix(ip: str) -> str:
    """Return the rate-limit key of an address: its /24 (IPv4) or /56 (IPv6)."""
    if ":" not in ip:
        return ip.rpartition(".")[0]
    low = ip.lower()
    if low.startswith("::ffff:") and "." in low:
        return low[7:].rpartition(".")[0]
    try:
        return str(ipaddress.IPv6Network((ip.split("%", 1)[0], 56), strict=False))
    except ValueError:
        return ip


def _name(labels: tuple[bytes, ...]) -> DNSLabel:
    return DNSLabel(list(labels))


def _rdata(rr: core.RR) -> Any:
    d = rr.data
    t = rr.rtype
    if t == core.PTR:
        return PTR(_name(d))
    if t == core.NS:
        return NS(_name(d))
    if t == core.SRV:
        return SRV(d[0], d[1], d[2], _name(d[3]))
    if t == core.TXT:
        return TXT(list(d))
    if t == core.A:
        return A(d)
    if t == core.AAAA:
        return AAAA(d)
    if t == core.SOA:
        return SOA(_name(d[0]), _name(d[1]), d[2:])
    if t == core.HINFO:
        return RD(bytes([len(d[0])]) + d[0] + bytes([len(d[1])]) + d[1])
    raise ValueError(f"no rdata for type {t}")  # pragma: no cover


def _rr(rr: core.RR) -> RR:
    return RR(_name(rr.name), rr.rtype, ttl=rr.ttl, rdata=_rdata(rr))


def _header_only(data: bytes, rcode: int) -> bytes:
    """Return a bare reply (no sections) echoing the ID and opcode: for FORMERR and NOTIMP."""
    flags = 0x8000 | (data[2] & 0x79) << 8 | rcode
    return data[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)


def _name_ok(labels: tuple[bytes, ...]) -> bool:
    """Return whether a name keeps RFC 1035's limits: labels of 1-63 bytes, 255 in all."""
    return all(0 < len(x) <= 63 for x in labels) and sum(len(x) + 1 for x in labels) + 1 <= 255


class DnssdServer:
    """The unicast DNS-SD component: answers from ``core.dnssd``, cached as wire bytes."""

    name = "dnssd"

    def __init__(
        self,
        service: Service,
        cfg: DnssdConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.clock = clock
        self.wall = wall
        self.cfg = cfg
        self.publisher = self._publisher(cfg)
        self.trusted = NetSet(c.network for c in cfg.trusted_resolvers)
        self._trusted_memo: dict[str, bool] = {}
        self.limiter = RateLimiter(RATE, BURST, RATE_KEYS)
        self.cache: OrderedDict[tuple[bytes, str | None, bool], Entry] = OrderedDict()
        self.cache_bytes = 0
        self.cache_max = CACHE_MAX
        self._sitemap: Any = None
        self._logged: dict[tuple[str, str], set[str]] = {}
        self._log_window = 0.0
        # Replies by (qtype, rcode): one count per reply; stats() sums them by each.
        self.replies: Counter[tuple[str, str]] = Counter()
        # The zone each asking address is in (None: none), for the current site map.
        self._zone_of: dict[str, str | None] = {}
        self.truncated = 0
        self.rate_limited = 0
        self.malformed = 0
        self.revalidated = 0
        self.tcp_refused = 0
        self._udp: list[_Udp] = []
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[None]] = set()
        self.addresses: list[str] = []

    def _publisher(self, cfg: DnssdConfig) -> core.Publisher:
        return core.Publisher(cfg.domain, cfg.per_type, max(1, int(cfg.ttl)), _ns(cfg))

    # ---- component ---------------------------------------------------------------------
    async def start(self) -> None:
        """Bind UDP and TCP on every listen address."""
        for addr in self.cfg.listen:
            host, port = addr.host, addr.port
            udp = await _Udp.bind(self, host, port)
            self._udp.append(udp)
            bound = udp.port
            server = await asyncio.start_server(self._tcp, host, bound, reuse_address=True)
            self._servers.append(server)
            self.addresses.append(f"{host}:{bound}")
        LOG.info("dnssd serving", extra={"listen": ",".join(self.addresses)})

    async def stop(self) -> None:
        """Close the sockets and the open TCP connections."""
        for udp in self._udp:
            udp.close()
        for s in self._servers:
            s.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1.0)
        self._udp.clear()
        self._servers.clear()

    def reconfigure(self, cfg: Config) -> None:
        """Follow a reload: domain, per_type, ttl and trusted resolvers; listen at restart."""
        new = cfg.dnssd
        if new is None:
            LOG.warning("[dnssd] removed: the DNS server stops at the next restart")
            return
        if new.listen != self.cfg.listen:
            LOG.warning("[dnssd] listen changed: takes effect at the next restart")
        if new.domain.lower().strip(".") == self.cfg.domain.lower().strip("."):
            # Same domain: instance names stay what they were while their devices stay.
            self.publisher.configure(new.per_type, max(1, int(new.ttl)), _ns(new))
        else:
            self.publisher = self._publisher(new)
        self.cfg = new
        self.trusted = NetSet(c.network for c in new.trusted_resolvers)
        self._trusted_memo = {}
        self._drop_cache()

    def stats(self) -> Mapping[str, Any]:
        """Return the counters: queries by type, replies by rcode, truncated, rate-limited."""
        queries: Counter[str] = Counter()
        rcodes: Counter[str] = Counter()
        for (qtype, rcode), n in self.replies.items():
            queries[qtype] += n
            rcodes[rcode] += n
        return {
            "queries_by_qtype": dict(sorted(queries.items())),
            "replies_by_rcode": dict(sorted(rcodes.items())),
            "truncated_total": self.truncated,
            "rate_limited_total": self.rate_limited,
            "malformed_total": self.malformed,
            "tcp_refused_total": self.tcp_refused,
            "tcp_connections": len(self._conns),
            "cache_entries": len(self.cache),
            "cache_revalidated_total": self.revalidated,
            "cache_bytes": self.cache_bytes,
        }

    # ---- the hot path ------------------------------------------------------------------
    def _drop_cache(self) -> None:
        self.cache = OrderedDict()
        self.cache_bytes = 0
        self._zone_of = {}

    def _zone_of_address(self, ip: str) -> str | None:
        """Return the zone an asking address is in (memoised until the site map changes)."""
        zone = self.service.sitemap.prefixes.lookup(ip) if _is_ip(ip) else None
        if len(self._zone_of) >= LOG_MEMO:
            self._zone_of.clear()
        self._zone_of[ip] = zone
        return zone

    def is_trusted(self, ip: str) -> bool:
        """Return whether an address is one of the trusted resolvers (memoised per address)."""
        if not self.trusted.cidrs:
            return False
        known = self._trusted_memo.get(ip)
        if known is not None:
            return known
        try:
            found = self.trusted.contains(normalise_peer(ip))
        except ValueError:
            return False
        if len(self._trusted_memo) >= LOG_MEMO:
            self._trusted_memo.clear()
        self._trusted_memo[ip] = found
        return found

    def allow(self, ip: str, trusted: bool) -> bool:
        """Take a token for the source's prefix; count and refuse it when over the rate."""
        if trusted or self.limiter.take(source_prefix(ip), 1, self.clock()) == 1:
            return True
        self.rate_limited += 1
        return False

    def handle(self, data: bytes, ip: str, udp: bool, trusted: bool) -> bytes | None:
        """Answer one DNS message from ``ip``; None drops it (responses, garbage)."""
        if len(data) < 12 or data[2] & 0x80:
            self.malformed += 1
            return None
        svc = self.service
        if svc.sitemap is not self._sitemap:
            self._sitemap = svc.sitemap
            self._drop_cache()
        source_zone = self._zone_of.get(ip, _UNKNOWN)
        if source_zone is _UNKNOWN:
            source_zone = self._zone_of_address(ip)
        key = (data[2:], source_zone, trusted)
        entry = self.cache.get(key)
        generation = svc.table.generation
        if entry is not None and entry.generation != generation:
            entry = self._revalidate(key, entry, generation)
        if entry is None:
            try:
                entry = self._build(data, source_zone, ip, trusted)
            except Exception:
                # A question dnslib or we cannot take apart: FORMERR, never a crash.
                self.malformed += 1
                self.replies[("other", "FORMERR")] += 1
                return _header_only(data, 1)
            # Cached without the ID, which every reply takes from its query.
            tcp = entry.tcp[2:]
            entry = entry._replace(udp=tcp if entry.udp is entry.tcp else entry.udp[2:], tcp=tcp)
            stale = self.cache.pop(key, None)
            if stale is not None:
                self.cache_bytes -= len(stale.udp) + len(stale.tcp) + len(data)
            elif len(self.cache) >= self.cache_max:
                _, old = self.cache.popitem(last=False)
                self.cache_bytes -= len(old.udp) + len(old.tcp) + len(data)
            self.cache[key] = entry
            self.cache_bytes += len(entry.udp) + len(entry.tcp) + len(data)
        self.replies[entry.qtype, entry.rcode] += 1
        if udp and entry.truncated:
            self.truncated += 1
        zone = entry.zone
        if zone is not None:
            # Most lookups were logged a moment ago: that check, without a call.
            now = self.wall()
            client = entry.client or ip
            seen = self._logged.get((client, zone))
            if (
                seen is None
                or not 0 <= now - self._log_window < 1.0
                or not seen.issuperset(entry.devices)
            ):
                self._log(client, zone, entry.devices, now)
        return data[:2] + (entry.udp if udp else entry.tcp)

    def _revalidate(
        self, key: tuple[bytes, str | None, bool], entry: Entry, generation: int
    ) -> Entry | None:
        """Keep a cached answer across a table change when the lists it shows are unchanged.

        Most changes (a poll's state, a device far away) leave a zone's ``per_type`` nearest
        devices as they were; only the answers built from a list that changed are rebuilt.
        """
        if entry.depends:
            now = self.publisher.lists(entry.depends, self._scene())
            if now != entry.lists:
                return None
        fresh = entry._replace(generation=generation)
        self.cache[key] = fresh
        self.revalidated += 1
        return fresh

    def _scene(self) -> core.Scene:
        """Return what answers are drawn from now: the service's table, map and ranking."""
        svc = self.service
        return core.Scene(svc.table, svc.sitemap, svc.ranking)

    def _log(self, client: str, zone: str, devices: tuple[str, ...], now: float) -> None:
        """Make the location-log entry: an address's lookups in a zone, once a second.

        A client browsing asks a dozen names at once (PTR, then SRV, TXT and A of each
        instance), and a resolver the same ones for many clients: within one second, one
        entry for each (address, zone), and another only when an answer names devices not
        yet logged for them. The log still says where the address was placed and every
        device it was shown, with a tenth of the entries and of the keyed hashes.
        """
        if not 0 <= now - self._log_window < 1.0:
            self._logged.clear()
            self._log_window = now
        key = (client, zone)
        seen = self._logged.get(key)
        if seen is not None:
            if seen.issuperset(devices):
                return
            devices = tuple(d for d in devices if d not in seen)
            seen.update(devices)
        elif len(self._logged) < LOG_MEMO:
            self._logged[key] = set(devices)
        self.service.remember_lookup(client, zone, "dnssd", devices, now)

    def _build(self, data: bytes, source_zone: str | None, ip: str, trusted: bool) -> Entry:
        query = DNSRecord.parse(data)
        opcode = query.header.opcode
        if opcode != 0:
            wire = _header_only(data, 4)
            return Entry(wire, wire, "other", "NOTIMP", False, None, (), None)
        if len(query.questions) != 1 or query.rr or query.auth:
            wire = _header_only(data, 1)
            return Entry(wire, wire, "other", "FORMERR", False, None, (), None)
        q = query.questions[0]
        labels = tuple(q.qname.label)
        qtype_name = QTYPE_NAMES.get(q.qtype, "other")  # bounded: the counter's keys
        opt = next((r for r in query.ar if r.rtype == core.OPT), None)
        if not _name_ok(labels) or len([r for r in query.ar if r.rtype == core.OPT]) > 1:
            wire = _header_only(data, 1)
            return Entry(wire, wire, qtype_name, "FORMERR", False, None, (), None)
        limit = 512 if opt is None else max(512, min(int(opt.rclass), UDP_MAX))
        client, scope = (None, None)
        if opt is not None and trusted:
            client, scope = _client_subnet(opt)
        svc = self.service
        zid = source_zone
        if client is not None:
            zid = svc.sitemap.prefixes.lookup(client)
        querier = svc.sitemap.zones.get(zid) if zid is not None else None
        reply = self.publisher.answer(labels, q.qtype, q.qclass, querier, self._scene())
        rcode = reply.rcode
        edns_version = (opt.ttl >> 16) & 0xFF if opt is not None else 0
        header = DNSHeader(
            id=0, qr=1, aa=int(reply.authoritative), ra=0, rd=query.header.rd, rcode=rcode & 0xF
        )
        msg = DNSRecord(header, q=DNSQuestion(q.qname, q.qtype, q.qclass))
        if opt is not None:
            ext = 1 if edns_version != 0 else 0  # BADVERS (16) = extended rcode 1, rcode 0
            options = []
            if client is not None and scope is not None:
                options.append(scope)
            msg.add_ar(RR("", core.OPT, rclass=SERVER_EDNS, ttl=ext << 24, rdata=options))
            if ext:
                msg.header.rcode = 0
                wire = bytes(msg.pack())
                return Entry(wire, wire, qtype_name, "BADVERS", False, None, (), None)
        for rr in reply.answer:
            msg.add_answer(_rr(rr))
        for rr in reply.authority:
            msg.add_auth(_rr(rr))
        full_ar = list(msg.ar)
        for rr in reply.additional:
            msg.add_ar(_rr(rr))
        tcp = bytes(msg.pack())
        udp, truncated = tcp, False
        if len(udp) > limit:
            msg.ar = full_ar  # RFC 2181 9: additional data may go without TC
            udp = bytes(msg.pack())
            if len(udp) > limit:
                msg.rr, msg.auth = [], []
                msg.header.tc = 1
                udp, truncated = bytes(msg.pack()), True
        rcode_name = RCODE.get(rcode, f"RCODE{rcode}")
        lists = self.publisher.lists(reply.depends, self._scene()) or ()
        return Entry(
            udp,
            tcp,
            qtype_name,
            str(rcode_name),
            truncated,
            reply.zone,
            reply.devices,
            client,
            svc.table.generation,
            reply.depends,
            lists,
        )

    # ---- TCP ---------------------------------------------------------------------------
    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= TCP_MAX or task is None:
            self.tcp_refused += 1
            writer.close()
            return
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        trusted = self.is_trusted(ip)
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                (size,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(size), TCP_READ)
                if not self.allow(ip, trusted):
                    break
                reply = self.handle(data, ip, udp=False, trusted=trusted)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), TCP_READ)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


def _ns(cfg: DnssdConfig) -> tuple[str, ...]:
    """Return the addresses ``ns.<domain>`` has: the specific ``listen`` addresses."""
    out = []
    for addr in cfg.listen:
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(addr.host)
            if not ip.is_unspecified:
                out.append(str(ip))
    return tuple(out)


def _is_ip(text: str) -> bool:
    return bool(text) and (":" in text or text[0].isdigit())


def _client_subnet(opt: RR) -> tuple[str | None, EDNSOption | None]:
    """Return the ECS address (RFC 7871) of an OPT record and the option to echo, or Nones."""
    for option in opt.rdata or ():
        if getattr(option, "code", None) != ECS:
            continue
        raw = bytes(option.data)
        if len(raw) < 4:
            return None, None
        family, source, _scope = struct.unpack("!HBB", raw[:4])
        addr = raw[4:]
        width = {1: 4, 2: 16}.get(family)
        if width is None or source > width * 8 or len(addr) != (source + 7) // 8:
            return None, None
        padded = addr + bytes(width - len(addr))
        ip = ipaddress.ip_address(padded)
        echo = EDNSOption(ECS, struct.pack("!HBB", family, source, source) + addr)
        return str(ip), echo
    return None, None


class _Udp:
    """One UDP socket, drained on each wakeup: every datagram answered (or dropped) at once.

    A resolver sends bursts; reading up to ``UDP_DRAIN`` datagrams per readiness event
    spares the event loop's per-datagram round (a poll, a handle) that an asyncio datagram
    transport pays, which is most of the cost of a cached answer.
    """

    def __init__(self, server: DnssdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.send_failed = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def bind(cls, server: DnssdServer, host: str, port: int) -> _Udp:
        """Bind a non-blocking UDP socket to ``host:port`` and start answering on it."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"cannot resolve {host}")
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.bind(addr)
            return cls(server, sock)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        """Stop answering and close the socket."""
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _readable(self) -> None:
        server = self.server
        # Bound once per wakeup, not looked up per datagram: this loop is the hot path.
        recvfrom, sendto = self.sock.recvfrom, self.sock.sendto
        handle, is_trusted = server.handle, server.is_trusted
        for _ in range(UDP_DRAIN):
            try:
                data, addr = recvfrom(UDP_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # An ICMP error queued for an earlier reply: nothing to answer, keep reading.
                LOG.debug("dnssd socket error", extra={"error": exc.strerror or str(exc)})
                continue
            ip: str = addr[0]
            trusted = is_trusted(ip)
            if not trusted and not server.allow(ip, trusted):
                continue
            try:
                reply = handle(data, ip, True, trusted)
            except Exception:
                # The daemon keeps serving everyone else whatever one packet does.
                LOG.exception("dnssd query failed")
                continue
            if reply is None:
                continue
            try:
                sendto(reply, addr)
            except OSError:
                # A full send buffer or an unreachable asker: UDP, the asker asks again.
                self.send_failed += 1
