"""A bounded mDNS flood on the isolated test LAN against a daemon with small caps.

The daemon (host 1) keeps at most 40 discovered devices, 10 per source address. A raw
announcer (host 2) floods: first 30 printers at one address (its share is 10), then 100
over ten more addresses (the table fills). Then a printer seen before the flood comes
back, a printer a site-map pin names arrives, and a stranger arrives: the first two are
admitted, the stranger is refused and counted; nothing is evicted; the static printer
and the pinned one rank before every flood printer at equal cost.
"""

from __future__ import annotations

import json
import time
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

MAX_DEVICES, PER_SOURCE = 40, 10
STATIC_ID = "static-flood-lab"


def site(lan: Lan) -> dict[str, Any]:
    def point(**props: Any) -> dict[str, Any]:
        base = {"feature_type": "device", "site": "lab", "building": "main", "level": 0}
        return {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [4.90015, 52.37015]},
            "properties": {**base, **props},
        }

    return {
        "type": "FeatureCollection",
        "features": [
            zone_feature("z-lan", lab_square(0), [lan.subnet]),
            point(
                static=True,
                id=STATIC_ID,
                name="Static Lab Printer",
                kind="printer",
                uri="ipp://198.18.77.250:631/ipp/print",
            ),
            point(match={"name": "Pinned Newcomer"}, subnets=[f"{lan.ip(3)}/32"]),
        ],
    }


@pytest.fixture(scope="module")
def daemon(lan: Lan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("mdns-flood")
    (d / "site.geojson").write_text(json.dumps(site(lan)))
    cfg = write_config(
        d,
        sections={
            "discovery": {
                "enabled": True,
                "interfaces": ["eth0"],
                "expire_after": "120s",
                "max_devices": MAX_DEVICES,
                "max_devices_per_source": PER_SOURCE,
            },
        },
        maps=[str(d / "site.geojson")],
        subnets=[],
    )
    proc = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


def spec(lan: Lan, host: int, hostname: str) -> dict[str, Any]:
    return {
        "type": "_ipp._tcp.local.",
        "host": hostname,
        "port": 631,
        "addresses": [lan.ip(host)],
        "txt": {"txtvers": "1", "rp": "ipp/print"},
    }


def flood(raw: RawAnnouncer, names: range, address: Any) -> None:
    for i in names:
        raw.send(
            announcement([f"Flood {i}".encode()], [address(i)], host=[f"fl{i}".encode(), b"local"])
        )
        if i % 20 == 19:
            time.sleep(0.05)  # bounded bursts: the point is the table, not the socket buffer


def test_a_full_table_admits_known_and_pinned_devices_and_evicts_none(
    lan: Lan, daemon: DaemonProcess
) -> None:
    with lan.netns(2) as address:
        raw = RawAnnouncer(address)
    try:
        # Seen once, then gone (a goodbye: TTL 0), as a printer that restarts.
        def known_packet(ttl: int) -> bytes:
            return announcement([b"Known Printer"], [lan.ip(4)], host=[b"known", b"local"], ttl=ttl)

        # Announced again at each look, as responders repeat themselves (UDP may drop one).
        wait_for(
            "the known printer",
            lambda: raw.send(known_packet(120)) or "Known Printer" in devices_by_name(daemon),
        )
        wait_for(
            "the known printer gone",
            lambda: raw.send(known_packet(0)) or "Known Printer" not in devices_by_name(daemon),
        )
        flood(raw, range(30), lambda i: "198.18.77.100")
        stats = wait_for(
            "one source's share",
            lambda: (s := discovery_stats(daemon))["services_refused"].get("source-cap", 0) >= 15 and s,
            timeout=20.0,
        )
        # Other hosts of the shared test LAN may have devices too: count the flood's.
        assert sum(n.startswith("Flood ") for n in devices_by_name(daemon)) == PER_SOURCE, stats
        flood(raw, range(30, 130), lambda i: f"198.18.77.{101 + i % 10}")
        stats = wait_for(
            "a full table",
            lambda: (
                (s := discovery_stats(daemon))["devices"] >= MAX_DEVICES
                and s["services_refused"].get("table-full", 0) >= 1
                and s
            ),
            timeout=20.0,
        )
        flood_names = {n for n in devices_by_name(daemon) if n.startswith("Flood ")}
        assert len(flood_names) > PER_SOURCE and stats["devices"] == MAX_DEVICES, stats

        # The stranger first: once the two announced after it are in, it has been heard.
        stranger = lan.zeroconf(6)
        stranger.register("s", "Stranger", **spec(lan, 6, "stranger.local."))
        known = lan.zeroconf(4)  # back, now from the real responder
        known.register("k", "Known Printer", **spec(lan, 4, "known.local."))
        pinned = lan.zeroconf(3)
        pinned.register("p", "Pinned Newcomer", **spec(lan, 3, "pinned.local."))
        wait_for(
            "the known and the pinned printers admitted",
            lambda: {"Known Printer", "Pinned Newcomer"} <= set(devices_by_name(daemon)),
            timeout=15.0,
        )
        names = set(devices_by_name(daemon))
        assert "Stranger" not in names
        assert flood_names <= names  # nothing evicted
        assert discovery_stats(daemon)["services_refused"]["table-full"] >= 2

        reply = ask(daemon, {"op": "nearest", "kind": "printer", "k": 3, "client_ip": lan.ip(5)})
        top = [d["name"] for d in reply["devices"]]
        assert set(top[:2]) == {"Static Lab Printer", "Pinned Newcomer"}, top
        pinned.close()
        stranger.close()
        known.close()
    finally:
        raw.close()
