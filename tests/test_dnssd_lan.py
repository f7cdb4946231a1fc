"""Zero-install discovery on the namespace LAN: dig, Unbound and avahi against nearestd.

Topology (its own LAN, tests/lan.py): host 1 runs nearestd, multi-homed in three client
subnets 10.9.{1,2,3}.0/24 (one zone each), serving DNS on 10.9.N.1:53 and the query
protocol on 10.9.N.1:7310; hosts 2-4 are clients, one per subnet (10.9.N.10); host 5
holds mDNS peers (python-zeroconf, avahi with ippeveprinter at 10.9.2.20); host 6 runs
Unbound (10.9.N.2), configured as docs/dnssd.md says, and a second nearestd whose poller
watches the ippeveprinter. Clients use only their own subnet's addresses, so the daemon
sees who they are.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from lan import Lan, can_run
from support import (
    DaemonProcess,
    lab_device,
    lab_square,
    require_tools,
    skip_or_fail,
    wait_for,
    write_config,
    zone_feature,
)

pytestmark = [pytest.mark.lan, pytest.mark.realpeer]

D = "print.example.org"
PER_TYPE = 4
TTL = 2.0
CLIENTS = {2: 1, 3: 2, 4: 3}  # host -> subnet number (10.9.N.0/24, zone z-N)
RESOLVER = 6
PEERS = 5
LIFE_UUID = "5d0c6f1e-0d5e-4b7a-9c11-00000000d501"


def write_site(path: Path) -> Path:
    features = []
    for n in (1, 2, 3):
        sq = 3 * (n - 1)
        features.append(zone_feature(f"z-{n}", lab_square(sq), [f"10.9.{n}.0/24"], name=f"Z{n}"))
        for j in range(3):
            dx = 0.00003 * j
            uri = f"ipp://10.9.{n}.{50 + j}:631/ipp/print"
            features.append(lab_device(f"p{n}{j}", sq, "printer", uri, f"Printer {n}{j}", dx, make_model=f"Model p{n}{j}"))
        features.append(
            lab_device(f"s{n}", sq, "scanner", f"http://10.9.{n}.60:8080/eSCL/", f"Scanner {n}", make_model=f"Model s{n}")
        )
    features.append(lab_device("pshared", 1, "printer", "ipps://10.9.1.70/ipp/print", "Printer 10", make_model="Model pshared"))
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def net() -> Iterator[Lan]:
    reason = can_run()
    if reason:
        skip_or_fail(f"cannot build the test LAN: {reason}")
    require_tools("dig")
    lan = Lan(n_hosts=6, net=91).up()
    try:
        for n in (1, 2, 3):
            lan._ip("-n", lan.ns(1), "addr", "add", f"10.9.{n}.1/24", "dev", "eth0")
            lan._ip("-n", lan.ns(RESOLVER), "addr", "add", f"10.9.{n}.2/24", "dev", "eth0")
        for host, n in CLIENTS.items():
            # A client has only its own subnet's address: the LAN's 198.18 one goes.
            lan._ip("-n", lan.ns(host), "addr", "flush", "dev", "eth0")
            lan._ip("-n", lan.ns(host), "addr", "add", f"10.9.{n}.10/24", "dev", "eth0")
        yield lan
    finally:
        lan.down()


@pytest.fixture(scope="module")
def daemon(net: Lan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("dnssd-lan")
    cfg = write_config(
        d,
        sections={
            "daemon": {
                "listen": [f"tcp://10.9.{n}.1:7310" for n in (1, 2, 3)]
                + [f"unix://{d}/query.sock"],
            },
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "30s"},
            # The static printers' addresses hold no printer: polled, all would (rightly)
            # be unreachable. The poller's part is test_a_printer_that_stops_answering...
            "poller": {"enabled": False},
            "dnssd": {
                "listen": [f"10.9.{n}.1:53" for n in (1, 2, 3)],
                "domain": D,
                "per_type": PER_TYPE,
                "ttl": f"{TTL:g}s",
                "trusted_resolvers": [f"10.9.{n}.2/32" for n in (1, 2, 3)],
            },
        },
        maps=[str(write_site(d / "site.geojson"))],
        subnets=[],
    )
    proc = DaemonProcess(cfg, netns=net.ns(1)).wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


def dig(lan: Lan, host: int, server: str, *args: str) -> list[str]:
    r = lan.run(host, ["dig", f"@{server}", "+short", "+time=2", "+tries=2", *args], timeout=30)
    return [x for x in r.stdout.splitlines() if x and not x.startswith(";")]


def reverse(n: int) -> str:
    return f"0.{n}.9.10.in-addr.arpa"


def published(lan: Lan, host: int, server: str, domain: str, types: tuple[str, ...]) -> set[Any]:
    """Return the (address, port) pairs the SRV records under ``domain`` lead to."""
    out = set()
    for t in types:
        for inst in dig(lan, host, server, f"{t}._tcp.{domain}", "PTR"):
            for srv in dig(lan, host, server, inst, "SRV"):
                _, _, port, target = srv.split()
                addrs = dig(lan, host, server, target, "A") + dig(lan, host, server, target, "AAAA")
                assert addrs, target
                out |= {(a, int(port)) for a in addrs}
    return out


def nearest_says(lan: Lan, host: int, n: int, kind: str) -> set[tuple[str, int]]:
    """Return the (host, port) pairs of the URIs ``nearest <kind> -k per_type`` answers."""
    r = lan.run(
        host,
        [
            *(sys.executable, "-m", "nearest_client.cli"),
            *("--server", f"tcp://10.9.{n}.1:7310", "--json", kind, "-k", str(PER_TYPE)),
        ],
    )
    assert r.returncode in (0, 1), r.stderr
    default = {"ipp": 631, "ipps": 631, "http": 80, "https": 443}
    out = set()
    for d in json.loads(r.stdout)["devices"]:
        u = urlsplit(d["uri"])
        out.add((str(u.hostname), u.port or default[u.scheme]))
    return out


def check_client(lan: Lan, host: int, n: int, server: str) -> None:
    """Browse as a stock client: reverse-mapped browse names, then the services."""
    for b in ("b", "db", "lb"):
        assert dig(lan, host, server, f"{b}._dns-sd._udp.{reverse(n)}", "PTR") == [f"z-{n}.{D}."]
    domain = f"z-{n}.{D}"
    types = dig(lan, host, server, f"_services._dns-sd._udp.{domain}", "PTR")
    assert f"_ipp._tcp.{domain}." in types and f"_uscan._tcp.{domain}." in types
    got = published(lan, host, server, domain, ("_ipp", "_ipps"))
    assert len(got) == PER_TYPE and got == nearest_says(lan, host, n, "printer"), (host, n)
    assert {(f"10.9.{n}.{50 + j}", 631) for j in range(3)} <= got  # its own zone's printers
    got = published(lan, host, server, domain, ("_uscan", "_uscans"))
    assert got and got == nearest_says(lan, host, n, "scanner"), (host, n)
    universal = dig(lan, host, server, f"_universal._sub._ipp._tcp.{domain}", "PTR")
    assert sorted(universal) == sorted(dig(lan, host, server, f"_ipp._tcp.{domain}", "PTR"))
    inst = f"Printer\\032{n}0._ipp._tcp.{domain}"  # one of the zone's own
    txt = " ".join(dig(lan, host, server, inst, "TXT"))
    assert f'"note=main, floor 0, Z{n}"' in txt and '"rp=ipp/print"' in txt, txt


@pytest.mark.parametrize("host", sorted(CLIENTS))
def test_dig_sees_exactly_its_zones_nearest(net: Lan, daemon: DaemonProcess, host: int) -> None:
    n = CLIENTS[host]
    server = f"10.9.{n}.1"
    assert dig(net, host, server, f"lb._dns-sd._udp.{D}", "PTR") == [f"z-{n}.{D}."]
    check_client(net, host, n, server)


DOCS = Path(__file__).resolve().parent.parent / "docs" / "dnssd.md"
# What the test adds to the documented configuration: where this Unbound runs.
UNBOUND_LOCAL = """server:
    interface: {listen}
    port: 53
    access-control: 10.9.0.0/16 allow
    do-ip6: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: "{dir}/unbound.pid"
    use-syslog: no
    logfile: "{dir}/unbound.log"
    verbosity: 1
"""


def documented_unbound() -> str:
    """Return the Unbound configuration docs/dnssd.md shows (its first conf block there)."""
    text = DOCS.read_text()
    section = text[text.index("### Unbound") :]
    block = section[section.index("```conf\n") + 8 :]
    return block[: block.index("```")]


@pytest.fixture(scope="module")
def unbound(net: Lan, daemon: DaemonProcess) -> Iterator[Path]:
    require_tools("unbound", "unbound-checkconf")
    d = net.tmp / "unbound"
    d.mkdir()
    listen = "\n    interface: ".join(f"10.9.{n}.2" for n in (1, 2, 3))
    local = UNBOUND_LOCAL.format(listen=listen, dir=d)
    conf = d / "unbound.conf"
    conf.write_text(local + documented_unbound().removeprefix("server:\n"))
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = net.popen(RESOLVER, ["unbound", "-d", "-c", str(conf)], log="unbound.out")
    wait_for(
        "unbound answers",
        lambda: dig(net, 2, "10.9.1.2", D, "SOA") or proc.poll() is not None,
        timeout=20,
    )
    assert proc.poll() is None, net.log("unbound.out") + (d / "unbound.log").read_text()
    yield conf


@pytest.mark.parametrize("host", sorted(CLIENTS))
def test_through_unbound(net: Lan, unbound: Path, host: int) -> None:
    n = CLIENTS[host]
    server = f"10.9.{n}.2"
    # Unbound's ECS carries the client's /24, so even the domain's own browse names are
    # answered for the client, not for the resolver.
    assert dig(net, host, server, f"lb._dns-sd._udp.{D}", "PTR") == [f"z-{n}.{D}."]
    check_client(net, host, n, server)


def documented_bind() -> tuple[str, str]:
    """Return the BIND options lines and the zone lines docs/dnssd.md shows."""
    text = DOCS.read_text()
    section = text[text.index("### BIND 9") :]
    block = section[section.index("```conf\n") + 8 :]
    block = block[: block.index("```")]
    opts = block[block.index("options {") + 9 : block.index("};")]
    return opts, block[block.index("};") + 2 :]


@pytest.fixture(scope="module")
def bind(net: Lan, daemon: DaemonProcess) -> Iterator[Path]:
    """BIND 9 as the resolver on 10.9.N.3 (host 6), configured as docs/dnssd.md says."""
    require_tools("named", "named-checkconf")
    d = net.tmp / "bind"
    d.mkdir()
    for n in (1, 2, 3):
        net._ip("-n", net.ns(RESOLVER), "addr", "add", f"10.9.{n}.3/24", "dev", "eth0")
    opts, zones = documented_bind()
    listen = " ".join(f"10.9.{n}.3;" for n in (1, 2, 3))
    conf = d / "named.conf"
    conf.write_text(
        "options {\n"
        f'    directory "{d}";\n    pid-file "{d}/named.pid";\n'
        f"    listen-on port 53 {{ {listen} }};\n    listen-on-v6 {{ none; }};\n"
        "    recursion yes;\n    allow-query { any; };\n    allow-recursion { any; };\n"
        f"{opts}}};\n{zones}"
    )
    check = subprocess.run(["named-checkconf", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = net.popen(RESOLVER, ["named", "-g", "-c", str(conf)], log="named.out")
    wait_for(
        "named answers",
        lambda: dig(net, 2, "10.9.1.3", D, "SOA") or proc.poll() is not None,
        timeout=30,
    )
    assert proc.poll() is None, net.log("named.out")
    yield conf


@pytest.mark.parametrize("host", sorted(CLIENTS))
def test_through_bind(net: Lan, bind: Path, host: int) -> None:
    n = CLIENTS[host]
    check_client(net, host, n, f"10.9.{n}.3")


def test_avahi_wide_area_browses_and_resolves(net: Lan, unbound: Path) -> None:
    require_tools("avahi-daemon", "avahi-browse", "dbus-daemon")
    host, n = 3, 2
    etc = Path("/etc/netns") / net.ns(host)
    etc.mkdir(parents=True, exist_ok=True)
    try:
        (etc / "resolv.conf").write_text(f"nameserver 10.9.{n}.2\n")
        net.avahi_node(host, browse_domains=D)
        domain = f"z-{n}.{D}"
        proc = net.in_node(
            host, ["avahi-browse", "-r", "-t", "-p", "-d", domain, "_ipp._tcp"], log="browse.log"
        )
        proc.wait(60)
        lines = [x.split(";") for x in net.log("browse.log").splitlines() if x.startswith("=")]
    finally:
        (etc / "resolv.conf").unlink(missing_ok=True)
        etc.rmdir()
    resolved = {(f[7], int(f[8])) for f in lines}
    want = {(h, p) for h, p in nearest_says(net, host, n, "printer") if p == 631}
    ipp = {(addr, port) for (addr, port) in published(net, host, f"10.9.{n}.1", domain, ("_ipp",))}
    assert resolved == ipp and ipp <= want, (lines, want)
    names = {f[3].replace("\\032", " ") for f in lines}  # avahi -p escapes spaces
    assert all(re.fullmatch(r"Printer \d\d( \(\d\))?", x) for x in names), names


def test_goodbye_vanishes_within_ttl_and_comes_back(net: Lan, daemon: DaemonProcess) -> None:
    peer = net.zeroconf(PEERS)
    spec = {
        "type": "_ipp._tcp.local.",
        "host": "life.local.",
        "port": 631,
        # In z-2, which has three static printers: static devices win ties (cost 0 inside
        # the zone), so this one is the fourth of per_type.
        "addresses": ["10.9.2.77"],
        "txt": {"txtvers": "1", "rp": "ipp/print", "UUID": LIFE_UUID, "note": "Z2"},
    }
    server, host = "10.9.2.1", 3
    domain = f"_ipp._tcp.z-2.{D}"

    def names() -> list[str]:
        return dig(net, host, server, domain, "PTR")

    before = names()
    peer.register("life", "ZC Life", **spec)
    wait_for("published", lambda: any("ZC\\032Life" in x for x in names()), timeout=20)
    srv = dig(net, host, server, f"ZC\\032Life.{domain}", "SRV")
    assert srv == [f"0 0 631 h-10-9-2-77.{D}."]
    t0 = time.monotonic()
    peer.unregister("life")
    wait_for("gone", lambda: not any("ZC\\032Life" in x for x in names()), timeout=TTL + 1)
    assert time.monotonic() - t0 <= TTL + 1
    assert names() == before
    peer.register("life", "ZC Life", **spec)
    wait_for("back", lambda: any("ZC\\032Life" in x for x in names()), timeout=20)
    peer.close()


EVE_PORT = 8631


@pytest.fixture(scope="module")
def eve(net: Lan, daemon: DaemonProcess) -> Iterator[Any]:
    """CUPS's ippeveprinter on host 5 (10.9.2.20, zone z-2), announced by its avahi."""
    require_tools("avahi-daemon", "ippeveprinter")
    net._ip("-n", net.ns(PEERS), "addr", "flush", "dev", "eth0")
    net._ip("-n", net.ns(PEERS), "addr", "add", "10.9.2.20/24", "dev", "eth0")
    net.avahi_node(PEERS, host="eveprinter")
    formats = "application/pdf,image/pwg-raster,image/jpeg"
    printer = net.ippeveprinter(PEERS, "Eve Printer", EVE_PORT, "Z2", extra=["-v", "-f", formats])
    try:
        yield printer
    finally:
        Lan.stop(printer)


def test_cups_adds_the_printer_dnssd_answers_and_a_job_reaches_it(
    net: Lan, eve: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """ippeveprinter announced over mDNS is found by the daemon, published by unicast
    DNS-SD, and a client's cupsd adds it from the SRV/A answer (lpadmin -m everywhere)."""
    require_tools("cupsd", "lpadmin", "lp", "lpstat")
    from cups_peer import PrivateCups, short_tempdir

    host, n, port = 3, 2, EVE_PORT
    server = f"10.9.{n}.1"
    domain = f"_ipp._tcp.z-{n}.{D}"
    wait_for(
        "ippeveprinter published by DNS-SD",
        lambda: any("Eve\\032Printer" in x for x in dig(net, host, server, domain, "PTR")),
        timeout=30,
    )
    inst = next(x for x in dig(net, host, server, domain, "PTR") if "Eve\\032Printer" in x)
    _, _, srv_port, target = dig(net, host, server, inst, "SRV")[0].split()
    (address,) = dig(net, host, server, target, "A")
    txt = dig(net, host, server, inst, "TXT")[0]
    rp = re.search(r'"rp=([^"]*)"', txt)
    assert rp is not None, txt
    assert (address, int(srv_port)) == ("10.9.2.20", port)
    uri = f"ipp://{address}:{srv_port}/{rp.group(1)}"
    with net.netns(host):
        cups = PrivateCups(short_tempdir("dnssd-cups"))
    try:
        cups.tool("lpadmin", "-p", "eve", "-E", "-v", uri, "-m", "everywhere")
        doc = tmp_path_factory.mktemp("job") / "page.pdf"
        doc.write_bytes(MINIMAL_PDF)
        cups.tool("lp", "-d", "eve", "-o", "raw", str(doc))
        log = f"ippeve-{PEERS}-{port}.log"
        wait_for(
            "the job reached ippeveprinter and completed",
            lambda: (
                "eve-" in cups.tool("lpstat", "-W", "completed", "-o", "eve")
                and re.search(r"(Print-Job|Send-Document) successful-ok", net.log(log))
            ),
            timeout=60,
            show=lambda: net.log(log)[-3000:] + cups.tool("lpstat", "-W", "all", "-o"),
        )
    finally:
        cups.stop()


MINIMAL_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


@pytest.fixture(scope="module")
def polling(net: Lan, eve: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second nearestd on host 6 (10.9.2.2:8053) that polls what it discovers, every second.

    Its own daemon: the first one's static printers do not exist, so a poller would (rightly)
    take them all out of its answers.
    """
    d = tmp_path_factory.mktemp("dnssd-poll")
    site = d / "site.geojson"
    z2 = zone_feature("z-2", lab_square(3), ["10.9.2.0/24"], name="Z2")
    site.write_text(json.dumps({"type": "FeatureCollection", "features": [z2]}))
    cfg = write_config(
        d,
        sections={
            "daemon": {"listen": [f"unix://{d}/query.sock"]},
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "60s"},
            "poller": {"enabled": True, "interval": "1s", "timeout": "1s", "max_backoff": "2s"},
            "dnssd": {"listen": ["10.9.2.2:8053"], "domain": D, "ttl": f"{TTL:g}s"},
        },
        maps=[str(site)],
        subnets=[],
    )
    proc = DaemonProcess(cfg, netns=net.ns(RESOLVER)).wait_ready()
    try:
        yield "10.9.2.2"
    finally:
        proc.stop()


def test_a_printer_that_stops_answering_vanishes_and_comes_back(
    net: Lan, eve: Any, polling: str
) -> None:
    host, domain = 3, f"_ipp._tcp.z-2.{D}"

    def names() -> list[str]:
        return dig(net, host, polling, "-p", "8053", domain, "PTR")

    wait_for("published", lambda: any("Eve\\032Printer" in x for x in names()), timeout=30)
    t0 = time.monotonic()
    os.killpg(eve.pid, signal.SIGSTOP)  # alive on mDNS (its avahi), silent over IPP
    try:
        # One poll interval (1 s, +10% jitter) and one poll timeout (1 s) to notice it, then
        # the records go at once: a resolver's copy lives at most TTL more.
        wait_for("gone", lambda: not any("Eve" in x for x in names()), timeout=2.2 + TTL + 1)
        assert time.monotonic() - t0 <= 2.2 + TTL + 1
    finally:
        os.killpg(eve.pid, signal.SIGCONT)
    wait_for("back", lambda: any("Eve\\032Printer" in x for x in names()), timeout=20)
