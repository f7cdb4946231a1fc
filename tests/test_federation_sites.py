"""Many sites: a mosquitto per site bridged to a hub, a daemon per segment, real printers.

Topology, all in network namespaces made here (tests/lan.py): three site segments, each a
LAN of two hosts (host 1: the site's broker and daemon; host 2: an ``ippeveprinter``
advertised by its own avahi), and a hub host. Each site host has a point-to-point WAN link
(a veth pair) to the hub. The site brokers are bridged to the hub with the configuration
printed in docs/sites.md, read from there, so the documented bridge is the tested one.

Daemon A has site A's and site B's maps and ``allow_other_sites``; B and C serve themselves.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lan import Lan, can_run
from nearest_client import Client
from support import DaemonProcess, require_tools, skip_or_fail, wait_for, write_config

pytestmark = [pytest.mark.realpeer, pytest.mark.lan]

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "nearest/v1"
SITES = ("site-a", "site-b", "site-c")
GRACE = 4.0
PORT = 8631
# Site-frame geometry (degrees): A's office, A's own printer zone ~400 m east of it, B's lab
# ~40 m east of A's office (another site, so +100 m), C far away.
LAT = 52.37
ZONES: dict[str, list[tuple[str, float, str]]] = {
    "site-a": [("a-office", 4.9000, "10.1.0.0/24"), ("a-far", 4.9060, "10.1.1.0/24")],
    "site-b": [("b-lab", 4.9008, "10.2.0.0/24")],
    "site-c": [("c-hall", 4.9500, "10.3.0.0/24")],
}
PRINTER_ZONE = {"site-a": "a-far", "site-b": "b-lab", "site-c": "c-hall"}
OFFICE_A = "10.1.0.5"
FAR_A = "10.1.1.5"
# A client in each site's printer zone.
CLIENT = {"site-a": FAR_A, "site-b": "10.2.0.5", "site-c": "10.3.0.5"}


def bridge_conf(site: str, hub: str, needs: list[str]) -> str:
    """Return docs/sites.md's bridge block for one site (the tested configuration is the documented one)."""
    text = (ROOT / "docs/sites.md").read_text()
    m = re.search(r"```conf\n(.*?)```", text, re.S)
    assert m, "docs/sites.md lost its bridge configuration block"
    ins = "\n".join(f"topic devices/{s}/# in 1 {PREFIX}/ {PREFIX}/" for s in needs)
    return (
        m.group(1)
        .replace("{SITE}", site)
        .replace("{HUB}", hub)
        .replace("{PREFIX}", PREFIX)
        .replace("{IN}", ins)
    )


def broker_conf(listen: str, extra: str = "") -> str:
    return "\n".join(
        [
            f"listener 1883 {listen}",
            "allow_anonymous true",
            "persistence false",
            "user root",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            extra,
            "",
        ]
    )


def site_map(site: str, printer_ip: str) -> dict[str, Any]:
    features = []
    d = 0.0003
    for zid, lon, clients in ZONES[site]:
        subnets = [clients]
        if PRINTER_ZONE[site] == zid:
            subnets.append(f"{printer_ip}/32")
        ring = [[lon, LAT], [lon + d, LAT], [lon + d, LAT + d], [lon, LAT + d], [lon, LAT]]
        features.append(
            {
                "type": "Feature",
                "properties": {
                    "feature_type": "zone",
                    "id": zid,
                    "site": site,
                    "building": f"{site}-main",
                    "level": 0,
                    "name": zid,
                    "subnets": subnets,
                },
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        )
    return {"type": "FeatureCollection", "features": features}


class Org:
    """Three site segments and a hub, bridged; a daemon and a printer per site."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lans = {s: Lan(n_hosts=2, net=61 + 2 * i) for i, s in enumerate(SITES)}
        self.hub = Lan(n_hosts=1, net=67)
        self.daemons: dict[str, DaemonProcess] = {}
        self.printers: dict[str, subprocess.Popen[bytes]] = {}
        self.brokers: dict[str, subprocess.Popen[bytes]] = {}
        self.hub_broker: subprocess.Popen[bytes] | None = None

    def wan(self, i: int) -> tuple[str, str]:
        """Return (hub side, site side) addresses of site i's WAN link."""
        return f"198.19.{100 + i}.1", f"198.19.{100 + i}.2"

    def up(self) -> Org:
        for lan in (*self.lans.values(), self.hub):
            lan.up()
        hub_ns = self.hub.ns(1)
        for i, site in enumerate(SITES):
            ns = self.lans[site].ns(1)
            hub_side, site_side = self.wan(i)
            ip = ["ip"]
            for argv in (
                [*ip, "link", "add", "wan", "netns", ns, "type", "veth", "peer", "name", f"s{i}", "netns", hub_ns],
                [*ip, "-n", ns, "addr", "add", f"{site_side}/24", "dev", "wan"],
                [*ip, "-n", hub_ns, "addr", "add", f"{hub_side}/24", "dev", f"s{i}"],
                [*ip, "-n", ns, "link", "set", "wan", "up"],
                [*ip, "-n", hub_ns, "link", "set", f"s{i}", "up"],
            ):  # fmt: skip
                subprocess.run(argv, check=True, capture_output=True)
        return self

    def down(self) -> None:
        for d in self.daemons.values():
            with contextlib.suppress(Exception):
                d.stop()
        for lan in (*self.lans.values(), self.hub):
            lan.down()

    def start_hub(self) -> None:
        conf = self.tmp / "hub.conf"
        conf.write_text(broker_conf("0.0.0.0", "sys_interval 1"))
        self.hub_broker = self.hub.popen(1, ["mosquitto", "-c", str(conf)], log="hub.log")

    def start_site(self, i: int, site: str, needs: list[str], maps: list[str], other: bool) -> None:
        lan = self.lans[site]
        conf = self.tmp / f"{site}-broker.conf"
        hub_side, _ = self.wan(i)
        conf.write_text(broker_conf("127.0.0.1", bridge_conf(site, f"{hub_side}:1883", needs)))
        self.brokers[site] = lan.popen(1, ["mosquitto", "-c", str(conf)], log=f"{site}-broker.log")
        lan.avahi_node(2, host=f"{site}-printer")
        self.printers[site] = lan.ippeveprinter(2, f"{site} printer", PORT)
        cfg = write_config(
            self.tmp / site,
            sections={
                "daemon": {"listen": [f"unix://{self.tmp / site / 'query.sock'}"]},
                "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "120s"},
                "poller": {"enabled": True, "interval": "1s", "timeout": "1s"},
                "ranking": {"allow_other_sites": other},
                "mqtt": {
                    "url": "mqtt://127.0.0.1:1883",
                    "instance": site,
                    "federate": True,
                    "foreign_grace": f"{GRACE:g}s",
                    "heartbeat": "1s",
                },
            },
            maps=maps,
            subnets=[],
        )
        # What the bridge tells the daemon, with times, for the failure report.
        lan.popen(
            1,
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", "1883", "-F", "%I %t %p",
             "-t", f"{PREFIX}/bridge/#"],
            log=f"{site}-bridge.log",
        )  # fmt: skip
        self.daemons[site] = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()

    def map_file(self, site: str) -> str:
        path = self.tmp / f"{site}.geojson"
        import json

        path.write_text(json.dumps(site_map(site, self.lans[site].ip(2))))
        return str(path)

    def watch_records(self, site: str, log: str) -> subprocess.Popen[bytes]:
        """Log the device records that reach a site's broker live from now on (not retained)."""
        return self.lans[site].popen(
            1,
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", "1883", "-R", "-v",
             "-F", "%t %l", "-t", f"{PREFIX}/devices/#"],
            log=log,
        )  # fmt: skip

    def ask(self, site: str, client_ip: str) -> list[dict[str, Any]]:
        with Client(f"unix://{self.daemons[site].admin}", timeout=5) as c:
            reply = c.request({"op": "nearest", "kind": "printer", "k": 3, "client_ip": client_ip})
        assert reply["ok"], reply
        return list(reply["devices"])

    def stats(self, site: str) -> dict[str, Any]:
        with Client(f"unix://{self.daemons[site].admin}", timeout=5) as c:
            return dict(c.request({"op": "stats"})["stats"]["mqtt"])

    def show(self) -> str:
        out = []
        for site, d in self.daemons.items():
            out.append(f"--- {site} daemon\n{d.logs()[-3000:]}")
            out.append(f"--- {site} broker\n{self.lans[site].log(f'{site}-broker.log')[-2000:]}")
            out.append(
                f"--- {site} bridge notifications\n{self.lans[site].log(f'{site}-bridge.log')}"
            )
        return "\n".join(out)


@pytest.fixture
def org(tmp_path: Path) -> Iterator[Org]:
    reason = can_run()
    if reason:
        skip_or_fail(f"cannot build the test LAN: {reason}")
    require_tools("mosquitto", "mosquitto_sub", "avahi-daemon", "dbus-daemon", "ippeveprinter")
    o = Org(tmp_path).up()
    try:
        yield o
    finally:
        o.down()


def hub_sys(org: Org) -> dict[str, int]:
    """Return the hub's own counters since it started ($SYS, published every second)."""
    keys = ("publish/messages/received", "bytes/received", "clients/connected")
    argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", "1883", "-v", "-W", "5", "-C", str(len(keys))]
    for k in keys:
        argv += ["-t", f"$SYS/broker/{k}"]
    out = org.hub.run(1, argv, timeout=15).stdout
    got = {}
    for line in out.splitlines():
        topic, _, value = line.partition(" ")
        got[topic.removeprefix("$SYS/broker/")] = int(value)
    return got


def names(devices: list[dict[str, Any]]) -> list[str]:
    return [d["name"] for d in devices]


def test_bridged_sites_answer_across_and_survive_losing_the_hub_and_a_wan_link(org: Org) -> None:
    org.start_hub()
    maps = {s: org.map_file(s) for s in SITES}
    org.start_site(0, "site-a", ["site-b"], [maps["site-a"], maps["site-b"]], other=True)
    org.start_site(1, "site-b", [], [maps["site-b"]], other=False)
    org.start_site(2, "site-c", [], [maps["site-c"]], other=False)
    a_dev, b_dev, c_dev = "site-a printer", "site-b printer", "site-c printer"

    # Each daemon discovers and polls its own printer; A also gets B's across the bridges.
    for site in SITES:
        wait_for(
            f"{site}'s own printer, discovered and polled",
            lambda site=site: names(org.ask(site, CLIENT[site]))[:1] == [f"{site} printer"],
            60,
            org.show,
        )
    office = wait_for(
        "site B's printer first for A's office (nearer by the cost, allow_other_sites)",
        lambda: (d := org.ask("site-a", OFFICE_A)) and d[0]["name"] == b_dev and d,
        30,
        org.show,
    )
    assert office[0]["origin"] == "site-b" and office[0]["site"] == "site-b"
    assert office[1]["name"] == a_dev
    assert office[0]["distance_m"] < office[1]["distance_m"]
    # Site C's records never reach A: neither its bridge nor its daemon asked for them.
    assert c_dev not in names(org.ask("site-a", OFFICE_A))
    assert org.stats("site-a")["federated_devices"] == 1
    # B and C hold nothing foreign: no bridge brings them other sites' records.
    assert org.stats("site-b")["federated_devices"] == 0

    # Record every answer A gives its own far zone while the hub dies and comes back.
    local: list[list[str]] = []

    def ask_both() -> list[dict[str, Any]]:
        local.append(names(org.ask("site-a", FAR_A))[:1])
        return org.ask("site-a", OFFICE_A)

    assert org.hub_broker is not None
    org.hub_broker.send_signal(signal.SIGKILL)
    org.hub_broker.wait(5)
    t0 = time.monotonic()
    stale = wait_for(
        "B's device stale at A once the bridge reports the hub gone",
        lambda: (d := ask_both()) and d[0]["name"] == b_dev and d[0].get("stale") and d,
        20,
        org.show,
    )
    assert stale[0]["origin"] == "site-b"
    wait_for(
        "B's device gone from A after the grace",
        lambda: b_dev not in names(ask_both()),
        GRACE + 10,
        org.show,
    )
    assert time.monotonic() - t0 >= GRACE
    assert org.stats("site-a")["federated_expired"] >= 1

    # The hub returns: the bridges reconnect, A serves B's device again, fresh, without any
    # record crossing (the records were kept; nothing changed meanwhile). Live messages only
    # (-R) on A's broker: what crosses into site A from here on.
    a_watch = org.watch_records("site-a", "a-reconnect.log")
    org.start_hub()
    wait_for(
        "B's device fresh at A after the hub returned",
        lambda: (d := ask_both()) and d[0]["name"] == b_dev and not d[0].get("stale"),
        60,
        org.show,
    )
    assert all(answer == [a_dev] for answer in local), local  # site-local answers throughout
    wait_for(
        "the three bridges at the hub", lambda: hub_sys(org)["clients/connected"] >= 3, 30, org.show
    )
    sys_now = hub_sys(org)
    Lan.stop(a_watch)
    crossed = [ln.split() for ln in org.lans["site-a"].log("a-reconnect.log").splitlines() if ln]
    # What crossed: the hub's own counters, and the records that reached site A. The daemons
    # republish nothing; mosquitto's bridge re-sends its site's retained records (its `out`
    # topics) on each connection, which A takes as no change (docs/sites.md).
    print(
        f"hub reconnect: hub received {sys_now['publish/messages/received']} messages, "
        f"{sys_now['bytes/received']} bytes; {len(crossed)} records of "
        f"{sum(int(n) for _, n in crossed)} bytes crossed into site A"
    )
    assert {topic.split("/")[3] for topic, _ in crossed} <= {"site-b"}, crossed
    assert org.stats("site-a")["federated_devices"] == 1

    # Cut A's WAN link (the veth down): A's bridge notices by its keepalive; B's device goes
    # stale, then away; meanwhile B's printer leaves, and only that change crosses on return.
    subprocess.run(["ip", "-n", org.lans["site-a"].ns(1), "link", "set", "wan", "down"], check=True)
    wait_for(
        "B's device stale at A once the WAN link is cut",
        lambda: (d := ask_both()) and d[0]["name"] == b_dev and d[0].get("stale"),
        30,
        org.show,
    )
    a_watch = org.watch_records("site-a", "a-devices.log")
    Lan.stop(org.printers["site-b"])  # avahi withdraws it: goodbye at B
    wait_for(
        "B's printer gone at B",
        lambda: b_dev not in names(org.ask("site-b", "10.2.0.5")),
        30,
        org.show,
    )
    wait_for(
        "B's device gone from A after the grace",
        lambda: b_dev not in names(ask_both()),
        30,
        org.show,
    )
    subprocess.run(["ip", "-n", org.lans["site-a"].ns(1), "link", "set", "wan", "up"], check=True)
    # The link is back once B's heartbeats reach A again; B's departure crossed with it.
    wait_for(
        "B's heartbeats at A over the restored link",
        lambda: org.stats("site-a")["origins_silent"] == 0,
        60,
        org.show,
    )
    wait_for(
        "the cleared record of B's printer at A's broker",
        lambda: org.lans["site-a"].log("a-devices.log").strip(),
        30,
        org.show,
    )
    assert b_dev not in names(ask_both())
    assert org.stats("site-a")["federated_devices"] == 0
    assert all(answer == [a_dev] for answer in local), local
    Lan.stop(a_watch)
    crossed = [ln.split() for ln in org.lans["site-a"].log("a-devices.log").splitlines() if ln]
    print(f"WAN link back: {len(crossed)} records crossed into site A: {crossed}")
    # Only the change crossed: the cleared record of B's printer (an empty retained message).
    assert [n for _, n in crossed] == ["0"], crossed
    for site in SITES:
        assert "Traceback" not in org.daemons[site].logs(), org.daemons[site].logs()
