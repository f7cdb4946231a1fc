"""Unicast DNS-SD decisions (core/dnssd.py): names, rcodes, records, equal to ``nearest``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest

from nearest_wire import Need
from nearestd.config import ConfigError, parse_config
from nearestd.core import dnssd
from nearestd.core.devices import DeviceTable
from nearestd.core.dnssd import (
    AAAA,
    ANY,
    AXFR,
    IXFR,
    NOERROR,
    NS,
    NXDOMAIN,
    PTR,
    REFUSED,
    SOA,
    SRV,
    TXT,
    A,
    Publisher,
    Scene,
)
from nearestd.core.model import DeviceState
from nearestd.core.ranking import Ranking
from nearestd.core.resolve import rank
from nearestd.core.sitemap import build_sitemap
from support import lab_square, zone_feature

D = "print.example.org"
RANKING = Ranking(20.0, 100.0, False)


def device(
    did: str, zone: int, kind: str, uri: str, name: str | None = None, **props: Any
) -> dict[str, Any]:
    ring = lab_square(zone)
    lon, lat = ring[0][0] + 0.0001, ring[0][1] + 0.0001  # same spot: ties go by id
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
        "properties": {
            "feature_type": "device",
            "static": True,
            "id": did,
            "name": name or did,
            "kind": kind,
            "uri": uri,
            "site": "lab",
            "building": "main",
            "level": 0,
            **props,
        },
    }


def world() -> dict[str, Any]:
    return {
        "type": "FeatureCollection",
        "features": [
            zone_feature("z-a", lab_square(0), ["10.9.1.0/24"], name="Zone A"),
            zone_feature("z-b", lab_square(1), ["10.9.2.0/24", "2001:db8:9:2::/64"], name="B"),
            zone_feature("z-c", lab_square(8), ["10.9.3.0/24"], name="Far"),
            device(
                "pa1",
                0,
                "printer",
                "ipp://10.9.1.50:631/ipp/print",
                "Printer",
                make_model="Acme Laser 9",
                capabilities={"color": True, "duplex": True, "paper_max": "legal-A4"},
            ),
            device("pa2", 0, "printer", "ipps://10.9.1.51/ipp/print", "Printer"),
            device("pa3", 0, "printer", "ipp://printer-a3.example.org:8631/ipp/print"),
            device("pb1", 1, "printer", "ipp://[2001:db8:9:2::50]:631/ipp/print", "Printer"),
            device("pll", 1, "printer", "ipp://[fe80::1]:631/ipp/print", "Link local"),
            device("sa1", 0, "scanner", "http://10.9.1.60:8080/eSCL/", "Scanner A"),
            device("pc1", 8, "printer", "ipp://10.9.3.50:631/ipp/print", "Far Printer"),
        ],
    }


@pytest.fixture
def env() -> tuple[Publisher, DeviceTable]:
    sm = build_sitemap([("w.geojson", world())])
    table = DeviceTable(sm)
    pub = Publisher(D, 2, 10, ("192.0.2.53",))
    # Names go first come, first served; fix the order so each case may run alone.
    for did in ("pa1", "pa2", "pb1"):
        rec = table.get(did)
        assert rec is not None
        pub.instance_name(rec.device, table)
    return pub, table


def name(text: str) -> tuple[bytes, ...]:
    return tuple(x.encode() for x in text.rstrip(".").split("."))


def ask(
    env: tuple[Publisher, DeviceTable], qname: str, qtype: int, querier: str | None = None
) -> dnssd.Reply:
    pub, table = env
    zone = table.sitemap.zones[querier] if querier else None
    return pub.answer(name(qname), qtype, 1, zone, Scene(table, table.sitemap, RANKING))


def text(n: tuple[bytes, ...]) -> str:
    return ".".join(x.decode() for x in n)


CASES = [
    # (question, type, querier zone, rcode, answer data as text)
    (f"lb._dns-sd._udp.{D}", PTR, "z-a", NOERROR, [f"z-a.{D}"]),
    (f"b._dns-sd._udp.{D}", PTR, "z-b", NOERROR, [f"z-b.{D}"]),
    (f"db._dns-sd._udp.{D}", PTR, "z-c", NOERROR, [f"z-c.{D}"]),
    (f"LB._DNS-SD._UDP.{D.upper()}", PTR, "z-a", NOERROR, [f"z-a.{D}"]),
    (f"lb._dns-sd._udp.{D}", PTR, None, NOERROR, []),
    (f"lb._dns-sd._udp.{D}", TXT, "z-a", NOERROR, []),
    (f"r._dns-sd._udp.{D}", PTR, "z-a", NOERROR, []),
    (f"x._dns-sd._udp.{D}", PTR, "z-a", NXDOMAIN, []),
    ("lb._dns-sd._udp.0.1.9.10.in-addr.arpa", PTR, None, NOERROR, [f"z-a.{D}"]),
    ("b._dns-sd._udp.0.2.9.10.in-addr.arpa", PTR, "z-a", NOERROR, [f"z-b.{D}"]),
    ("lb._dns-sd._udp.0.7.9.10.in-addr.arpa", PTR, None, NOERROR, []),
    ("dr._dns-sd._udp.0.1.9.10.in-addr.arpa", PTR, None, NOERROR, []),
    (
        "lb._dns-sd._udp.0.0.0.0.0.0.0.0.2.0.0.0.9.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
        PTR,
        None,
        NOERROR,
        [f"z-b.{D}"],
    ),
    ("lb._dns-sd._udp.300.1.9.10.in-addr.arpa", PTR, None, REFUSED, []),
    ("lb._dns-sd._udp.01.1.9.10.in-addr.arpa", PTR, None, REFUSED, []),
    ("0.1.9.10.in-addr.arpa", PTR, None, REFUSED, []),
    ("www.example.com", A, "z-a", REFUSED, []),
    ("example.org", SOA, "z-a", REFUSED, []),
    (D, SOA, None, NOERROR, [f"ns.{D} hostmaster.{D} 0 3600 600 86400 10"]),
    (D, NS, None, NOERROR, [f"ns.{D}"]),
    (D, A, None, NOERROR, []),
    (f"ns.{D}", A, None, NOERROR, ["192.0.2.53"]),
    (f"ns.{D}", AAAA, None, NOERROR, []),
    (f"_udp.{D}", PTR, None, NOERROR, []),
    (f"_dns-sd._udp.{D}", PTR, None, NOERROR, []),
    (f"nothing.{D}", A, None, NXDOMAIN, []),
    (f"z-a.{D}", A, None, NOERROR, []),
    (f"_tcp.z-a.{D}", A, None, NOERROR, []),
    (f"_sub._ipp._tcp.z-a.{D}", PTR, None, NOERROR, []),
    (f"_http._tcp.z-a.{D}", PTR, None, NXDOMAIN, []),
    (
        f"_services._dns-sd._udp.z-a.{D}",
        PTR,
        None,
        NOERROR,
        [f"_ipp._tcp.z-a.{D}", f"_ipps._tcp.z-a.{D}", f"_uscan._tcp.z-a.{D}"],
    ),
    # z-b's nearest two printers are its own and one only link-local (never published);
    # its nearest scanner is z-a's next door.
    (
        f"_services._dns-sd._udp.z-b.{D}",
        PTR,
        None,
        NOERROR,
        [f"_ipp._tcp.z-b.{D}", f"_uscan._tcp.z-b.{D}"],
    ),
    (f"_ipp._tcp.z-a.{D}", PTR, "z-c", NOERROR, [f"Printer._ipp._tcp.z-a.{D}"]),
    (f"_universal._sub._ipp._tcp.z-a.{D}", PTR, None, NOERROR, [f"Printer._ipp._tcp.z-a.{D}"]),
    (f"_ipps._tcp.z-a.{D}", PTR, None, NOERROR, [f"Printer (2)._ipps._tcp.z-a.{D}"]),
    (f"_uscan._tcp.z-a.{D}", PTR, None, NOERROR, [f"Scanner A._uscan._tcp.z-a.{D}"]),
    (f"_uscans._tcp.z-a.{D}", PTR, None, NOERROR, []),
    (f"_universal._sub._uscan._tcp.z-a.{D}", PTR, None, NXDOMAIN, []),
    (f"Printer._ipp._tcp.z-a.{D}", SRV, None, NOERROR, [f"0 0 631 h-10-9-1-50.{D}"]),
    (f"printer._IPP._tcp.Z-A.{D}", SRV, None, NOERROR, [f"0 0 631 h-10-9-1-50.{D}"]),
    (f"Printer (2)._ipps._tcp.z-a.{D}", SRV, None, NOERROR, [f"0 0 631 h-10-9-1-51.{D}"]),
    (f"Printer._ipp._tcp.z-a.{D}", A, None, NOERROR, []),
    (f"Nobody._ipp._tcp.z-a.{D}", SRV, None, NXDOMAIN, []),
    (f"h-10-9-1-50.{D}", A, None, NOERROR, ["10.9.1.50"]),
    (f"h-10-9-1-50.{D}", AAAA, None, NOERROR, []),
    (f"h6-2001-db8-9-2--50.{D}", AAAA, None, NOERROR, ["2001:db8:9:2::50"]),
    (f"h6-fe80--1.{D}", AAAA, None, NXDOMAIN, []),
    (f"h-010-9-1-50.{D}", A, None, NXDOMAIN, []),
    (f"h-300-9-1-50.{D}", A, None, NXDOMAIN, []),
    # Names are unique over the whole domain, not only per zone.
    (f"_ipp._tcp.z-b.{D}", PTR, None, NOERROR, [f"Printer (3)._ipp._tcp.z-b.{D}"]),
    (D, AXFR, None, REFUSED, []),
    (D, IXFR, None, REFUSED, []),
    (D, ANY, None, NOERROR, ["RFC8482 "]),
    (f"_ipp._tcp.z-a.{D}", ANY, None, NOERROR, ["RFC8482 "]),
]


def show(rr: dnssd.RR) -> str:
    data = rr.data
    if rr.rtype in (PTR, NS):
        return text(data)
    if rr.rtype == SRV:
        return f"{data[0]} {data[1]} {data[2]} {text(data[3])}"
    if rr.rtype == SOA:
        return f"{text(data[0])} {text(data[1])} {' '.join(map(str, data[2:]))}"
    if rr.rtype == dnssd.HINFO:
        return " ".join(x.decode() for x in data)
    if rr.rtype == TXT:
        return "|".join(x.decode() for x in data)
    return str(data)


@pytest.mark.parametrize(("qname", "qtype", "querier", "rcode", "answer"), CASES)
def test_names_and_rcodes(
    env: tuple[Publisher, DeviceTable],
    qname: str,
    qtype: int,
    querier: str | None,
    rcode: int,
    answer: list[str],
) -> None:
    reply = ask(env, qname, qtype, querier)
    assert reply.rcode == rcode
    assert [show(rr) for rr in reply.answer] == answer
    for rr in reply.answer + reply.authority + reply.additional:
        assert 0 < rr.ttl <= 10
    if rcode == REFUSED:
        assert not reply.authoritative and not reply.authority
    if rcode == NXDOMAIN or (rcode == NOERROR and not answer and qname.endswith(D)):
        assert [rr.rtype for rr in reply.authority] == [SOA]  # RFC 2308 negative answers


def test_unknown_class_refused(env: tuple[Publisher, DeviceTable]) -> None:
    pub, table = env
    reply = pub.answer(name(D), SOA, 3, None, Scene(table, table.sitemap, RANKING))  # CHAOS
    assert reply.rcode == REFUSED


def test_ptr_answers_carry_srv_txt_and_addresses(env: tuple[Publisher, DeviceTable]) -> None:
    reply = ask(env, f"_ipp._tcp.z-a.{D}", PTR)
    kinds = [(text(rr.name), rr.rtype) for rr in reply.additional]
    assert kinds == [
        (f"Printer._ipp._tcp.z-a.{D}", SRV),
        (f"Printer._ipp._tcp.z-a.{D}", TXT),
        (f"h-10-9-1-50.{D}", A),
    ]
    txt = dict(s.decode().split("=", 1) for s in reply.additional[1].data)
    assert txt == {
        "txtvers": "1",
        "rp": "ipp/print",
        "ty": "Acme Laser 9",
        "note": "main, floor 0, Zone A",
        "pdl": "application/pdf,image/pwg-raster",
        "Color": "T",
        "Duplex": "T",
        "PaperMax": "legal-A4",
    }
    assert reply.zone == "z-a" and reply.devices == ("pa1",)


def test_scanner_and_tls_keys(env: tuple[Publisher, DeviceTable]) -> None:
    txt = ask(env, f"Scanner A._uscan._tcp.z-a.{D}", TXT).answer[0].data
    keys = [s.split(b"=")[0] for s in txt]
    assert keys == [b"txtvers", b"rs", b"ty", b"note", b"is", b"cs", b"duplex"]
    assert b"rs=eSCL" in txt and b"is=platen" in txt
    ipps = ask(env, f"Printer (2)._ipps._tcp.z-a.{D}", TXT).answer[0].data
    assert b"TLS=1.2" in ipps


def test_srv_targets_equal_nearest_for_every_zone(env: tuple[Publisher, DeviceTable]) -> None:
    """The contract's test of correctness, for every zone and both kinds."""
    pub, table = env
    for zid, zone in table.sitemap.zones.items():
        for kind, types in (("printer", ("_ipp", "_ipps")), ("scanner", ("_uscan", "_uscans"))):
            expected = set()
            for dev in rank(table, zone, kind, Need(), pub.per_type, RANKING):
                parts = urlsplit(dev.uri)
                if parts.hostname and not parts.hostname.startswith("fe80"):
                    expected.add((parts.hostname, parts.port or 631))
            got = set()
            for t in types:
                for ptr in ask(env, f"{t}._tcp.{zid}.{D}", PTR).answer:
                    srv = ask(env, text(ptr.data), SRV).answer[0].data
                    target = text(srv[3])
                    if target.endswith(D):
                        addr = ask(env, target, A if target.startswith("h-") else AAAA).answer
                        target = str(addr[0].data)
                    got.add((target, srv[2]))
            assert got == expected, (zid, kind)


def test_unavailable_devices_vanish_and_names_stay(env: tuple[Publisher, DeviceTable]) -> None:
    _, table = env
    before = [show(r) for r in ask(env, f"_ipps._tcp.z-a.{D}", PTR).answer]
    rec = table.get("pa1")
    assert rec is not None
    table.upsert(replace(rec.device, state=DeviceState.STOPPED), 1.0)
    assert [r.data[0] for r in ask(env, f"_ipp._tcp.z-a.{D}", PTR).answer] == [b"pa3"]
    # pa2 keeps "Printer (2)" while pa1 stays in the table, even though pa1 is not published.
    assert [show(r) for r in ask(env, f"_ipps._tcp.z-a.{D}", PTR).answer] == before
    table.upsert(replace(rec.device, state=DeviceState.IDLE), 2.0)
    assert ask(env, f"_ipp._tcp.z-a.{D}", PTR).answer[0].data[0] == b"Printer"


def test_instance_names_unique_and_reclaimed(env: tuple[Publisher, DeviceTable]) -> None:
    pub, table = env
    a, b, c = (table.get(i) for i in ("pa1", "pa2", "pb1"))
    assert a and b and c
    names = [pub.instance_name(r.device, table) for r in (a, b, c)]
    assert names == [b"Printer", b"Printer (2)", b"Printer (3)"]
    gone = replace(a.device, id="gone", name="Gone")
    assert pub.instance_name(gone, table) == b"Gone"
    other = replace(a.device, id="other", name="gone")  # the holder is not in the table
    assert pub.instance_name(other, table) == b"gone"
    assert pub.instance_name(b.device, table) == b"Printer (2)"  # stable
    long = replace(a.device, name="x" * 80 + "\x00\n")
    assert len(pub.instance_name(long, table)) <= 63


def test_visibility_per_zone() -> None:
    w = world()
    w["features"][0]["properties"]["visible_to"] = ["z-c"]  # z-a's devices: for z-c only
    sm = build_sitemap([("w.geojson", w)])
    table = DeviceTable(sm)
    pub = Publisher(D, 4, 10)
    for zid, visible in (("z-a", False), ("z-b", False), ("z-c", True)):
        reply = pub.answer(name(f"_ipp._tcp.{zid}.{D}"), PTR, 1, None, Scene(table, sm, RANKING))
        assert ("pa1" in reply.devices) is visible, zid


@pytest.mark.parametrize(
    ("text_", "problem"),
    [
        ('[dnssd]\ndomain = "print.example.org"\nbogus = 1\n', "[dnssd] bogus: unknown key"),
        ("[dnssd]\n", "[dnssd] domain: required"),
        ('[dnssd]\ndomain = "a..b"\n', "[dnssd] domain: expected a domain name"),
        ('[dnssd]\ndomain = "-x.org"\n', "[dnssd] domain: expected a domain name"),
        ('[dnssd]\ndomain = "x.local"\n', "[dnssd] domain: expected a domain outside .local"),
        ('[dnssd]\ndomain = "p.org"\nttl = "11s"\n', "[dnssd] ttl: expected a duration above 0"),
        ('[dnssd]\ndomain = "p.org"\nttl = 5\n', "[dnssd] ttl: expected a duration string"),
        ('[dnssd]\ndomain = "p.org"\nper_type = 0\n', "[dnssd] per_type: expected an integer"),
        ('[dnssd]\ndomain = "p.org"\nlisten = ["h:53"]\n', "[dnssd] listen[0]: expected IP:PORT"),
        ('[dnssd]\ndomain = "p.org"\nlisten = "1.2.3.4:53"\n', "[dnssd] listen: expected a list"),
        (
            '[dnssd]\ndomain = "p.org"\ntrusted_resolvers = ["x"]\n',
            "[dnssd] trusted_resolvers[0]: expected a CIDR",
        ),
    ],
)
def test_config_problems_name_the_key(text_: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text_, "f.toml")
    assert any(p.startswith(f"f.toml: {problem}") for p in exc.value.problems), exc.value.problems


def test_config_defaults() -> None:
    cfg = parse_config('[dnssd]\ndomain = "print.example.org."\n', "f.toml")
    assert cfg.dnssd is not None
    assert cfg.dnssd.listen == ["127.0.0.1:8053"] and cfg.dnssd.ttl == 10.0
    assert parse_config("", "f.toml").dnssd is None
