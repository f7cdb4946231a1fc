"""Rogue mDNS announcements on the isolated test LAN, from real python-zeroconf peers.

The daemon browses host 1's ``eth0``. A pin by name gives "Finance LaserJet" to the
finance zone (host 2's address); a pin by UUID names its own ``subnets`` (host 3).
Rogues on host 5 claim both identities and must be quarantined: never answered, listed
by ``nearestctl devices`` with the reason, counted, logged once. The real devices,
announcing from where their pins say, are accepted.
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
from support import DaemonProcess, ask, lab_square, wait_for, write_config, zone_feature

pytestmark = [pytest.mark.lan, pytest.mark.realpeer]

PINNED_UUID = "0b9e6a52-1c1d-4f00-9a00-0000000e0001"
NAME = "Finance LaserJet"


def site(lan: Lan) -> dict[str, Any]:
    def zone(k: int, zid: str, subnets: list[str]) -> Any:
        return zone_feature(zid, lab_square(k), subnets)

    def pin(k: int, match: dict[str, str], **extra: Any) -> Any:
        lon, lat = 4.9 + k * 0.0003 + 0.0001, 52.3701
        return {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": {
                "feature_type": "device",
                "site": "lab",
                "building": "main",
                "level": 0,
                "match": match,
                **extra,
            },
        }

    feats = [
        zone(0, "z-fin", [f"{lan.ip(2)}/32"]),
        zone(1, "z-lab", [f"{lan.ip(3)}/32"]),
        zone(2, "z-pub", [f"{lan.ip(5)}/32", f"{lan.ip(6)}/32"]),
        pin(0, {"name": NAME}),  # may announce from z-fin's subnets
        pin(1, {"uuid": PINNED_UUID}, subnets=[f"{lan.ip(3)}/32"]),
    ]
    return {"type": "FeatureCollection", "features": feats}


@pytest.fixture(scope="module")
def daemon(lan: Lan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("rogue-lan")
    (d / "site.geojson").write_text(json.dumps(site(lan)))
    cfg = write_config(
        d,
        sections={
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "30s"},
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


def inventory(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return list(ask(daemon, {"op": "devices"}, admin=True)["devices"])


def answered(daemon: DaemonProcess, client_ip: str) -> list[str]:
    reply = ask(daemon, {"op": "nearest", "kind": "printer", "k": 20, "client_ip": client_ip})
    return [d["name"] for d in reply["devices"]]


def spec(lan: Lan, host: int, hostname: str, txt: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "_ipp._tcp.local.",
        "host": hostname,
        "port": 631,
        "addresses": [lan.ip(host)],
        "txt": {"txtvers": "1", "rp": "ipp/print", **txt},
    }


def test_rogue_claims_are_quarantined_and_real_devices_accepted(
    lan: Lan, daemon: DaemonProcess
) -> None:
    rogue = lan.zeroconf(5)
    rogue.register("name", NAME, **spec(lan, 5, "rogue-a.local.", {"ty": "Evil Twin"}))
    rogue.register("uuid", "Lab Plotter", **spec(lan, 5, "rogue-b.local.", {"UUID": PINNED_UUID}))
    held = wait_for(
        "two quarantined claims",
        lambda: (q := [d for d in inventory(daemon) if d.get("quarantined")]) and len(q) >= 2 and q,
        timeout=15.0,
    )
    reasons = {d["name"]: d["quarantined"] for d in held}
    assert f"from {lan.ip(5)}, outside {lan.ip(2)}/32" in reasons[NAME]
    assert "claims the name" in reasons[NAME]
    assert "claims the uuid" in reasons["Lab Plotter"]
    for client in (lan.ip(2), lan.ip(3), lan.ip(5)):
        names = answered(daemon, client)
        assert NAME not in names and "Lab Plotter" not in names
    # nearestctl shows them with the reason.
    out = subprocess.run(
        [sys.executable, "-m", "nearestd.ctl", "--socket", str(daemon.admin), "devices"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "quarantined (claims the name" in out and "quarantined (claims the uuid" in out
    sec = ask(daemon, {"op": "stats"}, admin=True)["stats"]["security"]
    assert sec["devices_quarantined"] >= 2
    time.sleep(1.5)  # announcements repeat; the log line must not
    assert daemon.logs().count('event="device quarantined"') == sec["devices_quarantined_total"]
    rogue.unregister("name")
    rogue.unregister("uuid")
    rogue.close()

    real = lan.zeroconf(2)
    real.register("name", NAME, **spec(lan, 2, "fin-lj.local.", {"ty": "HP LaserJet"}))
    lab = lan.zeroconf(3)
    lab.register("uuid", "Lab Plotter", **spec(lan, 3, "lab-pl.local.", {"UUID": PINNED_UUID}))
    wait_for("the real finance printer", lambda: NAME in answered(daemon, lan.ip(2)), 15.0)
    wait_for("the real lab plotter", lambda: "Lab Plotter" in answered(daemon, lan.ip(3)), 15.0)
    placed = {d["name"]: d for d in inventory(daemon) if not d.get("quarantined")}
    assert placed[NAME]["placed_by"] == "pin" and placed[NAME]["zone"] == "z-fin"
    assert placed["Lab Plotter"]["placed_by"] == "pin" and placed["Lab Plotter"]["zone"] == "z-lab"
    real.close()
    lab.close()


def test_site_map_pin_subnets_are_validated(tmp_path: Path) -> None:
    from nearestd.core.sitemap import SiteMapError, build_sitemap

    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [lab_square(0)]},
                "properties": {
                    "feature_type": "zone",
                    "id": "z",
                    "site": "s",
                    "building": "b",
                    "level": 0,
                    "name": "Z",
                },
            },
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [4.9001, 52.3701]},
                "properties": {
                    "feature_type": "device",
                    "site": "s",
                    "building": "b",
                    "level": 0,
                    "match": {"name": "x"},
                    "subnets": ["10.0.0.0/33"],
                },
            },
        ],
    }
    with pytest.raises(SiteMapError) as err:
        build_sitemap([("m.geojson", doc)])
    assert "feature #1: properties.subnets[0]: bad CIDR '10.0.0.0/33'" in str(err.value)
