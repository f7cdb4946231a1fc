"""Discovery and the poller together on the namespace LAN: a real ippeveprinter, found by mDNS.

The printer advertises through its own host's avahi; the daemon (in another host) finds
it, polls it over the LAN, places it by its ``printer-geo-location`` (it has no pin, and
its note names no zone), and drops it from the answers while it stops answering IPP
(SIGSTOP: avahi keeps advertising it, so only the poller can tell), and serves it again
when it answers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lan import Lan
from nearest_client import Client
from support import DaemonProcess, require_tools, write_config, zone_feature

pytestmark = [pytest.mark.realpeer, pytest.mark.lan]

HOST = 7
PORT = 8641
LAT, LON = 52.37015, 4.90015


def _zone(zid: str, level: int, subnets: list[str]) -> dict[str, Any]:
    d = 0.0003
    lon, lat = 4.9, 52.37
    ring = [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]
    return zone_feature(zid, ring, subnets, building="tower", level=level, name=zid.title())


def _wait(what: str, pred: Callable[[], Any], timeout: float, show: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {show()}")
        time.sleep(0.05)


def test_discovered_printer_polled_placed_by_geo_and_served_while_answering(
    lan: Lan, tmp_path: Path
) -> None:
    require_tools("avahi-daemon", "dbus-daemon", "ippeveprinter")
    lan.avahi_node(HOST, host="geo-mfp")
    attrs = tmp_path / "geo.conf"
    attrs.write_text(
        f'ATTR uri printer-geo-location "geo:{LAT},{LON};u=3"\n'
        'ATTR text printer-location "Upstairs"\n'
    )
    printer = lan.ippeveprinter(HOST, "Geo Sim", PORT, extra=["-a", str(attrs)])
    site = tmp_path / "tower.geojson"
    # A peer on the Unix socket is located as 127.0.0.1.
    features = [_zone("ground", 0, ["127.0.0.0/8"]), _zone("upstairs", 1, [])]
    site.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    cfg = write_config(
        tmp_path / "d",
        sections={
            "daemon": {"listen": [f"unix://{tmp_path / 'd' / 'query.sock'}"]},
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "120s"},
            "poller": {"enabled": True, "interval": "0.5s", "timeout": "1s", "max_backoff": "1s"},
        },
        maps=[str(site)],
        subnets=[],
    )
    daemon = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()

    def device() -> dict[str, Any] | None:
        with Client(f"unix://{daemon.admin}", timeout=5) as c:
            inv = c.request({"op": "devices"})["devices"]
        return next((d for d in inv if d["name"] == "Geo Sim" and d["kind"] == "printer"), None)

    def answer() -> list[str]:
        with Client(f"unix://{tmp_path / 'd' / 'query.sock'}", timeout=5) as c:
            reply = c.request({"op": "nearest", "kind": "printer", "k": 5})
        return [d["name"] for d in reply["devices"]]

    try:
        found = _wait(
            "the discovered printer, polled and placed by geo",
            lambda: (d := device()) and d["state"] == "idle" and d["placed_by"] == "geo" and d,
            30,
            device,
        )
        # The geo point is on both floors; printer-location names the upper one.
        assert (found["zone"], found["level"]) == ("upstairs", 1)
        assert abs(found["position"]["lat"] - LAT) < 1e-6
        assert found["source"] == "mdns"
        assert "Geo Sim" in answer()
        os.killpg(printer.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            _wait(
                "the silent printer to leave the answers",
                lambda: "Geo Sim" not in answer(),
                0.5 * 1.1 + 1.0 + 2.0,
                device,
            )
            took = time.monotonic() - t0
            d = device()
            assert d is not None and d["state"] == "unreachable"  # still advertised, not served
            assert d["state_reasons"] == ["timeout"]
        finally:
            os.killpg(printer.pid, signal.SIGCONT)
        _wait("the printer back in the answers", lambda: "Geo Sim" in answer(), 5, device)
        assert took < 3.5
    finally:
        daemon.stop()
        Lan.stop(printer)
    assert "Traceback" not in daemon.logs()


@pytest.mark.timeout(300)
def test_with_the_default_config_a_silent_printer_stops_being_the_answer(
    lan: Lan, tmp_path: Path
) -> None:
    """No [poller] section: the documented defaults (interval 30 s, timeout 5 s) must do it."""
    require_tools("avahi-daemon", "dbus-daemon", "ippeveprinter")
    from nearestd.config import PollerConfig

    defaults = PollerConfig()
    lan.avahi_node(HOST, host="default-mfp")
    attrs = tmp_path / "geo.conf"
    attrs.write_text(f'ATTR uri printer-geo-location "geo:{LAT},{LON};u=3"\n')
    printer = lan.ippeveprinter(HOST, "Default Sim", PORT, extra=["-a", str(attrs)])
    site = tmp_path / "tower.geojson"
    site.write_text(
        json.dumps({"type": "FeatureCollection", "features": [_zone("ground", 0, ["127.0.0.0/8"])]})
    )
    cfg = write_config(
        tmp_path / "d",
        sections={
            "daemon": {"listen": [f"unix://{tmp_path / 'd' / 'query.sock'}"]},
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "10m"},
        },
        maps=[str(site)],
        subnets=[],
    )
    assert "[poller]" not in cfg.read_text()
    daemon = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()

    def device() -> dict[str, Any] | None:
        with Client(f"unix://{daemon.admin}", timeout=5) as c:
            inv = c.request({"op": "devices"})["devices"]
        return next((d for d in inv if d["name"] == "Default Sim" and d["kind"] == "printer"), None)

    def answer() -> list[str]:
        with Client(f"unix://{tmp_path / 'd' / 'query.sock'}", timeout=5) as c:
            reply = c.request({"op": "nearest", "kind": "printer", "k": 5})
        return [d["name"] for d in reply["devices"]]

    # First polls are spread over one interval; a poll then takes at most the timeout.
    bound = defaults.interval * (1 + defaults.jitter) + defaults.timeout + 5.0
    try:
        _wait(
            "the discovered printer polled idle with the defaults",
            lambda: (d := device()) and d["state"] == "idle" and d,
            bound + 15,
            device,
        )
        assert "Default Sim" in answer()
        os.killpg(printer.pid, signal.SIGSTOP)
        try:
            _wait(
                "the silent printer to leave the answers",
                lambda: "Default Sim" not in answer(),
                bound,
                device,
            )
            d = device()
            assert d is not None and d["state"] == "unreachable"
        finally:
            os.killpg(printer.pid, signal.SIGCONT)
    finally:
        daemon.stop()
        Lan.stop(printer)
    assert "Traceback" not in daemon.logs()
