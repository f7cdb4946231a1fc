"""The web view in a real browser: the demo campus plus real ippeveprinter devices on the test LAN.

The daemon runs in host 1 of the namespace LAN (tests/lan.py) with discovery and the poller
on; three ippeveprinter printers announce themselves through their hosts' avahi, each with
a printer-location naming a demo-campus zone (so the daemon places them there), one of them
named ``<img src=x onerror=alert(1)>``. Chromium (Debian's, driven by Playwright) is started
inside host 1 too, so it reaches the web view on that namespace's loopback; nothing it asks
for may go anywhere else. Screenshots land under the test's temporary directory.

Pause-Printer: ippeveprinter does not implement it (it answers server-error-operation-not-
supported), so a private cupsd in host 3 serves a queue over IPP on the LAN, declared in an
extra site map as a static device in the canteen; ``cupsdisable`` pauses it with IPP
Pause-Printer and ``cupsenable`` resumes it, and the poller sees it stopped and idle again.
A Print-Job to an ippeveprinter makes that one processing; "made unreachable" is SIGSTOP,
as in tests/test_poller_lan.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from browser import Browser, chromium, require_browser
from cups_peer import CUPS_FILES_CONF, CUPSD_CONF, short_tempdir
from lan import Lan
from nearest_client import Client
from nearestd.core.floorplan import LOOKS
from nearestd.loader import load_world
from support import DEMO_MAP, DaemonProcess, free_port, require_tools, write_config

pytestmark = [pytest.mark.realpeer, pytest.mark.lan]

HOSTILE = "<img src=x onerror=alert(1)>"
# host, name, port, printer-location (a demo-campus zone name)
PRINTERS = [
    (4, "Canteen Web Sim", 8661, "Canteen"),
    (5, "Library Web Sim", 8662, "Library"),
    (6, HOSTILE, 8663, "Lab"),
]
LOOKUPS = ["10.20.51.20", "10.20.33.7", "10.20.62.9"]
CUPS_HOST = 3
QUEUE = "Canteen CUPS queue"
EVENT_BUDGET = 2.0
TINY_PDF = b"""%PDF-1.1
1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj
2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj
3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj
trailer<</Root 1 0 R>>
%%EOF
"""


@dataclass
class Campus:
    """The running daemon, its printers, the browser and where screenshots go."""

    lan: Lan
    daemon: DaemonProcess
    base: str
    shots: Path
    printers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    cups_env: dict[str, str] = field(default_factory=dict)

    def cups(self, *argv: str) -> None:
        """Run a CUPS tool against the LAN's cupsd (over its Unix socket)."""
        r = subprocess.run(
            list(argv), env=self.cups_env, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, f"{argv}: {r.stderr}"

    @contextmanager
    def browse(self) -> Iterator[Browser]:
        """Run Chromium for one test; at its end, no request went elsewhere, no script ran."""
        with self.lan.netns(1):
            # Playwright's driver and Chromium are started from this thread, so they live in
            # host 1's namespace, where the web view listens on loopback.
            cm = chromium()
            browser = cm.__enter__()
        try:
            yield browser
            assert browser.requests, "the browser made no request at all"
            assert browser.foreign(self.base) == [], "requests left for another host"
            assert browser.dialogs == [], "a page opened a dialog (a script ran)"
        finally:
            cm.__exit__(None, None, None)

    def inventory(self) -> list[dict[str, Any]]:
        with Client(f"unix://{self.daemon.admin}", timeout=5) as c:
            return list(c.request({"op": "devices"})["devices"])

    def device(self, name: str) -> dict[str, Any] | None:
        return next((d for d in self.inventory() if d["name"] == name), None)

    def nearest(self, ip: str, k: int) -> dict[str, Any]:
        sock = self.daemon.config.parent / "query.sock"
        with Client(f"unix://{sock}", timeout=5) as c:
            return dict(c.request({"op": "nearest", "kind": "printer", "k": k, "client_ip": ip}))


def _wait(what: str, pred: Callable[[], Any], timeout: float, show: Callable[[], Any] = str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {show()}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def campus(lan: Lan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campus]:
    require_tools(
        "avahi-daemon", "dbus-daemon", "ippeveprinter", "ipptool", "cupsd", "lpadmin", "cupsdisable"
    )
    require_browser()
    tmp = tmp_path_factory.mktemp("web-lan")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for host, name, port, location in PRINTERS:
        lan.avahi_node(host, host=f"webprn{host}")
        # PDF accepted, so that a Print-Job over IPP can make the printer busy.
        extra = ["-f", "application/pdf"]
        procs[name] = lan.ippeveprinter(host, name, port, location=location, extra=extra)
    cups_dir, cups_env, cupsd = _lan_cupsd(lan, CUPS_HOST)
    extra = tmp / "queue.geojson"
    extra.write_text(json.dumps({"type": "FeatureCollection", "features": [_queue_feature(lan)]}))
    port = free_port()
    cfg = write_config(
        tmp / "d",
        sections={
            "daemon": {"listen": [f"unix://{tmp / 'd' / 'query.sock'}"]},
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "120s"},
            "poller": {"enabled": True, "interval": "0.5s", "timeout": "1s", "max_backoff": "1s"},
            "web": {"listen": f"127.0.0.1:{port}"},
        },
        maps=[str(DEMO_MAP), str(extra)],
    )
    daemon = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()
    try:
        c = Campus(lan, daemon, f"http://127.0.0.1:{port}", tmp / "screenshots", procs)
        c.cups_env = cups_env
        c.shots.mkdir()
        c.ids[QUEUE] = "cups-webq"
        _wait(
            "the CUPS queue polled idle",
            lambda: (d := c.device(QUEUE)) and d["state"] == "idle",
            30,
            lambda: c.device(QUEUE),
        )
        for _, name, _, _ in PRINTERS:
            _wait(
                f"{name!r} discovered, polled idle and placed by its note",
                lambda n=name: (d := c.device(n)) and d["state"] == "idle" and d["located"],
                45,
                lambda n=name: c.device(n),
            )
            c.ids[name] = c.device(name)["id"]  # type: ignore[index]
        yield c
    finally:
        daemon.stop()
        Lan.stop(cupsd)
        shutil.rmtree(cups_dir, ignore_errors=True)
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
            Lan.stop(proc)
    assert "Traceback" not in daemon.logs()


def _lan_cupsd(lan: Lan, host: int) -> tuple[Path, dict[str, str], subprocess.Popen[bytes]]:
    """Start a private cupsd in a LAN host, serving IPP on its address, with one queue."""
    d = short_tempdir("webcups")
    for sub in ("etc", "state", "cache", "spool", "tmp", "log", "home", "client", "ssl"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for path in [d, *d.iterdir()]:
        path.chmod(0o755)
    (d / "etc" / "cups-files.conf").write_text(CUPS_FILES_CONF.format(d=d, groups="root"))
    listen = f"Listen {d}/cups.sock"
    conf = CUPSD_CONF.format(d=d).replace(
        listen, f"{listen}\nListen {lan.ip(host)}:631\nServerAlias *"
    )
    (d / "etc" / "cupsd.conf").write_text(conf)
    proc = lan.popen(
        host,
        [
            "cupsd",
            "-f",
            "-c",
            str(d / "etc" / "cupsd.conf"),
            "-s",
            str(d / "etc" / "cups-files.conf"),
        ],
        log="webcupsd.log",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LPDEST", "PRINTER")}
    env.update(
        CUPS_SERVER=str(d / "cups.sock"),
        CUPS_SERVERROOT=str(d / "client"),
        HOME=str(d / "home"),
        LC_ALL="C",
    )

    def running() -> bool:
        r = subprocess.run(["lpstat", "-r"], env=env, capture_output=True, text=True)
        return "is running" in r.stdout

    _wait("the LAN's cupsd", running, 15, lambda: lan.log("webcupsd.log"))
    # The queue's own device is never printed to; raw keeps lpadmin from asking it.
    r = subprocess.run(
        ["lpadmin", "-p", "webq", "-E", "-v", "ipp://192.0.2.1/ipp/print", "-m", "raw"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return d, env, proc


def _queue_feature(lan: Lan) -> dict[str, Any]:
    return {
        "type": "Feature",
        "properties": {
            "feature_type": "device",
            "static": True,
            "id": "cups-webq",
            "name": QUEUE,
            "kind": "printer",
            "uri": f"ipp://{lan.ip(CUPS_HOST)}:631/printers/webq",
            "make_model": "CUPS queue",
            "poll": True,  # static devices are polled only when they ask for it
            "site": "hq",
            "building": "south",
            "level": 0,
        },
        # Inside the canteen (s0-canteen) of the demo campus.
        "geometry": {"type": "Point", "coordinates": [4.8949, 52.3695]},
    }


def _ids(page: Any, attr: str) -> list[str]:
    return sorted(e.get_attribute(attr) for e in page.locator(f"[{attr}]").all())


def test_each_floor_shows_exactly_its_zones_and_devices(campus: Campus) -> None:
    with campus.browse() as b:
        sitemap = load_world(campus.daemon.config).sitemap
        inventory = campus.inventory()
        floors = sorted({(z.site, z.building, z.level) for z in sitemap.zones.values()})
        page = b.page()
        for site, building, level in floors:
            page.goto(f"{campus.base}/floors/{site}/{building}/{level}")
            page.wait_for_selector("#live[data-live=on]", timeout=10000)
            zones = sorted(
                z.id
                for z in sitemap.zones.values()
                if (z.site, z.building, z.level) == (site, building, level)
            )
            devices = sorted(
                d["id"]
                for d in inventory
                if d["located"]
                and (d["site"], d["building"], d["level"]) == (site, building, level)
            )
            assert _ids(page, "data-zone") == zones
            assert _ids(page, "data-device") == devices
            # Each zone's name is drawn in its element.
            for zid in zones:
                assert (
                    page.locator(f'[data-zone="{zid}"] text').text_content()
                    == sitemap.zones[zid].name
                )
            shot = campus.shots / f"floor-{site}-{building}-{level}.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        # The discovered printers are on the floors their DNS-SD note (-l) names.
        placed = {d["name"]: (d["zone"], d["placed_by"]) for d in inventory}
        assert placed["Canteen Web Sim"] == ("s0-canteen", "note")
        assert placed["Library Web Sim"] == ("n2-library", "note")
        assert placed[HOSTILE] == ("s1-lab", "note")
        page.close()


def _state_on_page(page: Any, device_id: str) -> str | None:
    return page.evaluate(
        "id => { const e = [...document.querySelectorAll('[data-device]')]"
        ".find(x => x.getAttribute('data-device') === id);"
        " return e ? e.getAttribute('data-state') + '|' + "
        "(e.querySelector('circle,rect,polygon,path').getAttribute('fill') + '/' + "
        "e.querySelector('circle,rect,polygon,path').getAttribute('stroke')) : null; }",
        device_id,
    )


def _follow(campus: Campus, page: Any, name: str, state: str) -> float:
    """Wait for the daemon to see ``state``, then for the open page; return the page's lag."""
    device_id = campus.ids[name]
    _wait(
        f"the daemon to see {name!r} {state}",
        lambda: (d := campus.device(name)) and d["state"] == state,
        30,
        lambda: campus.device(name),
    )
    seen = time.monotonic()
    _wait(
        f"the open page to show {name!r} {state}",
        lambda: (s := _state_on_page(page, device_id)) and s.startswith(state + "|"),
        EVENT_BUDGET + 3,
        lambda: _state_on_page(page, device_id),
    )
    lag = time.monotonic() - seen
    shown = _state_on_page(page, device_id)
    assert shown is not None and LOOKS[state].colour in shown.split("|")[1]
    return lag


def test_state_changes_reach_an_open_page_without_reload(campus: Campus) -> None:
    with campus.browse() as b:
        name = "Canteen Web Sim"
        page = b.page()
        navigations: list[str] = []
        page.on("framenavigated", lambda f: navigations.append(f.url))
        page.goto(f"{campus.base}/floors/hq/south/0?device={campus.ids[name]}")
        page.wait_for_selector("#live[data-live=on]", timeout=10000)
        page.evaluate("window.__sameDocument = true")
        assert (_state_on_page(page, campus.ids[name]) or "").startswith("idle|")
        proc = campus.printers[name]
        lags = []
        # The sites page, open beside it, counts the south building's devices by state.
        index = b.page()
        index.goto(campus.base + "/")
        index.wait_for_selector("#live[data-live=on]", timeout=10000)
        cell = '[data-building="south"] [data-count="unreachable"]'
        unreachable = int(index.locator(cell).inner_text())
        # Made unreachable: the process stops answering (avahi still advertises it).
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            lags.append(_follow(campus, page, name, "unreachable"))
            _wait(
                "the sites page to count it unreachable",
                lambda: int(index.locator(cell).inner_text()) == unreachable + 1,
                EVENT_BUDGET,
                lambda: index.locator(cell).inner_text(),
            )
            page.screenshot(path=str(campus.shots / "unreachable.png"), full_page=True)
            assert "timeout" in page.locator("#panel").inner_text()
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        lags.append(_follow(campus, page, name, "idle"))
        _wait(
            "the sites page to count it back",
            lambda: int(index.locator(cell).inner_text()) == unreachable,
            EVENT_BUDGET,
            lambda: index.locator(cell).inner_text(),
        )
        index.close()
        # Over IPP: a Print-Job makes it processing, then idle again when done.
        host, _, port, _ = next(p for p in PRINTERS if p[1] == name)
        doc = campus.shots / "job.pdf"
        doc.write_bytes(TINY_PDF)
        job = campus.lan.run(
            1,
            [
                "ipptool",
                "-f",
                str(doc),
                f"ipp://{campus.lan.ip(host)}:{port}/ipp/print",
                "print-job.test",
            ],
            timeout=30,
        )
        assert job.returncode == 0, job.stdout + job.stderr
        lags.append(_follow(campus, page, name, "processing"))
        lags.append(_follow(campus, page, name, "idle"))
        # Paused with IPP Pause-Printer (cupsdisable), resumed with Resume-Printer.
        campus.cups("cupsdisable", "-r", "paused by the web test", "webq")
        lags.append(_follow(campus, page, QUEUE, "stopped"))
        page.screenshot(path=str(campus.shots / "paused.png"), full_page=True)
        campus.cups("cupsenable", "webq")
        lags.append(_follow(campus, page, QUEUE, "idle"))
        assert page.evaluate("window.__sameDocument") is True
        assert len(navigations) == 1, navigations
        print(f"page lag after the daemon saw each change: {[round(x, 3) for x in lags]} s")
        assert max(lags) < EVENT_BUDGET, lags
        page.close()


def test_lookup_box_answers_like_nearest(campus: Campus) -> None:
    with campus.browse() as b:
        page = b.page()
        page.goto(campus.base + "/")
        for ip in LOOKUPS:
            page.fill("#lookup-ip", ip)
            page.select_option("#lookup-kind", "printer")
            page.fill("#lookup-k", "5")
            page.click("#lookup-go")
            page.wait_for_selector("#lookup-where", timeout=10000)
            want = campus.nearest(ip, 5)
            answered = [e.get_attribute("data-answer") for e in page.locator("[data-answer]").all()]
            assert answered == [d["id"] for d in want["devices"]], ip
            assert (
                page.locator("[data-here=true]").get_attribute("data-zone") == want["where"]["zone"]
            )
            assert page.locator("[data-here=true]").count() == 1
            # Each row's split adds up to the cost `nearest` gives.
            for row, d in zip(page.locator("[data-answer]").all(), want["devices"], strict=True):
                cells = [c.inner_text() for c in row.locator("td").all()]
                dist, floor, building, cost = (float(x) for x in cells[4:8])
                assert abs(dist + floor + building - d["distance_m"]) < 0.15
                assert abs(cost - d["distance_m"]) < 0.06
            shot = campus.shots / f"lookup-{ip}.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        # Lookups are location-log entries of op admin.locate, like `nearestctl locate`.
        with Client(f"unix://{campus.daemon.admin}", timeout=5) as c:
            entries = c.request({"op": "privacy.export", "ip": LOOKUPS[0]})["entries"]
        assert "admin.locate" in [e["op"] for e in entries]
        assert LOOKUPS[0] not in campus.daemon.logs()
        page.close()


def test_a_hostile_device_name_shows_as_text(campus: Campus) -> None:
    with campus.browse() as b:
        page = b.page()
        device_id = campus.ids[HOSTILE]
        page.goto(f"{campus.base}/floors/hq/south/1?device={device_id}")
        page.wait_for_selector("#live[data-live=on]", timeout=10000)
        assert page.locator("#panel h2").inner_text() == HOSTILE
        assert page.locator("img").count() == 0
        title = page.locator(f'[data-device="{device_id}"] title').text_content()
        assert title is not None and title.startswith(HOSTILE)
        page.goto(campus.base + "/")
        page.goto(f"{campus.base}/locate?ip=10.20.62.9&kind=printer&k=5")
        assert HOSTILE in page.locator(f'[data-answer="{device_id}"]').inner_text()
        assert page.locator("img").count() == 0
        assert b.dialogs == []
        page.close()


def test_map_command_draws_what_the_page_shows(campus: Campus) -> None:
    with campus.browse() as b:
        page = b.page()
        page.goto(f"{campus.base}/floors/hq/south/0")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "nearestd.ctl",
                "--socket",
                str(campus.daemon.admin),
                "map",
                "hq",
                "south",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        root = ET.fromstring(r.stdout)
        assert sorted(
            e.attrib["data-zone"] for e in root.iter() if "data-zone" in e.attrib
        ) == _ids(page, "data-zone")
        assert sorted(
            e.attrib["data-device"] for e in root.iter() if "data-device" in e.attrib
        ) == _ids(page, "data-device")
        assert campus.ids["Canteen Web Sim"] in _ids(page, "data-device")
        page.close()


def test_no_request_left_for_another_host(campus: Campus) -> None:
    with campus.browse() as b:
        page = b.page()
        for path in ["/", "/devices", "/floors/hq/north/2", "/locate?ip=10.20.33.7&kind=scanner"]:
            page.goto(campus.base + path)
            page.wait_for_selector("#live[data-live=on]", timeout=10000)
        assert b.foreign(campus.base) == [], b.requests
        print(json.dumps(sorted({r.split("?")[0] for r in b.requests})))
