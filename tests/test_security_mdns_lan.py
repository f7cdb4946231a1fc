"""Hostile mDNS on the isolated test LAN: hand-built packets from a raw announcer (host 2).

The daemon browses host 1's ``eth0``. Every class of bad instance name (control bytes,
bytes 0x80 and up, over-long labels and names, empty labels) is announced; each is
refused, counted and logged once, and a printer announced afterwards by a real
python-zeroconf responder is discovered. Devices announced at addresses no device may
have (loopback, unspecified, multicast, link-local, the daemon's own) or with request
paths that are not plain (``rp``/``rs`` with ``..``, ``?``, ``%``) are never placed,
served or polled.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lan import Lan
from mdns_raw import RawAnnouncer, announcement
from support import (
    DaemonProcess,
    ask,
    devices_by_name,
    discovery_stats,
    lab_square,
    wait_for,
    write_config,
    zone_feature,
)

pytestmark = [pytest.mark.lan, pytest.mark.realpeer]

# Instance names as raw labels, by class.
CONTROL = [[b"Bad" + bytes([c]) + b"name"] for c in [*range(0x20), 0x7F]]
HIGH = [[b"\xff" * 30], [b"Caf\xe9 \x80\x81"], ["Ünïcödé ".encode() * 6]]
LONG = [[b"L" * 64], [b"M" * 200], [b"n" * 60, b"o" * 60, b"p" * 60, b"q" * 60, b"r" * 60]]
EMPTY = [[b""], [b"."], [b"a..b"], [b".lead"], [b"trail."]]
BAD_NAMES = CONTROL + HIGH + LONG + EMPTY
PINNED_UUID = "0b9e6a52-1c1d-4f00-9a00-0000000f0001"
UNPINNED_UUID = "0b9e6a52-1c1d-4f00-9a00-0000000f0002"


@pytest.fixture(scope="module")
def daemon(lan: Lan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("mdns-hostile")
    site = {
        "type": "FeatureCollection",
        "features": [
            zone_feature("z-lan", lab_square(0), [lan.subnet, "169.254.0.0/16"]),
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [4.9001, 52.3701]},
                "properties": {
                    "feature_type": "device",
                    "site": "lab",
                    "building": "main",
                    "level": 0,
                    "match": {"uuid": PINNED_UUID},
                    "subnets": [f"{lan.ip(3)}/32"],
                },
            },
        ],
    }
    (d / "site.geojson").write_text(json.dumps(site))
    cfg = write_config(
        d,
        sections={
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "60s"},
            "poller": {"enabled": True, "interval": "0.5s", "timeout": "1s"},
            "logging": {"level": "info"},
        },
        maps=[str(d / "site.geojson")],
        subnets=[],
    )
    proc = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def raw(lan: Lan) -> Iterator[RawAnnouncer]:
    with lan.netns(2) as address:
        announcer = RawAnnouncer(address)  # the socket stays in host 2's namespace
    try:
        yield announcer
    finally:
        announcer.close()


def answered(daemon: DaemonProcess, client_ip: str, kind: str = "printer") -> list[str]:
    reply = ask(daemon, {"op": "nearest", "kind": kind, "k": 20, "client_ip": client_ip})
    return [d["name"] for d in reply["devices"]]


def test_bad_names_are_refused_and_discovery_carries_on(
    lan: Lan, daemon: DaemonProcess, raw: RawAnnouncer
) -> None:
    def send_all() -> None:
        for i, labels in enumerate(BAD_NAMES):
            raw.send(announcement(labels, [lan.ip(2)], host=[f"bad{i}".encode(), b"local"]))

    # Sent again at each look (UDP may drop one): repeats must not log or count again.
    wait_for(
        "the control-byte names counted",
        lambda: (
            send_all()
            or discovery_stats(daemon).get("services_refused", {}).get("bad-name", 0)
            >= len(CONTROL)
        ),
        timeout=15.0,
    )
    # Announced afterwards by a real responder on another host: discovered.
    peer = lan.zeroconf(3)
    peer.register(
        "after",
        "Printer After Flood",
        type="_ipp._tcp.local.",
        host="after.local.",
        port=631,
        addresses=[lan.ip(3)],
        txt={"txtvers": "1", "rp": "ipp/print"},
    )
    wait_for("the printer announced afterwards", lambda: "Printer After Flood" in devices_by_name(daemon))
    assert "Printer After Flood" in answered(daemon, lan.ip(3))
    # More bad names after it, then one more printer: still discovering.
    for labels in CONTROL[:5]:
        raw.send(announcement(labels, [lan.ip(2)]))
    good = announcement([b"Raw Good Printer"], [lan.ip(2)], host=[b"raw-good", b"local"])
    wait_for(
        "a good raw announcement",
        lambda: raw.send(good) or "Raw Good Printer" in devices_by_name(daemon),
    )
    refused = discovery_stats(daemon)["services_refused"]
    logs = daemon.logs()
    assert logs.count("Bad\\\\x1bname") == 1 or logs.count("Bad\\x1bname") == 1, refused
    assert "\x1b" not in logs  # escaped, never raw
    assert logs.count('event="mDNS service refused"') == sum(refused.values())
    assert discovery_stats(daemon)["running"] is True
    names = set(devices_by_name(daemon))
    assert not any(n.startswith("Bad") for n in names)
    peer.close()


ADDRESS_CASES = {
    "Loopback Printer": (["127.0.0.1"], "address-loopback"),
    "Unspecified Printer": (["0.0.0.0"], "address-unspecified"),
    "Multicast Printer": (["224.0.0.1"], "address-multicast"),
    "Link Local Printer": (["169.254.9.9"], "address-link-local"),
    "Own Address Printer": (["{own}"], "address-own-address"),
}


def test_refused_addresses_and_paths_are_never_placed_served_or_polled(
    lan: Lan, daemon: DaemonProcess, raw: RawAnnouncer
) -> None:
    # Listeners on the daemon's host, where a poll of a refused address would land.
    traps = []
    with lan.netns(1):
        for host in ("127.0.0.1", lan.ip(1)):
            for port in (631, 8080):
                trap = socket.socket()
                trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                trap.bind((host, port))
                trap.listen(16)
                trap.setblocking(False)
                traps.append(trap)
    packets = []
    for i, (name, (addrs, _)) in enumerate(ADDRESS_CASES.items()):
        addresses = [a.format(own=lan.ip(1)) for a in addrs]
        packets.append(
            announcement([name.encode()], addresses, host=[f"addr{i}".encode(), b"local"])
        )
    packets.append(
        announcement(
            [b"Traversal Printer"],
            [lan.ip(2)],
            txt=[b"txtvers=1", b"rp=../../etc/passwd"],
            host=[b"trav", b"local"],
        )
    )
    packets.append(
        announcement(
            [b"Secret Scanner"],
            [lan.ip(2)],
            port=8080,
            service=[b"_uscan", b"_tcp", b"local"],
            txt=[b"rs=admin/secret?token=1"],
            host=[b"scan", b"local"],
        )
    )
    # Both: a real address beside loopback keeps the device, at its real address only.
    packets.append(
        announcement([b"Mixed Printer"], ["127.0.0.1", lan.ip(2)], host=[b"mixed", b"local"])
    )

    def send_all() -> None:  # again at each look: UDP may drop one, repeats count once
        for packet in packets:
            raw.send(packet)

    mixed = wait_for(
        "the mixed printer", lambda: send_all() or devices_by_name(daemon).get("Mixed Printer")
    )
    assert mixed["endpoints"] == [
        f"ipp://{lan.ip(2)}:631/ipp/print",
        "ipp://mixed.local:631/ipp/print",
    ]
    stats = wait_for(
        "every refusal counted",
        lambda: (
            (send_all() or (s := discovery_stats(daemon)))
            and {why for _, why in ADDRESS_CASES.values()} <= set(s.get("services_refused", {}))
            and s.get("txt_problems", {}).get("bad-path", 0) >= 2
            and s
        ),
        timeout=15.0,
    )
    names = set(devices_by_name(daemon))
    for bad in [*ADDRESS_CASES, "Traversal Printer", "Secret Scanner"]:
        assert bad not in names, (bad, stats)
        assert bad not in answered(daemon, lan.ip(2))
    assert "Secret Scanner" not in answered(daemon, lan.ip(2), "scanner")
    # The poller polls the mixed printer at its LAN address, never the daemon's host.
    wait_for(
        "polls of the mixed printer",
        lambda: ask(daemon, {"op": "stats"}, admin=True)["stats"]["poller"]["polls_total"] >= 3,
    )
    for listener in traps:
        with pytest.raises(BlockingIOError):
            listener.accept()
        listener.close()


def ipp_spec(lan: Lan, host: int, hostname: str, uuid: str, type_: str) -> dict[str, Any]:
    return {
        "type": type_,
        "host": hostname,
        "port": 631,
        "addresses": [lan.ip(host)],
        "txt": {"txtvers": "1", "rp": "ipp/print", "UUID": uuid},
    }


@pytest.mark.parametrize(("uuid", "why"), [(UNPINNED_UUID, "held by"), (PINNED_UUID, "pinned")])
def test_a_second_host_cannot_take_over_a_known_uuid(
    lan: Lan, daemon: DaemonProcess, uuid: str, why: str
) -> None:
    real_name, rogue_name = f"Real {why}", f"Rogue {why}"
    real = lan.zeroconf(3)
    real.register(
        "r", real_name, **ipp_spec(lan, 3, f"real-{why[:4]}.local.", uuid, "_ipp._tcp.local.")
    )
    wait_for("the real printer", lambda: real_name in devices_by_name(daemon))
    before = devices_by_name(daemon)[real_name]
    rogue = lan.zeroconf(5)
    rogue.register(
        "x", rogue_name, **ipp_spec(lan, 5, f"rogue-{why[:4]}.local.", uuid, "_ipps._tcp.local.")
    )
    held = wait_for(
        "the rogue claim quarantined",
        lambda: (d := devices_by_name(daemon).get(rogue_name)) and d.get("quarantined") and d,
        timeout=15.0,
    )
    assert "claims the uuid" in held["quarantined"], held
    now = devices_by_name(daemon)[real_name]
    assert now["id"] == before["id"] and now["uri"] == f"ipp://{lan.ip(3)}:631/ipp/print"
    assert all(lan.ip(5) not in e for e in now["endpoints"])
    served = ask(daemon, {"op": "nearest", "kind": "printer", "k": 20, "client_ip": lan.ip(5)})
    uris = [d["uri"] for d in served["devices"]]
    assert f"ipp://{lan.ip(3)}:631/ipp/print" in uris
    assert not any(lan.ip(5) in u for u in uris)
    logs = daemon.logs()
    assert logs.count('event="device quarantined"') >= 1 and uuid in logs
    rogue.close()
    real.close()
