"""The poller against real peers on loopback: CUPS's ippeveprinter, a private cupsd, an eSCL server.

ippeveprinter cannot be paused (CUPS 2.4 implements no Pause-Printer in it), so the
stopped printer is a queue of a private cupsd, paused with ``cupsdisable`` (IPP
Pause-Printer) and closed with ``cupsreject`` (CUPS-Reject-Jobs). ippeveprinter needs a
reachable system bus for its DNS-SD client even with ``-r off``: it gets a private
dbus-daemon, and no avahi, so nothing is ever advertised.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nearest_client import Client
from nearestd.adapters.poller import Poller
from nearestd.config import PollerConfig
from nearestd.core.model import Device, DeviceKind, DeviceState, PlacementMethod, Supply
from nearestd.loader import load_world
from nearestd.service import ADMIN_PEER, Service
from support import DEMO_MAP, DaemonProcess, free_port, require_tools, tcp_url, write_config

pytestmark = pytest.mark.realpeer

DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={path}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/>
<allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
"""

CUPS_FILES = """ServerRoot {d}
RequestRoot {d}/spool
CacheDir {d}/cache
StateDir {d}/state
TempDir {d}/spool
AccessLog {d}/log/access_log
ErrorLog {d}/log/error_log
PageLog {d}/log/page_log
FileDevice Yes
User lp
Group lp
"""

CUPSD_CONF = """Listen 127.0.0.1:{port}
LogLevel warn
Browsing No
WebInterface No
DefaultAuthType None
<Location />
  Order allow,deny
  Allow all
</Location>
<Policy default>
  <Limit All>
    Order deny,allow
  </Limit>
</Policy>
"""

ESCL_STATUS = """<?xml version="1.0" encoding="UTF-8"?>
<scan:ScannerStatus xmlns:scan="http://schemas.hp.com/imaging/escl/2011/05/03"
    xmlns:pwg="http://www.pwg.org/schemas/2010/12/sm">
  <pwg:Version>2.63</pwg:Version>
  <pwg:State>{state}</pwg:State>
  <scan:AdfState>{adf}</scan:AdfState>
</scan:ScannerStatus>
"""

# A point inside the demo campus's north building (n0-lobby, n1-west and n2-west cover it).
GEO_URI = "geo:52.3702600,4.8948100;u=5"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Peers:
    """A private bus, ippeveprinters, a cupsd with one queue and an eSCL server; all loopback."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.printers: dict[str, tuple[subprocess.Popen[bytes], list[str]]] = {}
        bus = directory / "bus"
        (directory / "dbus.conf").write_text(DBUS_CONF.format(path=bus))
        self.bus = self._spawn(
            ["dbus-daemon", f"--config-file={directory / 'dbus.conf'}", "--nofork", "--nopidfile"],
            "dbus.log",
        )
        _wait(bus.exists, 5, "the private dbus-daemon")
        self.env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}
        self.cups_port = 0
        self.escl_state = {"state": "Idle", "adf": "ScannerAdfLoaded"}
        self.escl: http.server.ThreadingHTTPServer | None = None
        self.escl_thread: threading.Thread | None = None

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.dir / log, "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=getattr(self, "env", None)
        )
        out.close()
        self.procs.append(proc)
        return proc

    def ippeveprinter(self, name: str, port: int, *extra: str) -> str:
        """Start an ippeveprinter on 127.0.0.1:port; return its printer URI."""
        spool = self.dir / f"spool-{name}"
        spool.mkdir(exist_ok=True)
        argv = ["ippeveprinter", "-r", "off", "-n", "localhost", "-p", str(port), "-d", str(spool)]
        argv += [*extra, name]
        proc = self._spawn(argv, f"ippeve-{name}.log")
        self.printers[name] = (proc, argv)
        _wait(lambda: _listening(port) or proc.poll() is not None, 10, f"ippeveprinter {name}")
        if proc.poll() is not None:
            raise RuntimeError((self.dir / f"ippeve-{name}.log").read_text())
        return f"ipp://127.0.0.1:{port}/ipp/print"

    def kill_printer(self, name: str) -> None:
        proc, _ = self.printers[name]
        proc.kill()
        proc.wait(5)

    def restart_printer(self, name: str) -> None:
        _, argv = self.printers[name]
        proc = self._spawn(argv, f"ippeve-{name}.log")
        self.printers[name] = (proc, argv)
        port = int(argv[argv.index("-p") + 1])
        _wait(lambda: _listening(port), 10, f"ippeveprinter {name} again")

    def cupsd(self, queue: str) -> str:
        """Start a private cupsd on a loopback port with one raw queue; return its URI."""
        d = self.dir / "cups"
        for sub in ("spool", "cache", "state", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        self.cups_port = free_port()
        (d / "cups-files.conf").write_text(CUPS_FILES.format(d=d))
        (d / "cupsd.conf").write_text(CUPSD_CONF.format(port=self.cups_port))
        proc = self._spawn(
            ["cupsd", "-f", "-c", str(d / "cupsd.conf"), "-s", str(d / "cups-files.conf")],
            "cupsd.log",
        )
        _wait(lambda: _listening(self.cups_port) or proc.poll() is not None, 15, "cupsd")
        if proc.poll() is not None:
            raise RuntimeError((self.dir / "cupsd.log").read_text())
        self.cups("lpadmin", "-p", queue, "-E", "-v", "file:///dev/null", "-m", "raw")
        return f"ipp://127.0.0.1:{self.cups_port}/printers/{queue}"

    def cups(self, tool: str, *args: str) -> None:
        """Run a CUPS command-line tool against the private cupsd."""
        subprocess.run(
            [tool, "-h", f"127.0.0.1:{self.cups_port}", *args],
            check=True,
            capture_output=True,
            timeout=10,
            env=self.env,
        )

    def escl_server(self) -> str:
        """Serve /eSCL/ScannerStatus from ``escl_state``; return the eSCL root URI."""
        peers = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/eSCL/ScannerStatus":
                    self.send_error(404)
                    return
                body = ESCL_STATUS.format(**peers.escl_state).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.escl = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.escl_thread = threading.Thread(target=self.escl.serve_forever, name="escl-peer")
        self.escl_thread.start()
        return f"http://127.0.0.1:{self.escl.server_address[1]}/eSCL/"

    def stop_escl(self) -> None:
        """Stop the eSCL server and wait for its thread."""
        if self.escl is not None:
            self.escl.shutdown()
            self.escl.server_close()
            self.escl = None
        if self.escl_thread is not None:
            self.escl_thread.join(10)
            self.escl_thread = None

    def stop(self) -> None:
        self.stop_escl()
        for proc in reversed(self.procs):
            _stop(proc)


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    require_tools("ippeveprinter", "dbus-daemon", "cupsd", "lpadmin", "cupsdisable", "cupsreject")
    directory = Path(tempfile.mkdtemp(prefix="npoll-"))
    p = Peers(directory)
    try:
        yield p
    finally:
        p.stop()
        shutil.rmtree(directory, ignore_errors=True)


# ---- in-process: the poller and the service against real printers --------------------------


def _service(tmp_path: Path) -> Service:
    """A service on the demo campus without its static devices (their addresses are not ours)."""
    data = json.loads(DEMO_MAP.read_text())
    data["features"] = [f for f in data["features"] if not f["properties"].get("static")]
    site = tmp_path / "campus-no-static.geojson"
    site.write_text(json.dumps(data))
    world = load_world(str(write_config(tmp_path, maps=[str(site)])))
    return Service(world.config, world.sitemap, time.time(), lambda: b"k" * 32)


async def test_idle_printer_state_supplies_and_identity(peers: Peers, tmp_path: Path) -> None:
    uri = await asyncio.to_thread(
        peers.ippeveprinter, "Idle One", free_port(), "-l", "Room 1.23", "-M", "Acme", "-m", "Jet 9"
    )
    svc = await asyncio.to_thread(_service, tmp_path)
    svc.upsert_device(
        Device("ipp-idle", DeviceKind.PRINTER, "Idle One", uri, source="mdns"), time.time()
    )
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, timeout=3.0))
    await poller.start()
    try:
        await poller.poll_all()
    finally:
        await poller.stop()
    dev = svc.table.get("ipp-idle")
    assert dev is not None
    d = dev.device
    assert d.state == DeviceState.IDLE, d
    assert d.state_reasons == () and d.accepting_jobs
    assert d.location_text == "Room 1.23"
    assert d.make_model == "Acme Jet 9"
    assert d.uuid is not None and len(d.uuid) == 36
    # ippeveprinter reports its supplies as PWG printer-supply, not CUPS marker-*.
    assert Supply("Black Toner", "toner", 75) in d.supplies
    assert Supply("Toner Waste Tank", "wasteToner", 25) in d.supplies
    stats = poller.stats()
    assert stats["polls_total"] == 1 and sum(stats["poll_errors_total"].values()) == 0
    assert stats["supply_levels"]["ipp-idle"]["Black Toner"] == 75
    view = svc.handle({"v": 1, "id": 1, "op": "devices"}, ADMIN_PEER, time.time())
    wire = next(x for x in view["devices"] if x["id"] == "ipp-idle")
    assert wire["state"] == "idle"
    assert {"name": "Black Toner", "type": "toner", "level": 75} in wire["supplies"]


async def test_geo_location_places_a_device_without_a_pin(peers: Peers, tmp_path: Path) -> None:
    attrs = tmp_path / "geo.conf"
    attrs.write_text(
        f'ATTR uri printer-geo-location "{GEO_URI}"\n'
        'ATTR text printer-location "Open plan N1 west"\n'
    )
    uri = await asyncio.to_thread(peers.ippeveprinter, "Geo One", free_port(), "-a", str(attrs))
    svc = await asyncio.to_thread(_service, tmp_path)
    now = time.time()
    svc.upsert_device(Device("ipp-geo", DeviceKind.PRINTER, "Geo One", uri, source="mdns"), now)
    # The same printer, pinned by name in a site map, keeps its pin (pins come first).
    pinned = Device(
        "ipp-geo-pinned",
        DeviceKind.PRINTER,
        "Finance",
        uri,
        source="mdns",
        instance="Finance LaserJet",
        addresses=("10.20.23.9",),
    )
    svc.upsert_device(pinned, now)
    rec = svc.table.get("ipp-geo")
    assert rec is not None and rec.placement is None
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, timeout=3.0))
    await poller.start()
    try:
        await poller.poll_all()
    finally:
        await poller.stop()
    rec = svc.table.get("ipp-geo")
    assert rec is not None and rec.placement is not None
    assert rec.device.geo == (52.37026, 4.89481)
    assert rec.placement.method == PlacementMethod.GEO
    # Three floors cover the point; printer-location names the one on level 1.
    assert rec.placement.zone == "n1-west"
    assert abs(rec.placement.lat - 52.37026) < 1e-9
    pin = svc.table.get("ipp-geo-pinned")
    assert pin is not None and pin.placement is not None
    assert pin.placement.method == PlacementMethod.PIN and pin.placement.zone == "n1-finance"


async def test_unreachable_after_timeout_and_back(peers: Peers, tmp_path: Path) -> None:
    port = free_port()
    uri = await asyncio.to_thread(peers.ippeveprinter, "Flaky One", port)
    svc = await asyncio.to_thread(_service, tmp_path)
    svc.upsert_device(Device("ipp-flaky", DeviceKind.PRINTER, "F", uri, source="mdns"), time.time())
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, timeout=1.0))
    await poller.start()
    try:
        await poller.poll_all()
        assert svc.table.get("ipp-flaky").device.state == DeviceState.IDLE  # type: ignore[union-attr]
        # A device that accepts the connection but never answers: SIGSTOP keeps the socket.
        proc, _ = peers.printers["Flaky One"]
        proc.send_signal(19)
        try:
            await poller.poll_all()
        finally:
            proc.send_signal(18)
        rec = svc.table.get("ipp-flaky")
        assert rec is not None
        assert rec.device.state == DeviceState.UNREACHABLE
        assert rec.device.state_reasons == ("timeout",)
        assert not rec.device.available
        # Its last known supplies stay; it leaves answers (not available) and comes back.
        assert rec.device.supplies
        await poller.poll_all()
        assert svc.table.get("ipp-flaky").device.state == DeviceState.IDLE  # type: ignore[union-attr]
        await asyncio.to_thread(peers.kill_printer, "Flaky One")
        await poller.poll_all()
        rec = svc.table.get("ipp-flaky")
        assert rec is not None and rec.device.state_reasons == ("connection-refused",)
        assert poller.stats()["poll_errors_total"]["connection-refused"] == 1
        assert poller.stats()["poll_errors_total"]["timeout"] == 1
    finally:
        await poller.stop()


async def test_ipps_with_a_self_signed_certificate(peers: Peers, tmp_path: Path) -> None:
    port = free_port()
    await asyncio.to_thread(peers.ippeveprinter, "Secure One", port)
    svc = await asyncio.to_thread(_service, tmp_path)
    uri = f"ipps://127.0.0.1:{port}/ipp/print"  # a discovered device: an address literal
    svc.upsert_device(Device("ipps-1", DeviceKind.PRINTER, "S", uri, source="mdns"), time.time())
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, timeout=5.0))
    await poller.start()
    try:
        await poller.poll_all()
    finally:
        await poller.stop()
    rec = svc.table.get("ipps-1")
    assert rec is not None and rec.device.state == DeviceState.IDLE, rec.device.state_reasons


# ---- the daemon: the nearest answer follows the printers' state ---------------------------


def _square(lon: float, lat: float, d: float = 0.0002) -> list[list[list[float]]]:
    return [[[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]]


def _site_map(path: Path, devices: list[tuple[str, str, str, float, float]]) -> Path:
    zone = {
        "feature_type": "zone",
        "site": "t",
        "building": "b",
        "level": 0,
    }
    features: list[dict[str, Any]] = [
        {
            "type": "Feature",
            "properties": {**zone, "id": "z0", "name": "Zero", "subnets": ["127.0.0.0/8"]},
            "geometry": {"type": "Polygon", "coordinates": _square(4.9, 52.37)},
        },
        {
            "type": "Feature",
            "properties": {**zone, "id": "z1", "name": "One", "subnets": ["10.9.0.0/16"]},
            "geometry": {"type": "Polygon", "coordinates": _square(4.9002, 52.37)},
        },
    ]
    for dev_id, kind, uri, lon, lat in devices:
        props = {
            "feature_type": "device",
            "static": True,
            "poll": True,  # static devices are polled only when their map or config says so
            "id": dev_id,
            "name": dev_id,
            "kind": kind,
            "uri": uri,
            "site": "t",
            "building": "b",
            "level": 0,
        }
        features.append(
            {
                "type": "Feature",
                "properties": props,
                "geometry": {"type": "Point", "coordinates": [lon, lat]},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _answer(client: Client, kind: str, **need: Any) -> list[str]:
    reply = client.request({"op": "nearest", "kind": kind, "k": 5, "need": need})
    return [d["id"] for d in reply["devices"]]


def _until(client: Client, kind: str, expected: list[str], timeout: float, **need: Any) -> float:
    t0 = time.monotonic()
    last: list[str] = []
    while time.monotonic() - t0 < timeout:
        last = _answer(client, kind, **need)
        if last == expected:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"answer stayed {last}, expected {expected} within {timeout} s")


def test_nearest_follows_pause_reject_and_a_dead_printer(peers: Peers, tmp_path: Path) -> None:
    queue_uri = peers.cupsd("q1")
    idle_port = free_port()
    idle_uri = peers.ippeveprinter("Near Idle", idle_port)
    escl_uri = peers.escl_server()
    dead_uri = f"ipp://127.0.0.1:{free_port()}/ipp/print"
    site = _site_map(
        tmp_path / "site.geojson",
        [
            ("p-queue", "printer", queue_uri, 4.90005, 52.37005),  # in z0: cost 0
            ("p-idle", "printer", idle_uri, 4.90025, 52.37005),  # in z1, ~3.4 m away
            ("p-dead", "printer", dead_uri, 4.90010, 52.37010),  # in z0, never answers
            ("s-escl", "scanner", escl_uri, 4.90010, 52.37010),
        ],
    )
    interval, timeout = 0.5, 1.0
    cfg = write_config(
        tmp_path / "d",
        sections={
            "poller": {
                "enabled": True,
                "poll_this_host": True,
                "interval": f"{interval}s",
                "timeout": f"{timeout}s",
                "max_backoff": "1s",
            }
        },
        maps=[str(site)],
        subnets=[],
    )
    daemon = DaemonProcess(cfg).wait_ready()
    budget = interval * 1.1 + timeout + 2.0
    try:
        with Client(tcp_url(cfg), timeout=5) as c:
            _until(c, "printer", ["p-queue", "p-idle"], budget)
            assert "p-dead" in _answer(c, "printer", state="any")
            # Paused by IPP Pause-Printer: stopped, skipped; back at once when resumed.
            peers.cups("cupsdisable", "-r", "test", "q1")
            _until(c, "printer", ["p-idle"], budget)
            with Client(f"unix://{daemon.admin}") as admin:
                devices = {d["id"]: d for d in admin.request({"op": "devices"})["devices"]}
            assert devices["p-queue"]["state"] == "stopped"
            assert devices["p-queue"]["state_reasons"] == ["paused"]
            assert devices["p-dead"]["state"] == "unreachable"
            assert devices["p-dead"]["state_reasons"] == ["connection-refused"]
            assert devices["p-idle"]["state"] == "idle"
            ctl = subprocess.run(
                [sys.executable, "-m", "nearestd.ctl", "--socket", str(daemon.admin), "devices"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert ctl.returncode == 0, ctl.stderr
            row = next(line for line in ctl.stdout.splitlines() if line.startswith("p-queue"))
            assert "stopped (paused)" in row
            assert "geo (printer-geo-location inside a zone)" in ctl.stdout
            peers.cups("cupsenable", "q1")
            _until(c, "printer", ["p-queue", "p-idle"], budget)
            # Not accepting jobs: skipped while idle.
            peers.cups("cupsreject", "q1")
            _until(c, "printer", ["p-idle"], budget)
            peers.cups("cupsaccept", "q1")
            _until(c, "printer", ["p-queue", "p-idle"], budget)
            # A printer that dies leaves the answers within interval + timeout, and returns.
            peers.kill_printer("Near Idle")
            took = _until(c, "printer", ["p-queue"], budget)
            assert took <= interval * 1.1 + timeout + 1.0
            peers.restart_printer("Near Idle")
            _until(c, "printer", ["p-queue", "p-idle"], 1.0 + budget)
            # The eSCL scanner: a jammed feeder stops it; the answer follows.
            _until(c, "scanner", ["s-escl"], budget)
            peers.escl_state.update(state="Idle", adf="ScannerAdfJam")
            _until(c, "scanner", [], budget)
            _until(c, "scanner", ["s-escl"], budget, state="any")
            peers.escl_state.update(state="Processing", adf="ScannerAdfLoaded")
            _until(c, "scanner", ["s-escl"], budget)
            with Client(f"unix://{daemon.admin}") as admin:
                stats = admin.request({"op": "stats"})["stats"]["poller"]
            assert stats["devices_polled"] == 4
            assert stats["poll_errors_total"]["connection-refused"] >= 1
            assert stats["devices_by_state"].get("unreachable") == 1
    finally:
        daemon.stop()
        peers.stop_escl()  # its thread ends with this test
    logs = daemon.logs()
    assert "device state" in logs
    assert "Traceback" not in logs


async def test_reload_keeps_live_state_and_turning_off_forgets_it(
    peers: Peers, tmp_path: Path
) -> None:
    uri = await asyncio.to_thread(peers.ippeveprinter, "Reload One", free_port())
    svc = await asyncio.to_thread(_service, tmp_path)
    svc.upsert_device(Device("ipp-r", DeviceKind.PRINTER, "R", uri, source="mdns"), time.time())
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, timeout=3.0))
    await poller.start()
    try:
        await poller.poll_all()
    finally:
        await poller.stop()
    assert svc.table.get("ipp-r").device.state == DeviceState.IDLE  # type: ignore[union-attr]
    await asyncio.to_thread(svc.apply, svc.cfg, svc.sitemap)  # warming would block the loop
    assert svc.table.get("ipp-r").device.state == DeviceState.IDLE  # type: ignore[union-attr]
    # Discovery's next update (state unknown) does not wipe what the poll found.
    svc.upsert_device(Device("ipp-r", DeviceKind.PRINTER, "R2", uri, source="mdns"), time.time())
    rec = svc.table.get("ipp-r")
    assert rec is not None and rec.device.state == DeviceState.IDLE and rec.device.name == "R2"
    poller.forget()
    rec = svc.table.get("ipp-r")
    assert rec is not None and rec.device.state == DeviceState.UNKNOWN and not rec.device.supplies


async def test_idle_beats_processing_only_on_a_tie(peers: Peers, tmp_path: Path) -> None:
    require_tools("ipptool")
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\nsleep 4\n")
    slow.chmod(0o755)
    doc = tmp_path / "doc.txt"
    doc.write_text("hello\n")
    busy_uri = await asyncio.to_thread(
        peers.ippeveprinter, "Busy One", free_port(), "-c", str(slow), "-f", "text/plain"
    )
    idle_uri = await asyncio.to_thread(peers.ippeveprinter, "Calm One", free_port())
    svc = await asyncio.to_thread(_service, tmp_path)
    now = time.time()
    # Both named "Reception" in their DNS-SD note: the same point in n0-lobby, an exact tie.
    # Without the state rule the tie goes to the lower id, "a-busy".
    for dev_id, uri in (("a-busy", busy_uri), ("b-idle", idle_uri)):
        svc.upsert_device(
            Device(dev_id, DeviceKind.PRINTER, dev_id, uri, source="mdns", note="Reception"), now
        )
    # A third printer on the floor above costs 20 m more; being idle does not lift it.
    far_uri = await asyncio.to_thread(peers.ippeveprinter, "Upstairs One", free_port())
    svc.upsert_device(
        Device("0-far", DeviceKind.PRINTER, "far", far_uri, source="mdns", note="Finance"), now
    )

    def answer() -> list[str]:
        req = {
            "v": 1,
            "id": 1,
            "op": "nearest",
            "kind": "printer",
            "k": 3,
            "client_ip": "127.0.0.1",
        }
        return [d["id"] for d in svc.handle(req, ADMIN_PEER, time.time())["devices"]]

    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, timeout=3.0))
    await poller.start()
    try:
        await poller.poll_all()
        assert answer() == ["a-busy", "b-idle", "0-far"]
        await asyncio.to_thread(
            subprocess.run,
            [
                "ipptool",
                "-tq",
                "-f",
                str(doc),
                "-d",
                "filetype=text/plain",
                busy_uri,
                "print-job.test",
            ],
            check=True,
            timeout=10,
        )
        await poller.poll_all()
        busy = svc.table.get("a-busy")
        assert busy is not None and busy.device.state == DeviceState.PROCESSING
        assert answer() == ["b-idle", "a-busy", "0-far"]
        deadline = time.monotonic() + 10
        while svc.table.get("a-busy").device.state != DeviceState.IDLE:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the job never finished"
            await asyncio.sleep(0.3)
            await poller.poll_all()
        assert answer() == ["a-busy", "b-idle", "0-far"]
    finally:
        await poller.stop()
