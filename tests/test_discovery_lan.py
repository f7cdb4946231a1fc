"""Discovery on the isolated test LAN with real mDNS peers (no mocks of zeroconf).

The daemon runs in host 1 of the namespace LAN, browsing ``eth0`` and ``eth1`` (a second
link). Peers: python-zeroconf responders in their own processes (tests/zc_peer.py),
avahi-daemon with ``avahi-publish-service``, and CUPS's ``ippeveprinter``. Clients ask
through the daemon's Unix sockets on behalf of LAN addresses (a Unix peer is trusted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lan import Lan
from support import (
    DaemonProcess,
    ask,
    lab_square,
    require_tools,
    wait_for,
    write_config,
    zone_feature,
)

pytestmark = [pytest.mark.lan, pytest.mark.realpeer]

EXPIRE_AFTER = 4.0
LAN_PORT = 7310
PIN_UUID = "0b9e6a52-1c1d-4f00-9a00-00000000a001"
LIFE_UUID = "0b9e6a52-1c1d-4f00-9a00-00000000b001"
MERGE_UUID = "0b9e6a52-1c1d-4f00-9a00-00000000c001"
BROKEN_UUID = "0b9e6a52-1c1d-4f00-9a00-00000000d001"
IP_PINNED = "198.18.77.200"
NOWHERE = "198.18.77.201"


def zone(k: int, zid: str, name: str, subnets: list[str], aliases: list[str] | None = None) -> Any:
    return zone_feature(zid, lab_square(k), subnets, name=name, aliases=aliases or [])


def pin(match: dict[str, str], subnets: list[str]) -> Any:
    lon, lat = 4.9 + 3 * 0.0003 + 0.0001, 52.3701
    return {
        "type": "Feature",
        "properties": {
            "feature_type": "device",
            "site": "lab",
            "building": "main",
            "level": 0,
            "match": match,
            "subnets": subnets,
        },
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
    }


def write_site(lan: Lan, path: Path) -> Path:
    """Zones whose subnets are the LAN hosts' /32s, and one pin per pin rule."""
    ip = lan.ip
    features = [
        zone(0, "z-a", "Zone A", [f"{ip(2)}/32", f"{ip(3)}/32", f"{lan.link_ip(8)}/32"]),
        zone(1, "z-b", "Zone B", [f"{ip(4)}/32", f"{ip(5)}/32"]),
        zone(2, "z-c", "Copy Room", [f"{ip(6)}/32"], aliases=["Print corner"]),
        zone(3, "z-d", "Pinned Place", []),
        zone(4, "z-e", "Zone E", [f"{ip(7)}/32", f"{ip(8)}/32"]),
        pin({"uuid": PIN_UUID}, [f"{ip(4)}/32"]),
        pin({"name": "Pinned By Name"}, [f"{ip(4)}/32"]),
        pin({"host": "pinned-host.local"}, [f"{ip(4)}/32"]),
        pin({"ip": f"{IP_PINNED}/32"}, []),
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def daemon(lan: Lan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("disc-lan")
    lan.add_link(1)
    lan.add_link(8)
    site = write_site(lan, d / "lan-site.geojson")
    cfg = write_config(
        d,
        sections={
            "daemon": {
                "listen": [f"tcp://{lan.ip(1)}:{LAN_PORT}", f"unix://{d}/query.sock"],
            },
            "discovery": {
                "enabled": True,
                "interfaces": ["eth0", "eth1"],
                "expire_after": f"{EXPIRE_AFTER}s",
            },
            "logging": {"level": "info"},
        },
        maps=[str(site)],
        subnets=[],
    )
    proc = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


def devices(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    reply = ask(daemon, {"op": "devices"}, admin=True)
    return {d["name"]: d for d in reply["devices"] if d["source"] == "mdns"}


def nearest(daemon: DaemonProcess, client_ip: str, kind: str = "printer") -> list[dict[str, Any]]:
    reply = ask(daemon, {"op": "nearest", "kind": kind, "k": 20, "client_ip": client_ip})
    return list(reply["devices"])


def named(daemon: DaemonProcess, name: str, client_ip: str) -> dict[str, Any] | None:
    return next((d for d in nearest(daemon, client_ip) if d["name"] == name), None)


def test_add_txt_update_address_change_goodbye(lan: Lan, daemon: DaemonProcess) -> None:
    peer = lan.zeroconf(2)
    spec: dict[str, Any] = {
        "type": "_ipp._tcp.local.",
        "host": "zc-life.local.",
        "port": 631,
        "addresses": [lan.ip(2), "2001:db8:77::12"],
        "txt": {"txtvers": "1", "rp": "ipp/print", "UUID": LIFE_UUID, "Color": "F"},
    }
    peer.register("life", "ZC Lifecycle", **spec)
    d = wait_for("added", lambda: named(daemon, "ZC Lifecycle", lan.ip(2)))
    assert d["uri"] == f"ipp://{lan.ip(2)}:631/ipp/print"  # an address literal: no .local needed
    assert d["zone"] == "z-a" and d["capabilities"]["color"] is False
    inv = devices(daemon)["ZC Lifecycle"]
    assert inv["placed_by"] == "subnet"
    assert "ipp://zc-life.local:631/ipp/print" in inv["endpoints"]
    assert "ipp://[2001:db8:77::12]:631/ipp/print" in inv["endpoints"]  # IPv4 first

    spec["txt"] = {**spec["txt"], "Color": "T"}
    peer.update("life", "ZC Lifecycle", **spec)
    wait_for(
        "TXT update",
        lambda: (x := named(daemon, "ZC Lifecycle", lan.ip(2))) and x["capabilities"]["color"],
    )

    spec["addresses"] = [lan.ip(4)]
    peer.update("life", "ZC Lifecycle", **spec)
    d = wait_for("address change", lambda: named(daemon, "ZC Lifecycle", lan.ip(4)))
    assert d["zone"] == "z-b" and d["uri"] == f"ipp://{lan.ip(4)}:631/ipp/print"
    assert devices(daemon)["ZC Lifecycle"]["uri"] == d["uri"]

    t0 = time.monotonic()
    peer.unregister("life")
    wait_for("goodbye", lambda: "ZC Lifecycle" not in devices(daemon), timeout=3)
    assert time.monotonic() - t0 < 2.0
    assert named(daemon, "ZC Lifecycle", lan.ip(4)) is None
    peer.close()


def test_a_client_on_another_host_is_answered_over_tcp(lan: Lan, daemon: DaemonProcess) -> None:
    peer = lan.zeroconf(6)
    peer.register(
        "c",
        "Client Visible",
        host="client-visible.local.",
        addresses=[lan.ip(6)],
        txt={"txtvers": "1", "rp": "ipp/print", "Color": "T"},
    )
    wait_for("device", lambda: "Client Visible" in devices(daemon))
    # The `nearest` command in host 6, located by its own address (zone z-c), over the LAN.
    out = lan.run(
        6,
        [sys.executable, "-m", "nearest_client.cli", "--server", f"tcp://{lan.ip(1)}:{LAN_PORT}",
         "--json", "printer", "--color", "-k", "5"],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["where"]["zone"] == "z-c"
    hit = next(d for d in reply["devices"] if d["name"] == "Client Visible")
    assert hit["uri"] == f"ipp://{lan.ip(6)}:631/ipp/print" and hit["distance_m"] == 0.0
    peer.close()


def test_silent_device_expires_and_answering_one_stays(lan: Lan, daemon: DaemonProcess) -> None:
    silent, alive = lan.zeroconf(3), lan.zeroconf(5)
    silent.register("s", "ZC Silent", host="zc-silent.local.", addresses=[lan.ip(3)])
    alive.register("a", "ZC Alive", host="zc-alive.local.", addresses=[lan.ip(5)])
    wait_for("both", lambda: {"ZC Silent", "ZC Alive"} <= set(devices(daemon)))
    born = time.monotonic()
    silent.kill()  # no goodbye: only expire_after can remove it
    killed = time.monotonic()
    wait_for("expiry", lambda: "ZC Silent" not in devices(daemon), timeout=EXPIRE_AFTER + 4)
    gone_after = time.monotonic() - killed
    # Heard at most one probe interval (expire_after / 3) before the kill.
    assert gone_after >= EXPIRE_AFTER * 2 / 3 - 0.3, gone_after
    # The answering device outlives expire_after: the daemon's probes keep hearing it.
    while time.monotonic() - born < EXPIRE_AFTER * 1.6:
        time.sleep(0.2)
    assert "ZC Alive" in devices(daemon)
    stats = ask(daemon, {"op": "stats"}, admin=True)["stats"]["discovery"]
    assert stats["events"]["expired"] >= 1 and stats["events"]["probes"] >= 1
    alive.close()


def test_sleeping_printer_leaves_and_comes_back(lan: Lan, daemon: DaemonProcess) -> None:
    peer = lan.zeroconf(3)
    spec: dict[str, Any] = {"host": "zc-sleeper.local.", "addresses": [lan.ip(3)]}
    peer.register("z", "ZC Sleeper", **spec)
    wait_for("sleeper", lambda: "ZC Sleeper" in devices(daemon))
    peer.pause()  # asleep: answers nothing, sends no goodbye
    try:
        wait_for("sleeper expired", lambda: "ZC Sleeper" not in devices(daemon), EXPIRE_AFTER + 4)
    finally:
        peer.resume()
    # Its unchanged records are still in python-zeroconf's cache, so the browser stays
    # silent when it speaks again; the daemon must notice anyway.
    peer.update("z", "ZC Sleeper", **spec)
    wait_for("sleeper back", lambda: named(daemon, "ZC Sleeper", lan.ip(3)), timeout=5)
    peer.close()


def test_one_device_across_ipp_ipps_and_lpd_placeholder(lan: Lan, daemon: DaemonProcess) -> None:
    peer = lan.zeroconf(6)
    txt = {"txtvers": "1", "rp": "ipp/print", "UUID": MERGE_UUID, "note": "Print corner"}
    common = {"host": "merged.local.", "addresses": [lan.ip(6)]}
    peer.register("ipp", "Merged MFP", type="_ipp._tcp.local.", port=631, txt=txt, **common)
    peer.register("ipps", "Merged MFP", type="_ipps._tcp.local.", port=631, txt=txt, **common)
    peer.register(
        "lpd", "Merged MFP", type="_printer._tcp.local.", port=0, txt={"UUID": MERGE_UUID}, **common
    )
    peer.register(
        "scan",
        "Merged MFP",
        type="_uscan._tcp.local.",
        port=8080,
        txt={"UUID": MERGE_UUID, "rs": "eSCL", "is": "platen,adf"},
        **common,
    )

    def merged() -> Any:
        inv = ask(daemon, {"op": "devices"}, admin=True)["devices"]
        mine = [d for d in inv if d["id"].endswith(MERGE_UUID)]
        return (
            mine
            if len(mine) == 2 and any("ipps" in e for d in mine for e in d["endpoints"])
            else None
        )

    mine = {d["kind"]: d for d in wait_for("merged", merged)}
    prn, scn = mine["printer"], mine["scanner"]
    assert prn["uri"] == f"ipps://{lan.ip(6)}:631/ipp/print"
    assert not any(e.startswith("lpd:") for e in prn["endpoints"])
    assert f"ipp://{lan.ip(6)}:631/ipp/print" in prn["endpoints"]
    assert prn["capabilities"]["secure"] is True
    assert (prn["zone"], prn["placed_by"]) == ("z-c", "note")  # the alias, not the subnet
    assert scn["uri"] == f"http://{lan.ip(6)}:8080/eSCL/" and scn["capabilities"]["adf"]
    printers = [d for d in nearest(daemon, lan.ip(6)) if d["name"] == "Merged MFP"]
    assert len(printers) == 1
    peer.close()


def test_same_instance_name_on_two_links_kept_apart(lan: Lan, daemon: DaemonProcess) -> None:
    a, b = lan.zeroconf(2), lan.zeroconf(8, iface=lan.link_ip(8))
    a.register("t", "Twin Printer", host="twin.local.", addresses=[lan.ip(2)])
    b.register("t", "Twin Printer", host="twin.local.", addresses=[lan.link_ip(8)])

    def twins() -> Any:
        inv = ask(daemon, {"op": "devices"}, admin=True)["devices"]
        found = [d for d in inv if d["name"] == "Twin Printer"]
        return found if len(found) == 2 else None

    def show() -> Any:
        inv = ask(daemon, {"op": "devices"}, admin=True)["devices"]
        return [(d["id"], d["uri"]) for d in inv if "Twin" in d["name"]], daemon.logs()[-1200:]

    uris = sorted(d["uri"] for d in wait_for("two twins", twins, show=show))
    assert uris == sorted([f"ipp://{lan.ip(2)}:631/", f"ipp://{lan.link_ip(8)}:631/"])
    a.close()
    b.close()


def test_malformed_txt_keeps_device_and_others(lan: Lan, daemon: DaemonProcess) -> None:
    strings = [
        b"txtvers=1",
        b"=no-key",
        b"UUID=" + BROKEN_UUID.encode(),
        b"note=\xff\xfe broken",
        b"Color=T",
        b"color=F",
        b"Duplex",
        b"PaperMax=legal-A4",
        b"ty=" + b"M" * 252,  # a string of the maximum 255 bytes
    ]
    wire = b"".join(bytes([len(s)]) + s for s in strings)
    peer = lan.zeroconf(7)
    peer.register(
        "bad", "Broken TXT", host="broken.local.", addresses=[lan.ip(7)], txt_hex=wire.hex()
    )
    d = wait_for("broken device", lambda: named(daemon, "Broken TXT", lan.ip(7)))
    caps = d["capabilities"]
    assert caps["color"] is True and caps["duplex"] is False and caps["paper_max"] == "legal-A4"
    assert d["make_model"] == "M" * 252
    # A re-announcement logs nothing new: each problem is logged once per service.
    peer.update(
        "bad", "Broken TXT", host="broken.local.", addresses=[lan.ip(7)], txt_hex=wire.hex()
    )
    peer.register("good", "After Broken", host="after.local.", addresses=[lan.ip(7)])
    wait_for("a device after it", lambda: named(daemon, "After Broken", lan.ip(7)))
    problems = ask(daemon, {"op": "stats"}, admin=True)["stats"]["discovery"]["txt_problems"]
    assert problems == {"string-without-key": 1, "non-utf8-value": 1, "duplicate-key": 1}
    assert daemon.logs().count("broken TXT record") == 3
    peer.close()


def test_placement_by_each_rule(lan: Lan, daemon: DaemonProcess) -> None:
    peer = lan.zeroconf(4)
    here = [lan.ip(4)]
    cases = {
        "Pin UUID": ({"UUID": PIN_UUID}, "pin-uuid.local.", here, ("z-d", "pin")),
        "Pinned By Name": ({}, "pin-name.local.", here, ("z-d", "pin")),
        "Host Pinned": ({}, "pinned-host.local.", here, ("z-d", "pin")),
        "IP Pinned": ({}, "pin-ip.local.", [IP_PINNED], ("z-d", "pin")),
        "Note Placed": ({"note": "copy room"}, "note.local.", here, ("z-c", "note")),
        "Subnet Placed": ({}, "subnet.local.", here, ("z-b", "subnet")),
        "Nowhere": ({}, "nowhere.local.", [NOWHERE], (None, None)),
    }
    for i, (name, (txt, host, addrs, _)) in enumerate(cases.items()):
        peer.register(f"p{i}", name, host=host, addresses=addrs, txt={"txtvers": "1", **txt})
    inv = wait_for("all placed", lambda: (x := devices(daemon)) and set(cases) <= set(x) and x)
    for name, (*_, want) in cases.items():
        assert (inv[name]["zone"], inv[name]["placed_by"]) == want, name
    assert inv["Nowhere"]["located"] is False
    answered = {d["name"] for d in nearest(daemon, lan.ip(4))}
    assert set(cases) - {"Nowhere"} <= answered and "Nowhere" not in answered
    # nearestctl devices: every device with kind, state, placement and method; unlocated first.
    out = subprocess.run(
        [sys.executable, "-m", "nearestd.ctl", "--socket", str(daemon.admin), "devices"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    first_located = next(i for i, r in enumerate(rows[1:], 1) if "UNLOCATED" not in r)
    assert any("Nowhere" in r and "UNLOCATED" in r for r in rows[1:first_located])
    assert any("Note Placed" in r and "lab/main/L0/z-c" in r and "note" in r for r in rows)
    stats = ask(daemon, {"op": "stats"}, admin=True)["stats"]
    assert stats["unlocated"] >= 1
    peer.close()


def test_avahi_and_ippeveprinter_peers(lan: Lan, daemon: DaemonProcess) -> None:
    require_tools("avahi-daemon", "avahi-publish-service", "dbus-daemon", "ippeveprinter")
    lan.avahi_node(3, host="office-mfp")
    lan.avahi_publish(
        3,
        "Avahi MFP",
        "_ipp._tcp",
        631,
        {"txtvers": "1", "rp": "ipp/print", "UUID": "6f1c3c1e-0000-4000-8000-0000000000e1",
         "Color": "T", "Duplex": "T", "note": "Zone B", "pdl": "application/pdf"},
    )  # fmt: skip
    lan.avahi_publish(
        3, "Avahi MFP", "_uscan._tcp", 8080,
        {"txtvers": "1", "rs": "eSCL", "UUID": "6f1c3c1e-0000-4000-8000-0000000000e1"},
    )  # fmt: skip
    sim = lan.ippeveprinter(
        3, "Sim IPP Everywhere", 8631, location="Print corner", extra=["-M", "FakeCo", "-m", "Sim"]
    )

    def seen() -> Any:
        inv = ask(daemon, {"op": "devices"}, admin=True)["devices"]
        by = {(d["name"], d["kind"]): d for d in inv}
        want = [
            ("Avahi MFP", "printer"),
            ("Avahi MFP", "scanner"),
            ("Sim IPP Everywhere", "printer"),
        ]
        return by if all(w in by for w in want) else None

    by = wait_for("avahi and ippeveprinter peers", seen, timeout=20)
    mfp = by[("Avahi MFP", "printer")]
    assert mfp["uri"] == f"ipp://{lan.ip(3)}:631/ipp/print"
    assert "ipp://office-mfp.local:631/ipp/print" in mfp["endpoints"]
    assert (mfp["zone"], mfp["placed_by"]) == ("z-b", "note")
    assert by[("Avahi MFP", "scanner")]["uri"] == f"http://{lan.ip(3)}:8080/eSCL/"
    sim_dev = by[("Sim IPP Everywhere", "printer")]
    assert sim_dev["make_model"] == "FakeCo Sim"
    assert sim_dev["uri"].endswith(f"://{lan.ip(3)}:8631/ipp/print")
    assert (sim_dev["zone"], sim_dev["placed_by"]) == ("z-c", "note")
    assert not any(e.startswith("lpd:") for e in sim_dev["endpoints"])  # port-0 _printer
    names = {d["name"] for d in nearest(daemon, lan.ip(6))}
    assert {"Avahi MFP", "Sim IPP Everywhere"} <= names
    # ippeveprinter's goodbye (through avahi, which holds it up to a second) removes it.
    Lan.stop(sim)
    wait_for(
        "ippeveprinter goodbye",
        lambda: (
            ("Sim IPP Everywhere", "printer")
            not in {
                (d["name"], d["kind"])
                for d in ask(daemon, {"op": "devices"}, admin=True)["devices"]
            }
        ),
        timeout=5,
    )


def test_a_flood_of_unresolvable_names_does_not_delay_a_real_printer(
    lan: Lan, daemon: DaemonProcess
) -> None:
    # Runs last in this module: the daemon keeps asking about the fake names for seconds.
    import socket

    from zeroconf._dns import DNSPointer
    from zeroconf._protocol.outgoing import DNSOutgoing
    from zeroconf.const import _CLASS_IN, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_PTR

    fakes = 700  # more than the daemon resolves at once (512)
    with lan.netns(5) as ip:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((ip, 5353))  # mDNS answers must come from port 5353
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
    try:
        for start in range(0, fakes, 50):
            out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
            for n in range(start, start + 50):
                ptr = DNSPointer(
                    "_ipp._tcp.local.", _TYPE_PTR, _CLASS_IN, 120, f"Fake {n}._ipp._tcp.local."
                )
                out.add_answer_at_time(ptr, 0)
            for packet in out.packets():
                s.sendto(packet, ("224.0.0.251", 5353))
    finally:
        s.close()
    wait_for(
        "a backlog",
        lambda: ask(daemon, {"op": "stats"}, admin=True)["stats"]["discovery"]["resolves_deferred"],
        timeout=5,
    )
    peer = lan.zeroconf(5)
    t_ann = peer.register(
        "real", "Real During Flood", host="real-flood.local.", addresses=[lan.ip(5)]
    )
    wait_for("the real printer", lambda: named(daemon, "Real During Flood", lan.ip(5)), timeout=5)
    assert time.time() - t_ann < 1.0  # from the cache at once, not behind the backlog
    assert not any(d["name"].startswith("Fake ") for d in devices(daemon).values())
    peer.close()


def test_ipv6_enabled_daemon_discovers_over_both_families(
    lan: Lan, tmp_path_factory: pytest.TempPathFactory
) -> None:
    d = tmp_path_factory.mktemp("disc-v6")
    cfg = write_config(
        d,
        sections={"discovery": {"enabled": True, "interfaces": ["eth0"], "ipv6": True}},
        maps=[str(write_site(lan, d / "site.geojson"))],
        subnets=[],
    )
    proc = DaemonProcess(cfg, netns=lan.ns(7)).wait_ready()
    peer = lan.zeroconf(6)
    try:
        peer.register("v6", "Dual Stack", host="dual.local.", addresses=[lan.ip(6)])

        def found() -> Any:
            inv = ask(proc, {"op": "devices"}, admin=True)["devices"]
            return next((x for x in inv if x["name"] == "Dual Stack"), None)

        dev = wait_for("discovered with ipv6 on", found, show=proc.logs)
        assert dev["uri"] == f"ipp://{lan.ip(6)}:631/"
        stats = ask(proc, {"op": "stats"}, admin=True)["stats"]["discovery"]
        assert stats["running"] and stats["error"] is None
        assert "cannot bind the mDNS socket" not in proc.logs()
    finally:
        peer.close()
        proc.stop()
