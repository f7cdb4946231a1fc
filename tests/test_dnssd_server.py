"""The DNS-SD server in a real nearestd process, asked by dig and by raw hostile packets.

Loopback only: the daemon serves ``[dnssd]`` on 127.0.0.1 and a free port; the querier's
zone is the one whose subnets hold 127.0.0.1 (a trusted resolver's ECS moves it).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, DNSRecord, EDNSOption

from support import (
    DaemonProcess,
    ask,
    free_port,
    lab_device,
    lab_square,
    require_tools,
    write_config,
    zone_feature,
)

pytestmark = [pytest.mark.realpeer]

D = "print.example.org"


def write_site(path: Path, many: int = 0) -> Path:
    features = [
        zone_feature("z-a", lab_square(0), ["10.9.1.0/24", "127.0.0.1/32"], name="Zone A"),
        zone_feature("z-b", lab_square(4), ["10.9.2.0/24", "127.0.0.2/32"], name="Zone B"),
        lab_device("pa1", 0, "printer", "ipp://10.9.1.50:631/ipp/print", "Printer"),
        lab_device("pa2", 0, "printer", "ipp://10.9.1.51:631/ipp/print", "Printer"),
        lab_device("pb1", 4, "printer", "ipp://10.9.2.50:8631/ipp/print", "B Printer"),
        lab_device("sa1", 0, "scanner", "http://10.9.1.60:8080/eSCL/", "Scanner A"),
    ]
    for i in range(many):
        name = f"A printer with a rather long name number {i:03d}"
        features.append(lab_device(f"pz{i}", 0, "printer", f"ipp://10.9.1.{100 + i}/", name))
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, int]]:
    d = tmp_path_factory.mktemp("dnssd")
    port = free_port()
    cfg = write_config(
        d,
        sections={
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "dnssd": {
                "listen": [f"127.0.0.1:{port}", f"[::1]:{port}"],
                "domain": D,
                "per_type": 32,
                "ttl": "5s",
                "trusted_resolvers": ["127.0.0.3/32"],
            },
        },
        maps=[str(write_site(d / "site.geojson", many=30))],
        subnets=[],
    )
    proc = DaemonProcess(cfg).wait_ready()
    try:
        yield proc, port
    finally:
        proc.stop()


def dig(port: int, *args: str) -> str:
    require_tools("dig")
    r = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return r.stdout


def short(port: int, *args: str) -> list[str]:
    return sorted(dig(port, "+short", *args).split("\n")[:-1])


def udp(port: int, packet: bytes, source: str = "127.0.0.1", timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def tcp(port: int, packet: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!H", len(packet)) + packet)
        head = s.recv(2, socket.MSG_WAITALL)
        (n,) = struct.unpack("!H", head)
        return s.recv(n, socket.MSG_WAITALL)


def rcode(wire: bytes | None) -> int:
    assert wire is not None
    return wire[3] & 0xF


def test_browse_names_point_to_the_queriers_zone(server: tuple[DaemonProcess, int]) -> None:
    _, port = server
    assert short(port, f"lb._dns-sd._udp.{D}", "PTR") == [f"z-a.{D}."]
    assert short(port, "b._dns-sd._udp.0.2.9.10.in-addr.arpa", "PTR") == [f"z-b.{D}."]
    out = dig(port, f"lb._dns-sd._udp.{D}", "PTR")
    assert "flags: qr aa rd;" in out  # authoritative, no recursion available
    assert "status: NOERROR" in out


def test_srv_txt_a_follow_the_contract(server: tuple[DaemonProcess, int]) -> None:
    _, port = server
    assert f"B\\032Printer._ipp._tcp.z-b.{D}." in short(port, f"_ipp._tcp.z-b.{D}", "PTR")
    assert short(port, f"B\\032Printer._ipp._tcp.z-b.{D}", "SRV") == [f"0 0 8631 h-10-9-2-50.{D}."]
    assert short(port, f"h-10-9-2-50.{D}", "A") == ["10.9.2.50"]
    txt = dig(port, "+short", f"B\\032Printer._ipp._tcp.z-b.{D}", "TXT")
    assert '"rp=ipp/print"' in txt and '"note=main, floor 0, Zone B"' in txt
    for line in dig(port, "+noall", "+answer", f"_ipp._tcp.z-a.{D}", "PTR", "+tcp").splitlines():
        assert int(line.split()[1]) <= 5  # TTL
    assert "status: NXDOMAIN" in dig(port, f"nope.{D}", "A")
    assert "status: REFUSED" in dig(port, "www.example.com", "A")
    soa = short(port, D, "SOA")[0].split()
    assert soa[2] == "0" and soa[-1] == "5"  # serial 0, MINIMUM = ttl


def test_large_answers_truncated_over_udp_whole_over_tcp(server: tuple[DaemonProcess, int]) -> None:
    _, port = server
    q = DNSRecord.question(f"_ipp._tcp.z-a.{D}", "PTR")
    plain = udp(port, bytes(q.pack()))
    assert plain is not None and len(plain) <= 512
    parsed = DNSRecord.parse(plain)
    assert parsed.header.tc == 1 and not parsed.rr
    whole = DNSRecord.parse(tcp(port, bytes(q.pack())))
    assert whole.header.tc == 0 and len(whole.rr) == 32
    q.add_ar(_opt(65535))  # an absurd EDNS size is held to 1232
    big = udp(port, bytes(q.pack()))
    assert big is not None and len(big) <= 1232
    # dig retries over TCP on TC and gets every record
    assert len(short(port, f"_ipp._tcp.z-a.{D}", "PTR")) == 32


def _opt(size: int, options: list[Any] | None = None) -> Any:
    from dnslib import RR

    return RR("", QTYPE.OPT, rclass=size, ttl=0, rdata=options or [])


def _header(qd: int = 1, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0x4242, flags, qd, 0, 0, 0)


def _q(name: bytes, qtype: int = 12, qclass: int = 1) -> bytes:
    return _header() + name + struct.pack("!HH", qtype, qclass)


def _wire(name: str) -> bytes:
    return b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\x00"


HOSTILE = [
    ("truncated header", _header()[:7], None),
    ("question cut short", _header() + b"\x03abc", 1),
    ("compression loop", _header() + b"\xc0\x0c" + b"\x00\x0c\x00\x01", 1),
    ("label over 63", _q(b"\x50" + b"a" * 80 + _wire(D)), 1),
    ("name over 255", _q(b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + _wire(D)), 1),
    # dnslib refuses labels that are not UTF-8: FORMERR (no name of ours has such bytes).
    ("0x80 bytes in a label", _q(b"\x04\x80\x81\xfe\xff" + _wire(D)), 1),
    ("0x80 bytes outside", _q(b"\x04\x80\x81\xfe\xff\x00"), 1),
    ("UTF-8 instance name", _q(b"\x06Caf\xc3\xa9!" + _wire("_ipp._tcp.z-a." + D), 33), 3),
    ("unknown class", _q(_wire(D), 6, 3), 5),
    ("unknown type", _q(_wire(D), 4242), 0),
    ("no question", _header(qd=0), 1),
    ("two questions", _header(qd=2) + _wire(D) + b"\x00\x06\x00\x01" + _wire(D) + b"\x00\x06\x00\x01", 1),
    ("IXFR", _q(_wire(D), 251), 5),
    ("AXFR", _q(_wire(D), 252), 5),
    ("a NOTIFY (opcode 4)", _header(flags=0x2000)[:12] + _wire(D) + b"\x00\x06\x00\x01", 4),
    ("a response", _header(flags=0x8000) + _wire(D) + b"\x00\x06\x00\x01", None),
]  # fmt: skip


@pytest.mark.parametrize(("what", "packet", "expected"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_packets(
    server: tuple[DaemonProcess, int], what: str, packet: bytes, expected: int | None
) -> None:
    proc, port = server
    reply = udp(port, packet, timeout=0.5 if expected is None else 3.0)
    if expected is None:
        assert reply is None, what
    else:
        assert reply is not None and rcode(reply) == expected, what
        assert reply[:2] == b"\x42\x42" and len(reply) <= 512
    assert ask(proc, {"op": "ping"})["ok"]


def test_any_is_minimal_and_axfr_refused_over_tcp(server: tuple[DaemonProcess, int]) -> None:
    _, port = server
    out = dig(port, f"_ipp._tcp.z-a.{D}", "ANY")
    assert "status: NOERROR" in out and "HINFO" in out and "ANSWER: 1," in out
    assert rcode(tcp(port, _q(_wire(D), 252))) == 5
    assert "Transfer failed" in dig(port, D, "AXFR") or "REFUSED" in dig(port, D, "AXFR")


def test_ecs_from_a_trusted_resolver_moves_the_querier(server: tuple[DaemonProcess, int]) -> None:
    _, port = server
    q = DNSRecord.question(f"lb._dns-sd._udp.{D}", "PTR")
    ecs = EDNSOption(8, struct.pack("!HBB", 1, 24, 0) + bytes([10, 9, 2]))
    q.add_ar(_opt(1232, [ecs]))
    trusted = DNSRecord.parse(udp(port, bytes(q.pack()), source="127.0.0.3") or b"")
    assert [str(rr.rdata) for rr in trusted.rr] == [f"z-b.{D}."]
    # Not trusted: the ECS option is ignored and the source address decides.
    plain = DNSRecord.parse(udp(port, bytes(q.pack()), source="127.0.0.1") or b"")
    assert [str(rr.rdata) for rr in plain.rr] == [f"z-a.{D}."]


def test_flood_from_one_prefix_is_rate_limited_others_served(
    server: tuple[DaemonProcess, int],
) -> None:
    proc, port = server
    q = bytes(DNSRecord.question(f"lb._dns-sd._udp.{D}", "PTR").pack())
    answered = 0
    before = ask(proc, {"op": "stats"}, admin=True)["stats"]["dnssd"]["rate_limited_total"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.2.2", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(0.2)
        start = time.monotonic()
        for i in range(1000):
            s.sendto(q, ("127.0.0.1", port))
            if i % 50 == 49:
                time.sleep(0.005)  # pacing, so the kernel's buffers do not drop the flood
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                s.recv(4096)
                answered += 1
            except TimeoutError:
                break
    assert 200 <= answered <= 200 + 100 * (elapsed + 0.5)  # burst 200, then 100/s
    other = udp(port, q, source="127.0.1.1")  # another /24
    assert other is not None and rcode(other) == 0
    stats = ask(proc, {"op": "stats"}, admin=True)["stats"]["dnssd"]
    assert stats["rate_limited_total"] - before >= 1000 - answered - 100
    assert stats["replies_by_rcode"]["NOERROR"] > 0
    assert stats["cache_entries"] > 0


def test_queries_are_location_log_entries(server: tuple[DaemonProcess, int]) -> None:
    proc, port = server
    short(port, f"lb._dns-sd._udp.{D}", "PTR")
    entries = ask(proc, {"op": "privacy.export", "ip": "127.0.0.1"}, admin=True)["entries"]
    assert any(e["op"] == "dnssd" and e["zone"] == "z-a" for e in entries)


def test_metrics_count_by_type_and_rcode_without_names(server: tuple[DaemonProcess, int]) -> None:
    import tomllib
    import urllib.request

    proc, port = server
    short(port, f"_ipp._tcp.z-a.{D}", "PTR", "+tcp")
    dig(port, f"nope.{D}", "A")
    listen = tomllib.loads(proc.config.read_text())["metrics"]["listen"]
    page = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    lines = [x for x in page.splitlines() if x.startswith("nearest_dnssd_")]
    assert any(x.startswith('nearest_dnssd_queries_total{qtype="PTR"}') for x in lines), lines
    assert any(x.startswith('nearest_dnssd_replies_total{rcode="NXDOMAIN"}') for x in lines)
    assert any(x.startswith("nearest_dnssd_cache_bytes ") for x in lines)
    assert not any("127.0" in x or "example" in x for x in lines), lines


def test_reload_follows_per_type_and_ttl(server: tuple[DaemonProcess, int]) -> None:
    proc, port = server
    original = proc.config.read_text()
    try:
        proc.config.write_text(original.replace("per_type = 32", "per_type = 2").replace(
            'ttl = "5s"', 'ttl = "3s"'
        ))  # fmt: skip
        before = short(port, f"_ipp._tcp.z-a.{D}", "PTR", "+tcp")
        assert ask(proc, {"op": "reload"}, admin=True)["ok"]
        answers = dig(port, "+noall", "+answer", f"_ipp._tcp.z-a.{D}", "PTR")
        lines = answers.splitlines()
        assert len(lines) == 2 and all(line.split()[1] == "3" for line in lines), lines
        assert {line.split()[-1] for line in lines} <= set(before)  # the same names
        proc.config.write_text(original.replace('ttl = "5s"', 'ttl = "11s"'))
        from nearest_client.client import ServerError

        with pytest.raises(ServerError) as refused:
            ask(proc, {"op": "reload"}, admin=True)
        assert any("[dnssd] ttl" in p for p in refused.value.reply["problems"])
        assert len(short(port, f"_ipp._tcp.z-a.{D}", "PTR")) == 2  # still the old config
    finally:
        proc.config.write_text(original)
        ask(proc, {"op": "reload"}, admin=True)


def test_ipv6_listen_and_aaaa(server: tuple[DaemonProcess, int]) -> None:
    _, port = server
    require_tools("dig")
    r = subprocess.run(
        ["dig", "@::1", "-p", str(port), "+short", "+time=3", f"lb._dns-sd._udp.{D}", "PTR"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.stdout.split() == []  # ::1 is in no zone: NOERROR, no answer
    assert short(port, f"ns.{D}", "A") == ["127.0.0.1"]
    assert short(port, f"ns.{D}", "AAAA") == ["::1"]


def test_tcp_connections_capped_and_idle_ones_closed(server: tuple[DaemonProcess, int]) -> None:
    proc, port = server
    conns = []
    try:
        for _ in range(130):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # The daemon closes the ones over the cap at once: reading them gives EOF.
        closed = 0
        for c in conns[-2:]:
            c.settimeout(5)
            closed += c.recv(1) == b""
        assert closed == 2
        stats = ask(proc, {"op": "stats"}, admin=True)["stats"]["dnssd"]
        assert stats["tcp_refused_total"] >= 2 and stats["tcp_connections"] <= 128
        # An idle one is closed after 10 s.
        conns[0].settimeout(20)
        started = time.monotonic()
        assert conns[0].recv(1) == b""
        assert 5 < time.monotonic() - started < 15
    finally:
        for c in conns:
            c.close()
    # Served again once they are gone.
    q = DNSRecord.question(f"lb._dns-sd._udp.{D}", "PTR")
    assert DNSRecord.parse(tcp(port, bytes(q.pack()))).rr
