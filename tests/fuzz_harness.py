"""One fuzz harness per parser; each checks invariants, not only survival.

Used by tests/test_fuzz_parsers.py (hypothesis, bounded for ``make test``) and by
bench/fuzz.py (a mutation loop of at least 10^6 inputs per harness, ``make fuzz``).
A harness takes bytes and raises AssertionError (or anything else) on a bug:

* ``frames``: a byte stream through FrameDecoder, each payload through the service as
  a TCP client would send it; every reply is a well-formed contract map that encodes
  and decodes again; a request the codec accepts survives encode/decode/parse.
* ``mqtt_payloads``: a payload as an MQTT request (JSON, or MessagePack by content
  type) with the transport keys MQTT adds; the same reply invariants.
* ``txt_records``: a TXT record's wire form plus a service name, through the DNS-SD
  parser and merger into the device table (placement and quarantine); device fields
  are bounded, printable, and the inventory view encodes.
* ``addresses``: text as a client address: the checked form is canonical and stable,
  and the zone found by the prefix table equals a brute-force longest-prefix search.
* ``dns_packets``: [flags byte][DNS message] through the DNS-SD server's handler (UDP
  or TCP, trusted resolver or not): no reply or a DNS message dnslib parses, with the
  query's ID, QR set, the question echoed, and over UDP no larger than 512 bytes without
  EDNS (1232 with it).
* ``poll_replies``: [chunk size byte][HTTP reply] fed to the poller's reply reader in
  chunks, then its body through the IPP decoder and into a live state: only the
  poller's own errors, a body no longer than the limit, a state of the contract's set.
"""

from __future__ import annotations

import ipaddress
import json
import random
from functools import cache
from typing import Any

from nearest_wire import (
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    WireError,
    decode_payload,
    decode_reply,
    encode_frame,
    encode_payload,
    parse_request,
)
from nearest_wire.schema import check_ip
from nearestd.config import Cidr, parse_config
from nearestd.core.devices import DeviceTable
from nearestd.core.discovery import BASE_TYPES, Merger, ServiceRecord, split_txt
from nearestd.core.federation import RecordError, parse_record
from nearestd.core.mqtt_payload import (
    MSGPACK,
    TRANSPORT_KEYS,
    decode_request,
    encode_reply,
    route_v311,
)
from nearestd.core.resolve import inventory_view
from nearestd.core.sitemap import SiteMap, build_sitemap
from nearestd.service import Peer, Service
from support import DEMO_CSV, DEMO_MAP

CODES = {str(c) for c in ErrorCode}
MAX_JSON = 64 * 1024
NOW = 1_800_000_000.0
TCP = Peer("tcp", "10.20.23.9", trusted=False)
TRUSTED = Peer("tcp", "127.0.0.1", trusted=True)


@cache
def sitemap() -> SiteMap:
    doc = json.loads(DEMO_MAP.read_text())
    return build_sitemap([(str(DEMO_MAP), doc)], [(str(DEMO_CSV), DEMO_CSV.read_text())])


@cache
def service() -> Service:
    cfg = parse_config("[metrics]\nlisten = ''\n[privacy]\nmax_entries = 1000\n", "fuzz.toml")
    return Service(cfg, sitemap(), NOW, lambda: b"f" * 32)


@cache
def device_table() -> DeviceTable:
    return DeviceTable(sitemap())


@cache
def prefixes() -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    return [(ipaddress.ip_network(p), z) for p, z in sitemap().prefixes.items()]


def check_reply(reply: Any) -> None:
    """Assert a reply is a contract map that survives the wire."""
    assert isinstance(reply, dict), reply
    assert reply.get("v") == 1
    assert isinstance(reply.get("ok"), bool)
    rid = reply.get("id")
    assert rid is None or (isinstance(rid, int) and -(2**63) <= rid < 2**64)
    if not reply["ok"]:
        err = reply["error"]
        assert err["code"] in CODES, err
        assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 600, err
    frame = encode_frame(reply)
    assert decode_reply(frame[4:]) == reply


def frames(data: bytes) -> None:
    """Harness: a byte stream of frames, cut into two reads, answered as a TCP client."""
    svc = service()
    for split in (len(data) // 2, 1):
        dec = FrameDecoder(64 * 1024)
        items = dec.feed(data[:split]) + dec.feed(data[split:])
        assert sum(isinstance(i, FrameTooLarge) for i in items) <= 1
        for item in items:
            if isinstance(item, FrameTooLarge):
                assert item.declared > item.limit
                continue
            assert len(item) <= 64 * 1024
            check_reply(svc.handle_payload(item, TCP, NOW))
            round_trip(item)
        svc.log.purge(NOW + 10**9)


def round_trip(payload: bytes) -> None:
    """A payload the codec accepts decodes to the same request after re-encoding."""
    try:
        obj = decode_payload(payload)
        req = parse_request(obj)
    except WireError as exc:
        assert str(exc.code) in CODES
        return
    again = decode_payload(encode_payload(obj))
    assert again == obj
    assert parse_request(again) == req


def mqtt_payloads(data: bytes) -> None:
    """Harness: [selector byte][payload] as the MQTT adapter sees it.

    Even selectors: a request (JSON, or MessagePack for odd multiples of 4) through
    ``decode_request`` and ``route_v311``, answered by the service and encoded back in
    the request's encoding; JSON requests survive encode/decode. Odd selectors: a
    federated device record through ``parse_record``.
    """
    if not data:
        return
    selector, payload = data[0], data[1:]
    svc = service()
    if selector & 1:
        try:
            dev = parse_record(payload, topic_level=f"x{selector}")
        except RecordError:
            return
        for text in _texts(dev):
            assert len(text) <= 1024 and not any(ord(c) < 0x20 for c in text), repr(text)
        return
    ctype = MSGPACK if selector & 2 else None
    try:
        obj = decode_request(payload, ctype, MAX_JSON)
    except WireError as exc:
        assert str(exc.code) in CODES and exc.message
        return
    if ctype is None:
        again = decode_request(json.dumps(obj).encode(), None, 10 * MAX_JSON)
        assert again == obj
    route, _why = route_v311(obj, "nearest/v1")
    if route is not None and route.topic:
        assert not route.topic.startswith(("nearest/v1/query", "nearest/v1/devices/", "$"))
        assert "#" not in route.topic and "+" not in route.topic
    reply = svc.handle(obj, TRUSTED, NOW, extra_keys=TRANSPORT_KEYS)
    check_reply(reply)
    encoded = encode_reply(reply, ctype == MSGPACK)
    back = decode_reply(encoded) if ctype == MSGPACK else json.loads(encoded)
    assert back == reply
    svc.log.purge(NOW + 10**9)


def _texts(device: Any) -> list[str]:
    # What clients and operators are shown; ``instance`` stays raw, as the pin key.
    return [device.name, device.make_model, device.note or ""]


def txt_records(data: bytes) -> None:
    """Harness: [type byte][name length][name][TXT wire] into a device, then the table."""
    if len(data) < 2:
        return
    type_ = BASE_TYPES[data[0] % len(BASE_TYPES)]
    n = data[1]
    name = data[2 : 2 + n].decode("utf-8", "replace")
    wire = data[2 + n :]
    strings, problems = split_txt(wire)
    assert sum(len(s) + 1 for s in strings) <= len(wire) + 1
    assert all(len(s) <= 255 for s in strings)
    record = ServiceRecord(
        type=type_,
        name=f"{name}.{type_}",
        host="fuzz.local.",
        port=631 if data[0] & 0x80 else 0,
        addresses=("10.20.23.40", "fe80::1") if data[0] & 0x40 else ("10.66.0.1",),
        txt=tuple(strings),
        txt_problems=tuple(problems),
        interface="lo",
    )
    merger = Merger(max_devices=10)
    changes, _ = merger.upsert(record, NOW)
    table = device_table()
    for change in changes:
        dev = change.device
        if dev is None:
            continue
        for text in _texts(dev):
            assert len(text) <= 1024, text[:80]
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text), repr(text)
        assert dev.uri.split(":", 1)[0] in ("ipp", "ipps", "http", "https", "socket", "lpd")
        assert all(c.isalnum() or c in "-_." for c in dev.id), dev.id
        result = table.upsert(dev, NOW)
        assert result in ("added", "updated", "unchanged", "quarantined")
        rec = table.get(dev.id)
        if rec is not None:
            encode_frame({"d": inventory_view(rec).to_wire()})
        table.remove(dev.id)
    assert len(table) == len(sitemap().static_devices) and not table.quarantine
    merger.remove("lo", type_, record.name)


def addresses(data: bytes) -> None:
    """Harness: bytes as a client address string, through check_ip and the prefix table."""
    text = data.decode("utf-8", "replace")
    try:
        ip = check_ip(text, "client_ip", None)
    except WireError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST and exc.message.startswith("client_ip: ")
        return
    assert check_ip(ip, "client_ip", None) == ip, "canonical form is stable"
    addr = ipaddress.ip_address(ip)
    zone = sitemap().zone_for_ip(ip)
    best: tuple[int, str] | None = None
    for net, zid in prefixes():
        if (
            net.version == addr.version
            and addr in net
            and (best is None or net.prefixlen > best[0])
        ):
            best = (net.prefixlen, zid)
    assert (zone.id if zone else None) == (best[1] if best else None), (ip, zone, best)
    policy = sitemap().visibility
    policy.client_mask(zone.id if zone else None, ip)


@cache
def dns_server() -> Any:
    from nearestd.adapters.dnssd import DnssdServer
    from nearestd.config import DnssdConfig

    cfg = DnssdConfig(domain=DNS_DOMAIN, per_type=8, trusted_resolvers=[Cidr.parse("10.20.0.0/16")])
    server = DnssdServer(service(), cfg)
    server.cache_max = 256  # the fuzz run's memory budget, not the daemon's
    return server


DNS_DOMAIN = "print.example.org"


def dns_packets(data: bytes) -> None:
    """Harness: [flags][message]; bit 0 TCP, bit 1 from a trusted resolver."""
    from dnslib import DNSRecord

    if not data:
        return
    flags, msg = data[0], data[1:]
    udp = not flags & 1
    ip = "10.20.23.9" if flags & 2 else "192.0.2.7"
    server = dns_server()
    reply = server.handle(msg, ip, udp=udp, trusted=bool(flags & 2))
    if reply is None:
        assert len(msg) < 12 or msg[2] & 0x80
        return
    assert reply[:2] == msg[:2] and reply[2] & 0x80
    parsed = DNSRecord.parse(reply)
    if udp:
        assert len(reply) <= (512 if not parsed.ar else 1232), len(reply)
    if parsed.questions:
        query = DNSRecord.parse(msg)
        assert parsed.questions[0].qname.label == query.questions[0].qname.label
    service().log.purge(NOW + 10**9)


POLL_LIMIT = 4096


def poll_replies(data: bytes) -> None:
    """Harness: [chunk size][HTTP reply] through ReplyReader, the IPP decoder, printer_live."""
    from nearestd.adapters.poller import PollFailure, ReplyReader
    from nearestd.core.ipp import IppDecodeError, decode_response
    from nearestd.core.model import DeviceState
    from nearestd.core.state import printer_live

    if not data:
        return
    step, stream = data[0] + 1, data[1:]
    reader = ReplyReader(POLL_LIMIT)
    body = None
    try:
        for i in range(0, len(stream), step):
            body = reader.feed(stream[i : i + step])
            if body is not None:
                break
        else:
            body = reader.end()
    except PollFailure as exc:
        assert exc.kind in ("http-error", "too-large"), exc.kind
        return
    finally:
        reader.close()
    assert len(body) <= POLL_LIMIT
    try:
        reply = decode_response(body)
    except IppDecodeError:
        return
    assert printer_live(reply.printer).state in set(DeviceState)


HARNESSES = {
    "dns_packets": dns_packets,
    "poll_replies": poll_replies,
    "frames": frames,
    "mqtt_payloads": mqtt_payloads,
    "txt_records": txt_records,
    "addresses": addresses,
}


def seeds() -> dict[str, list[bytes]]:
    """Return valid and near-valid inputs per harness, to start mutation from."""
    reqs: list[dict[str, Any]] = [
        {"v": 1, "id": 1, "op": "ping"},
        {"v": 1, "id": 2, "op": "nearest", "kind": "printer", "k": 3, "need": {"color": True}},
        {"v": 1, "id": 3, "op": "nearest", "kind": "scanner", "need": {"adf": True, "paper": "A3"}},
        {"v": 1, "id": 4, "op": "locate", "client_ip": "10.20.23.9"},
        {"v": 1, "id": 5, "op": "devices", "kind": "printer", "site": "hq"},
        {"v": 1, "id": 6, "op": "nearest", "kind": "printer", "zone": "n1-finance", "k": 20},
    ]
    frame_seeds = [b"".join(encode_frame(r) for r in reqs)] + [encode_frame(r) for r in reqs]
    frame_seeds += [b"\xff\xff\xff\xff", b"\x00\x00\x00\x05\xdd\xff\xff\xff\xff", b"\x91" * 64]
    mqtt = [
        b"\x00" + json.dumps({**r, "reply_to": "r/1", "correlation": "c"}).encode() for r in reqs
    ]
    mqtt += [b"\x02" + encode_payload({**r, "reply_to": "r/2"}) for r in reqs]
    mqtt += [b"\x00" + b"[" * 50, b'\x00{"v":1e999}', b"\x00" + b'{"v":NaN}']
    record = {
        "v": 1,
        "id": "mdns-printer-1",
        "origin": "other",
        "kind": "printer",
        "name": "Remote",
        "uri": "ipp://10.20.23.5:631/ipp/print",
        "capabilities": {"color": True},
        "placement": {
            "site": "hq",
            "building": "north",
            "level": 1,
            "zone": "n1-finance",
            "x": 1.0,
            "y": 2.0,
        },
    }
    mqtt += [b"\x01" + json.dumps(record).encode()]
    txt = []
    for i in range(len(BASE_TYPES)):
        strings = [
            b"txtvers=1",
            b"ty=HP LaserJet",
            b"note=Finance",
            b"UUID=3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11",
            b"Color=T",
            b"Duplex=F",
            b"PaperMax=legal-A4",
            b"rp=ipp/print",
            b"pdl=application/pdf",
        ]
        wire = b"".join(bytes([len(s)]) + s for s in strings)
        name = b"Finance LaserJet"
        txt.append(bytes([i | 0xC0, len(name)]) + name + wire)
    addr = [
        b"10.20.23.9",
        b"2001:db8:20:23::9",
        b"::ffff:10.20.61.4",
        b"127.0.0.1",
        b"fe80::1%eth0",
        b"10.21.62.255",
        b"2001:db8:20:51:ffff:ffff:ffff:ffff",
        b"0.0.0.0",
        b"::",
    ]
    return {
        "frames": frame_seeds,
        "mqtt_payloads": mqtt,
        "txt_records": txt,
        "addresses": addr,
        "dns_packets": dns_seeds(),
        "poll_replies": poll_seeds(),
    }


def poll_seeds() -> list[bytes]:
    """Return printers' replies: framed by length, chunked, by the close; and refusals."""
    from nearestd.core.ipp import encode_get_printer_attributes

    # A reply in the shape of a request: the decoder takes either (both are IPP messages).
    ipp = encode_get_printer_attributes("ipp://10.0.0.1/ipp/print", 7, ["printer-state"])
    ipp = b"\x02\x00\x00\x00" + ipp[4:-1] + bytes.fromhex("0423000d7072696e7465722d7374617465000400000003") + b"\x03"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(ipp[i : i + 9]), ipp[i : i + 9]) for i in range(0, len(ipp), 9))
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/ipp\r\nContent-Length: %d\r\n\r\n%s" % (len(ipp), ipp),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Type: application/ipp\r\n\r\n" + ipp,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ipp), ipp),
        b"HTTP/1.1 301 Moved\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
    ]
    return [bytes([step]) + r for r in replies for step in (0, 6, 255)]


DNS_NAMES = [
    f"lb._dns-sd._udp.{DNS_DOMAIN}",
    "b._dns-sd._udp.0.23.20.10.in-addr.arpa",
    f"_services._dns-sd._udp.n1-finance.{DNS_DOMAIN}",
    f"_ipp._tcp.n1-finance.{DNS_DOMAIN}",
    f"_universal._sub._ipps._tcp.n1-finance.{DNS_DOMAIN}",
    f"_uscan._tcp.s1-east.{DNS_DOMAIN}",
    f"Printer._ipp._tcp.n1-finance.{DNS_DOMAIN}",
    f"h-10-20-23-5.{DNS_DOMAIN}",
    DNS_DOMAIN,
    "www.example.com",
]
DNS_TYPES = ["PTR", "SRV", "TXT", "A", "AAAA", "SOA", "NS", "ANY", "AXFR", "CAA"]


def dns_query(name: str, qtype: str, edns: int | None, ecs: bytes | None) -> bytes:
    """Return a query's wire form, optionally with EDNS and an ECS option."""
    from dnslib import QTYPE, RR, DNSRecord, EDNSOption

    q = DNSRecord.question(name, qtype)
    if edns is not None:
        opts = [EDNSOption(8, ecs)] if ecs is not None else []
        q.add_ar(RR("", QTYPE.OPT, rclass=edns, ttl=0, rdata=opts))
    return bytes(q.pack())


def dns_seeds() -> list[bytes]:
    """Return queries for every name and type, plain, with EDNS and with ECS."""
    out = []
    for name in DNS_NAMES:
        for qtype in DNS_TYPES[:4]:
            out.append(b"\x00" + dns_query(name, qtype, None, None))
        out.append(b"\x02" + dns_query(name, "PTR", 4096, b"\x00\x01\x18\x00\x0a\x14\x17"))
        out.append(b"\x01" + dns_query(name, "ANY", 65535, None))
    return out


def random_request(rng: random.Random) -> dict[str, Any]:
    """Return a request map mixing valid and invalid fields (structure-aware inputs)."""
    pick = rng.choice
    req: dict[str, Any] = {"v": pick([1, 1, 1, 2, "1", None]), "id": pick([0, 1, 2**63 - 1, -1])}
    fields: dict[str, list[Any]] = {
        "op": ["nearest", "nearest", "locate", "devices", "ping", "stats", "x"],
        "kind": ["printer", "scanner", "fax", 3],
        "k": [1, 3, 20, 0, 21, "2"],
        "need": [{}, {"color": True}, {"paper": "A3", "duplex": True}, {"adf": 1}, []],
        "client_ip": ["10.20.23.9", "2001:db8:20:23::9", "fe80::1%eth0", "10.0.0.0/8", 7],
        "zone": ["n1-finance", "s1-east", "", "x" * 200],
        "site": ["hq", ""],
        "reply_to": ["r/1", "nearest/v1/query", "a/#", "$SYS/x", "", 5],
        "correlation": ["c", 7, b"b", "x" * 300, None],
    }
    for key, options in fields.items():
        if rng.random() < 0.5:
            req[key] = pick(options)
    return req


def structured(name: str, rng: random.Random) -> bytes:
    """Return a structure-aware input for a harness (bench/fuzz mixes these in)."""
    if name == "dns_packets":
        qname = rng.choice(DNS_NAMES)
        qname = "".join(c.upper() if rng.random() < 0.3 else c for c in qname)
        edns = rng.choice([None, 0, 512, 1232, 65535])
        ecs = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 8)))
        wire = dns_query(qname, rng.choice(DNS_TYPES), edns, ecs if rng.random() < 0.3 else None)
        return bytes([rng.randrange(4)]) + wire
    if name == "frames":
        return b"".join(encode_frame(random_request(rng)) for _ in range(rng.randint(1, 4)))
    if name == "mqtt_payloads":
        req = random_request(rng)
        if rng.random() < 0.5:
            return b"\x02" + encode_payload(req)
        return b"\x00" + json.dumps(req, default=repr).encode()
    if name == "addresses":
        if rng.random() < 0.5:
            return f"10.{rng.choice([20, 21])}.{rng.randrange(256)}.{rng.randrange(256)}".encode()
        return str(ipaddress.IPv6Address(rng.getrandbits(128))).encode()
    return rng.choice(seeds()[name])
