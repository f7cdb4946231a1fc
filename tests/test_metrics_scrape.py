"""The page of a real daemon that has done MQTT, discovery, polling, reloads and refusals.

Every family docs/metrics.md lists is on the page and nothing else of ours is: a renamed,
vanished or undocumented family fails here. The page is parsed by prometheus-client's
parser and checked by ``promtool check metrics``; no label carries an address or a URI.
Every peer is real and on loopback: mosquitto, a python-zeroconf responder, an HTTP eSCL
server in this process, and a printer address where nothing listens.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import DNSRecord
from prometheus_client.parser import text_string_to_metric_families

from lan import ZcPeer
from mosquitto import Mosquitto
from nearest_client import Client, ServerError
from nearestd.adapters.metrics import FAMILIES, exported_keys
from support import ROOT, DaemonProcess, free_port, require_tools, tcp_url, wait_for, write_config

pytestmark = pytest.mark.realpeer
TAG = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"  # other runs may share loopback
PREFIX = f"nearest-scrape-{TAG}/v1"
SCANNER_STATUS = b"""<?xml version="1.0" encoding="UTF-8"?>
<scan:ScannerStatus xmlns:scan="http://schemas.hp.com/imaging/escl/2011/05/03"
    xmlns:pwg="http://www.pwg.org/schemas/2010/12/sm">
  <pwg:Version>2.63</pwg:Version><pwg:State>Idle</pwg:State>
</scan:ScannerStatus>
"""


def documented_families() -> list[str]:
    """Return the family names docs/metrics.md lists."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    return re.findall(r"^\| `(nearest_[a-z0-9_]+)` \|", text, re.MULTILINE)


def page_families(page: str) -> dict[str, Any]:
    """Return our families by the name docs use (a counter's with ``_total``)."""
    out = {}
    for fam in text_string_to_metric_families(page):
        if fam.name.startswith("nearest_"):
            out[fam.name + ("_total" if fam.type == "counter" else "")] = fam
    return out


def values(fam: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in fam.samples
        if not s.name.endswith("_created")
    }


@pytest.fixture
def escl() -> Iterator[str]:
    """An eSCL status server on loopback, served by a thread this test stops and joins."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/eSCL/ScannerStatus" else 404)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(SCANNER_STATUS)))
            self.end_headers()
            self.wfile.write(SCANNER_STATUS)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="escl-peer")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/eSCL/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def site_map(path: Path, scanner_uri: str, dead_printer_uri: str) -> Path:
    ring = [[4.9, 52.37], [4.9002, 52.37], [4.9002, 52.3702], [4.9, 52.3702], [4.9, 52.37]]
    zone = {"feature_type": "zone", "site": "t", "building": "b", "level": 0}
    features: list[dict[str, Any]] = [
        {
            "type": "Feature",
            "properties": {**zone, "id": "z0", "name": "Reception", "subnets": ["127.0.0.0/8"]},
            "geometry": {"type": "Polygon", "coordinates": [ring]},
        }
    ]
    for dev_id, kind, uri in (
        ("s-escl", "scanner", scanner_uri),
        ("p-dead", "printer", dead_printer_uri),
    ):
        props = {"feature_type": "device", "static": True, "id": dev_id, "name": dev_id}
        props |= {"kind": kind, "uri": uri, "site": "t", "building": "b", "level": 0}
        features.append(
            {
                "type": "Feature",
                "properties": props,
                "geometry": {"type": "Point", "coordinates": [4.9001, 52.3701]},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return str(r.read().decode())


def scrape_soon(address: str) -> str:
    """Scrape, or return "" while the exporter is not yet listening (it starts after ready)."""
    try:
        return scrape(address)
    except urllib.error.URLError:
        return ""


def is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return False
    return True


def mqtt(broker: Mosquitto, *args: str, tool: str = "mosquitto_rr") -> str:
    r = subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_page_of_a_busy_daemon_lists_every_documented_family(tmp_path: Path, escl: str) -> None:
    require_tools("mosquitto", "mosquitto_rr", "mosquitto_pub", "promtool")
    broker = Mosquitto(tmp_path / "broker").start()
    peer = ZcPeer.local("127.0.0.1", log=tmp_path / "peer.log")
    metrics = f"127.0.0.1:{free_port()}"
    instance = f"scrape{os.getpid()}"
    dead = f"ipp://127.0.0.1:{free_port()}/ipp/print"
    dns_port = free_port()
    site = site_map(tmp_path / "site.geojson", escl, dead)
    sections: dict[str, dict[str, Any]] = {
        "daemon": {"rate": 1.0, "burst": 20, "trusted_peers": ["::1/128"]},
        "metrics": {"listen": metrics},
        "discovery": {"enabled": True, "interfaces": ["127.0.0.1"]},
        "poller": {
            "enabled": True,
            "static": True,  # the map's two static devices are the ones polled here
            "interval": "1s",
            "timeout": "1s",
            "max_backoff": "2s",
            "poll_this_host": True,  # the peers are on loopback
        },
        "dnssd": {"listen": [f"127.0.0.1:{dns_port}"], "domain": "nearest.test."},
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{broker.port}",
            "topic_prefix": PREFIX,
            "instance": instance,
        },
        "web": {"listen": f"127.0.0.1:{free_port()}"},
    }
    cfg = write_config(tmp_path / "d", sections=sections, maps=[str(site)], subnets=[])
    good_config = cfg.read_text()
    d = DaemonProcess(cfg).wait_ready()
    try:
        # Discovery: a printer announced on loopback.
        peer.register(
            "a",
            f"Scrape Printer {TAG}",
            host=f"scrape-{TAG}.local.",
            addresses=["127.0.0.1"],
            txt={"txtvers": "1", "rp": "ipp/print", "note": "Reception"},
        )
        # MQTT: one answered query, one that cannot be answered (no response topic).
        wait_for("mqtt connected", lambda: "nearest_mqtt_connected 1.0" in scrape_soon(metrics), 20)
        reply = mqtt(
            broker,
            *("-t", f"{PREFIX}/query", "-e", f"{PREFIX}-reply/{instance}"),
            *("-m", '{"v": 1, "id": 7, "op": "ping"}', "-W", "10"),
        )
        assert '"ok"' in reply
        mqtt(broker, "-t", f"{PREFIX}/query", "-m", "not json", tool="mosquitto_pub")
        # Reloads: one that works, one refused (a broken config), then the good one back.
        with Client(f"unix://{d.admin}") as admin:
            assert admin.request({"op": "reload"})["reloaded"] is True
            cfg.write_text(good_config.replace("[poller]", "[poller]\nnonsense = 1"))
            with pytest.raises(ServerError) as refused:
                admin.request({"op": "reload"})
            assert refused.value.reply["problems"]
            cfg.write_text(good_config)
        # Unicast DNS-SD: one browse query over UDP.
        query = DNSRecord.question("_ipp._tcp.nearest.test.", "PTR").pack()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:
            dns.settimeout(10)
            dns.sendto(query, ("127.0.0.1", dns_port))
            assert DNSRecord.parse(dns.recv(65535)).header.id == DNSRecord.parse(query).header.id
        # Refusals: forbidden, malformed, then rate-limited (TCP is limited to a burst of 20).
        with Client(tcp_url(cfg)) as c:
            with pytest.raises(ServerError):
                c.request({"op": "reload"})
            with pytest.raises(ServerError):
                c.request({"op": "nearest", "kind": "fax"})
            limited = 0
            for _ in range(40):
                try:
                    c.request({"op": "ping"})
                except ServerError as exc:
                    limited += exc.code == "rate-limited"
            assert limited

        # Polling: the scanner answers, the printer cannot be reached; discovery saw ours.
        def busy() -> dict[str, Any] | None:
            fams = page_families(scrape(metrics))
            errors = values(fams["nearest_poller_errors_total"])
            ready = (
                fams["nearest_discovery_devices"].samples[0].value >= 1
                and errors.get((("error", "connection-refused"),), 0) >= 1
                and values(fams["nearest_devices"]).get((("kind", "scanner"), ("state", "idle")))
                == 1
            )
            return fams if ready else None

        fams = wait_for(
            "discovery and polls on the page",
            busy,
            30,
            show=lambda: "\n".join(
                line
                for line in scrape(metrics).splitlines()
                if line.startswith(("nearest_discovery", "nearest_poller", "nearest_devices"))
            ),
        )
        page = scrape(metrics)
        with Client(f"unix://{d.admin}") as admin:
            stats = admin.request({"op": "stats"})["stats"]
    finally:
        d.stop()
        peer.close()
        broker.close()
    assert "Traceback" not in d.logs()
    fams = page_families(page)
    listed = documented_families()
    assert listed == [f.name for f in FAMILIES]
    assert sorted(fams) == sorted(listed), (
        f"on the page, not in docs/metrics.md: {sorted(set(fams) - set(listed))}; "
        f"in docs/metrics.md, not on the page: {sorted(set(listed) - set(fams))}"
    )
    for fam in FAMILIES:
        assert fams[fam.name].type == fam.type, fam.name
        assert fams[fam.name].documentation == fam.help, fam.name
    # What the test did is on the page.
    assert values(fams["nearest_config_reloads_total"]) == {
        (("result", "success"),): 1.0,
        (("result", "failure"),): 1.0,
    }
    assert values(fams["nearest_config_last_reload_successful"]) == {(): 0.0}
    assert values(fams["nearest_security_requests_refused_total"])[(("interface", "tcp"),)] == 1
    assert values(fams["nearest_security_requests_malformed_total"])[(("interface", "tcp"),)] >= 1
    assert (
        values(fams["nearest_security_requests_rate_limited_total"])[(("interface", "tcp"),)] >= 1
    )
    assert values(fams["nearest_mqtt_requests_unanswerable_total"]) == {(): 1.0}
    assert values(fams["nearest_mqtt_requests_malformed_total"]) == {(): 1.0}
    assert values(fams["nearest_mqtt_replies_total"]) == {(): 1.0}
    assert values(fams["nearest_discovery_events_total"])[(("event", "added"),)] >= 1
    assert values(fams["nearest_poller_polls_total"])[()] >= 2
    assert values(fams["nearest_poller_devices"])[()] >= 2
    assert sum(values(fams["nearest_dnssd_queries_total"]).values()) >= 1
    # The census behind stats and the page is the same.
    on_page = {
        (dict(k)["kind"], dict(k)["state"]): v for k, v in values(fams["nearest_devices"]).items()
    }
    assert on_page == {tuple(k.split("/")): v for k, v in stats["devices_by_kind_state"].items()}
    # No label carries an address, a URI or a pseudonym.
    for fam in fams.values():
        for sample in fam.samples:
            for key, value in sample.labels.items():
                assert "://" not in value and "/" not in value, (sample.name, key, value)
                assert not is_address(value), (sample.name, key, value)
    assert "127.0.0.1" not in page
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=page.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
    # Every figure `stats` shows is on a family, or listed with the reason it is not.
    known = exported_keys()
    for section, keys in known.items():
        if isinstance(stats.get(section), dict):
            assert set(stats[section]) <= keys, (section, set(stats[section]) - keys)
    service_maps = {"devices_by_kind_state", "devices_by_site", "queries"}
    sections_shown = {k for k, v in stats.items() if isinstance(v, dict)} - service_maps
    assert sections_shown <= set(known), sections_shown - set(known)
