"""The DNS-SD answer cache (adapters/dnssd.py, in-process): kept across unrelated changes."""

from __future__ import annotations

from dataclasses import replace

from dnslib import DNSRecord

from nearestd.adapters.dnssd import DnssdServer
from nearestd.config import DnssdConfig, parse_config
from nearestd.core.model import DeviceState
from nearestd.core.sitemap import build_sitemap
from nearestd.service import Service
from test_dnssd_core import D, world


def server() -> tuple[Service, DnssdServer]:
    cfg = parse_config("[metrics]\nlisten = ''\n", "t.toml")
    svc = Service(cfg, build_sitemap([("w.geojson", world())]), 1.0, lambda: b"k" * 32)
    return svc, DnssdServer(svc, DnssdConfig(domain=D, per_type=2))


def ask(srv: DnssdServer, name: str, qtype: str, ident: int) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    reply = srv.handle(bytes(q.pack()), "10.9.1.7", udp=False, trusted=False)
    assert reply is not None
    return reply


def names(wire: bytes) -> list[str]:
    return [str(rr.rdata) for rr in DNSRecord.parse(wire).rr]


def test_answers_survive_unrelated_changes_and_follow_related_ones() -> None:
    svc, srv = server()
    q = f"_ipp._tcp.z-a.{D}"
    first = ask(srv, q, "PTR", 1)
    assert names(first) == [f"Printer._ipp._tcp.z-a.{D}."]
    again = ask(srv, q, "PTR", 2)
    assert again[2:] == first[2:] and again[:2] == b"\x00\x02"  # the ID patched in
    far = svc.table.get("pc1")
    assert far is not None
    svc.table.upsert(replace(far.device, state=DeviceState.PROCESSING), 2.0)
    assert ask(srv, q, "PTR", 3)[2:] == first[2:]
    assert srv.revalidated == 1
    near = svc.table.get("pa1")
    assert near is not None
    svc.table.upsert(replace(near.device, state=DeviceState.STOPPED), 3.0)
    assert names(ask(srv, q, "PTR", 4)) == [f"pa3._ipp._tcp.z-a.{D}."]
    assert srv.revalidated == 1
    # An instance that left: its SRV is NXDOMAIN now, not the cached answer.
    assert DNSRecord.parse(ask(srv, f"Printer._ipp._tcp.z-a.{D}", "SRV", 5)).header.rcode == 3
    svc.table.upsert(replace(near.device, state=DeviceState.IDLE), 4.0)
    assert names(ask(srv, q, "PTR", 6)) == names(first)
    assert DNSRecord.parse(ask(srv, f"Printer._ipp._tcp.z-a.{D}", "SRV", 7)).rr


def test_a_browse_is_one_log_entry_per_address_zone_and_second() -> None:
    cfg = parse_config("[metrics]\nlisten = ''\n", "t.toml")
    svc = Service(cfg, build_sitemap([("w.geojson", world())]), 1.0, lambda: b"k" * 32)
    clock = [100.0]
    srv = DnssdServer(svc, DnssdConfig(domain=D, per_type=2), wall=lambda: clock[0])

    def logged() -> list[tuple[float, list[str]]]:
        entries = svc.log.export("10.9.1.7")
        return [(e["ts"], e["devices"]) for e in entries if e["op"] == "dnssd"]

    ptr = f"_ipp._tcp.z-a.{D}"
    (instance,) = names(ask(srv, ptr, "PTR", 1))
    ask(srv, instance, "SRV", 2)  # names the device the PTR already showed
    ask(srv, instance, "TXT", 3)
    ask(srv, ptr, "PTR", 4)
    assert logged() == [(100.0, ["pa1"])]
    # A device not yet shown to the address in that zone is an entry of its own, alone.
    srv._log("10.9.1.7", "z-a", ("pa1", "pa3"), clock[0])
    assert logged() == [(100.0, ["pa1"]), (100.0, ["pa3"])]
    clock[0] += 1.0  # the next second logs the browse again
    ask(srv, ptr, "PTR", 5)
    assert logged()[-1] == (101.0, ["pa1"]) and len(logged()) == 3
