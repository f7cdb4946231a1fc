"""The web view on loopback: headers, the bearer token, the page weight, `nearestctl map`."""

from __future__ import annotations

import base64
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from browser import chromium, require_browser
from support import ROOT, DaemonProcess, free_port, write_config

pytestmark = [pytest.mark.realpeer]
TOKEN = "test-token-4f1c2a9b7d"


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str]]:
    port = free_port()
    cfg = write_config(tmp_path, {"web": {"listen": f"127.0.0.1:{port}"}})
    d = DaemonProcess(cfg).wait_ready()
    try:
        yield d, f"http://127.0.0.1:{port}"
    finally:
        d.stop()
    assert "Traceback" not in d.logs()


@pytest.fixture
def web_with_token(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str]]:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = write_config(
        tmp_path, {"web": {"listen": f"127.0.0.1:{port}", "token_file": str(tmp_path / "token")}}
    )
    d = DaemonProcess(cfg).wait_ready()
    try:
        yield d, f"http://127.0.0.1:{port}"
    finally:
        d.stop()
    assert "Traceback" not in d.logs()


def test_every_response_carries_the_policy_and_no_client_address(
    web: tuple[DaemonProcess, str],
) -> None:
    _, base = web
    for path in ["/", "/devices", "/floors/hq/north/1", "/locate?ip=10.20.23.9&kind=printer"]:
        status, headers, body = _get(base + path)
        assert status == 200, path
        assert headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert headers["X-Content-Type-Options"] == "nosniff"
        # The asker (127.0.0.1) appears nowhere; the typed address only on the lookup page.
        assert b"127.0.0.1" not in body, path
    _, _, body = _get(base + "/locate?ip=10.20.23.9&kind=printer")
    assert b"10.20.23.9" in body
    for path, code in [
        ("/floors/hq/north/9", 404),
        ("/floors/hq/north/x", 404),
        ("/locate?ip=not-an-ip", 400),
        ("/locate?ip=10.20.23.9&kind=fax", 400),
        ("/locate?ip=10.20.23.9&k=99", 400),
        ("/locate?ip=192.0.2.1", 404),
        ("/static/../config.py", 404),
        ("/events/floors/nowhere/x/1", 404),
    ]:
        status, headers, body = _get(base + path)
        assert status == code, (path, status, body[:200])
        assert b"Traceback" not in body
    status, _, body = _get(base + "/locate?ip=not-an-ip")
    assert b"ip: not an IPv4 or IPv6 address" in body


def test_a_token_is_needed_on_every_request(
    web_with_token: tuple[DaemonProcess, str], tmp_path: Path
) -> None:
    require_browser()
    _, base = web_with_token
    for path in ["/", "/floors/hq/north/0", "/static/live.js", "/events/", "/locate?ip=10.0.0.1"]:
        for headers in [
            {},
            {"Authorization": "Bearer wrong-token-123456"},
            {"Authorization": TOKEN},
        ]:
            status, h, body = _get(base + path, headers)
            assert status == 401, (path, headers)
            assert b"10.0.0.1" not in body
            assert "Bearer" in h.get("WWW-Authenticate", "")
    status, _, _ = _get(base + "/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    status, _, _ = _get(base + "/", {"Authorization": f"Basic {basic}"})
    assert status == 200
    # A browser given the token loads the page, its assets and its live stream.
    with chromium({"Authorization": f"Bearer {TOKEN}"}) as b:
        page = b.page()
        resp = page.goto(base + "/floors/hq/north/0")
        assert resp.status == 200
        page.wait_for_selector("#live[data-live=on]", timeout=10000)
        assert page.locator("[data-zone]").count() == 5
        assert b.foreign(base) == []
    with chromium() as b:
        # Without the token the browser is refused (headless Chromium cancels the prompt).
        assert b.context.request.get(base + "/").status == 401


def test_page_weight_and_map_command(web: tuple[DaemonProcess, str], tmp_path: Path) -> None:
    require_browser()
    daemon, base = web
    with chromium() as b:
        page = b.page()
        sizes: dict[str, int] = {}
        page.on(
            "response",
            lambda r: sizes.__setitem__(
                r.url, len(r.body()) if r.status == 200 and "events" not in r.url else 0
            ),
        )
        page.goto(base + "/floors/hq/north/1")
        page.wait_for_selector("#live[data-live=on]", timeout=10000)
        total = sum(sizes.values())
        assert 0 < total <= 200 * 1024, sizes
        zones = sorted(e.get_attribute("data-zone") for e in page.locator("[data-zone]").all())
        devices = sorted(
            e.get_attribute("data-device") for e in page.locator("[data-device]").all()
        )
        assert b.foreign(base) == []
    # The README's command, pointed at this daemon's admin socket instead of `make run`'s.
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if " map hq north 1 > " in x)
    argv, _, target = line.partition(" > ")
    args = shlex.split(argv)
    assert args[:3] == [".venv/bin/nearestctl", "--config", "config/example.toml"], args
    out = tmp_path / target.strip()
    with open(out, "w") as fh:
        r = subprocess.run(
            [sys.executable, "-m", "nearestd.ctl", "--socket", str(daemon.admin), *args[3:]],
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    assert r.returncode == 0, r.stderr
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert sorted(e.attrib["data-zone"] for e in root.iter() if "data-zone" in e.attrib) == zones
    assert (
        sorted(e.attrib["data-device"] for e in root.iter() if "data-device" in e.attrib) == devices
    )
    assert devices == ["prn-n1-east", "prn-n1-hr", "scn-n1-corridor"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nearestd.ctl",
            "--socket",
            str(daemon.admin),
            "map",
            "hq",
            "north",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "no zone of the site maps is on that floor" in r.stderr


def test_reload_takes_a_new_token(
    web_with_token: tuple[DaemonProcess, str], tmp_path: Path
) -> None:
    import signal

    from support import wait_for

    daemon, base = web_with_token
    new = "rotated-token-9a8b7c6d5e"
    (tmp_path / "token").write_text(new + "\n")
    daemon.signal(signal.SIGHUP)
    wait_for(
        "the new token to be accepted",
        lambda: _get(base + "/", {"Authorization": f"Bearer {new}"})[0] == 200,
    )
    assert _get(base + "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 401


def test_web_figures_are_in_stats_and_on_metric_families(
    web_with_token: tuple[DaemonProcess, str],
) -> None:
    from nearestd.adapters.metrics import exported_keys
    from support import ask

    daemon, base = web_with_token
    assert _get(base + "/")[0] == 401
    assert _get(base + "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    stats = ask(daemon, {"op": "stats"}, admin=True)["stats"]["web"]
    assert stats["unauthorised"] >= 1 and stats["requests"] >= 1 and stats["streams"] == 0
    # Every figure is on a metric family (tests/test_metrics_scrape.py's rule).
    assert set(stats) <= exported_keys()["web"]


def test_open_event_streams_do_not_hold_up_shutdown(web: tuple[DaemonProcess, str]) -> None:
    import time

    daemon, base = web
    streams = [
        urllib.request.urlopen(base + path, timeout=10)
        for path in ["/events/", "/events/devices", "/events/floors/hq/south/0?v=old"]
    ]
    try:
        # The stale page (v=old) is sent every part of its page at once.
        first = streams[2].read1(65536)
        while b"event: regions" not in first:
            first += streams[2].read1(65536)
        assert b'"svg"' in first and b"prn-s0-corridor" in first
        t0 = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - t0 < 5.0
    finally:
        for s in streams:
            s.close()
