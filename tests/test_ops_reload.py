"""Reload: all or nothing, between requests, with discovered devices kept and re-placed."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import nearestd.app as app
from nearest_client import Client, ServerError
from nearestd.adapters.snapshot import FILE_NAME
from nearestd.core.inventory import Saved, encode_inventory
from nearestd.core.model import Device, DeviceKind
from nearestd.loader import load_world
from nearestd.service import ADMIN_PEER
from support import DEMO_CSV, DEMO_MAP, DaemonProcess, free_port, tcp_url, write_config

PROBE_ID = "prn-reload-probe"
DISCOVERED_ID = "mdns-printer-reload"


def extra_map(path: Path) -> Path:
    """A second site map: one static printer, and a pin for the discovered printer."""
    features = [
        {
            "type": "Feature",
            "properties": {
                "feature_type": "device",
                "static": True,
                "id": PROBE_ID,
                "name": "Reload Probe",
                "kind": "printer",
                "uri": "ipp://10.20.10.99:631/ipp/print",
                "site": "hq",
                "building": "north",
                "level": 0,
            },
            "geometry": {"type": "Point", "coordinates": [4.8947504, 52.3702337]},
        },
        {
            "type": "Feature",
            "properties": {
                "feature_type": "device",
                "site": "hq",
                "building": "north",
                "level": 1,
                "match": {"name": "Reload Printer"},
                "subnets": ["127.0.0.42/32"],  # where it may announce from
            },
            "geometry": {"type": "Point", "coordinates": [4.8951175, 52.3704583]},
        },
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


class Setup:
    """A daemon whose config file the test rewrites between reloads."""

    def __init__(self, tmp: Path, metrics: bool = False) -> None:
        self.tmp = tmp
        self.extra = extra_map(tmp / "extra.geojson")
        self.broken_map = tmp / "broken.geojson"
        self.broken_map.write_text('{"type": "FeatureCollection", "features": [')
        self.metrics = f"127.0.0.1:{free_port()}" if metrics else ""
        self.cfg = self.write([str(DEMO_MAP)])
        self.original = self.cfg.read_text()
        state = tmp / "state"
        state.mkdir()
        discovered = Device(
            id=DISCOVERED_ID,
            kind=DeviceKind.PRINTER,
            name="Reload Printer",
            uri="ipp://127.0.0.42:631/ipp/print",
            source="mdns",
            instance="Reload Printer",
            addresses=("127.0.0.42",),
        )
        (state / FILE_NAME).write_bytes(
            encode_inventory([Saved(discovered, time.time())], time.time())
        )

    def write(self, maps: list[str], **extra: dict[str, Any]) -> Path:
        sections: dict[str, dict[str, Any]] = {"metrics": {"listen": self.metrics}}
        sections.update(extra)
        cfg = write_config(self.tmp, sections=sections, maps=maps, subnets=[str(DEMO_CSV)])
        if hasattr(self, "original"):
            # Keep the ports of the first config: a reload does not move sockets.
            listen = self.original.split("\n", 3)[1]
            lines = cfg.read_text().split("\n")
            lines[1] = listen
            cfg.write_text("\n".join(lines))
        return cfg

    def good(self) -> None:
        self.write([str(DEMO_MAP), str(self.extra)])

    def broken_map_file(self) -> None:
        self.write([str(DEMO_MAP), str(self.extra), str(self.broken_map)])

    def broken_toml(self) -> None:
        self.cfg.write_text(
            self.cfg.read_text() + "\n[ranking]\nfloor_penalty_m = 'x'\nbogus = 1\n"
        )


def inventory(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    with Client(f"unix://{d.admin}") as c:
        return {x["id"]: x for x in c.request({"op": "devices"})["devices"]}


def reload(d: DaemonProcess) -> dict[str, Any]:
    with Client(f"unix://{d.admin}") as c:
        try:
            return c.request({"op": "reload"})
        except ServerError as exc:
            return exc.reply


def nearestctl(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nearestd.ctl", "--socket", str(d.admin), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def reload_metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        page = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(page):
        for s in fam.samples:
            if s.name.startswith("nearest_config_"):
                key = s.name + (f"{{{s.labels['result']}}}" if "result" in s.labels else "")
                out[key] = s.value
    return out


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    s = Setup(tmp_path, metrics=True)
    d = DaemonProcess(s.cfg).wait_ready()
    try:
        yield s, d
    finally:
        d.stop()


def test_good_reload_switches_and_keeps_discovered_devices_placing_them_again(
    setup: tuple[Setup, DaemonProcess],
) -> None:
    s, d = setup
    before = inventory(d)
    assert PROBE_ID not in before
    assert before[DISCOVERED_ID]["zone"] == "n0-lobby"
    assert before[DISCOVERED_ID]["placed_by"] == "subnet"
    m0 = reload_metrics(s.metrics)
    s.good()
    assert reload(d)["reloaded"] is True
    after = inventory(d)
    assert PROBE_ID in after
    assert after[DISCOVERED_ID]["zone"] == "n1-finance"  # the new pin wins over the subnet
    assert after[DISCOVERED_ID]["placed_by"] == "pin"
    m1 = reload_metrics(s.metrics)
    assert m1["nearest_config_reloads_total{success}"] >= 1
    assert m1["nearest_config_last_reload_successful"] == 1
    assert (
        m1["nearest_config_last_reload_success_timestamp_seconds"]
        > m0["nearest_config_last_reload_success_timestamp_seconds"]
    )


@pytest.mark.parametrize("breakage", ["broken_map_file", "broken_toml"])
def test_broken_reload_keeps_the_old_state_and_reports_every_problem(
    setup: tuple[Setup, DaemonProcess], breakage: str
) -> None:
    s, d = setup
    s.good()
    assert reload(d)["ok"]
    getattr(s, breakage)()
    reply = reload(d)
    assert reply["ok"] is False and reply["error"]["code"] == "bad-request"
    problems = reply["problems"]
    if breakage == "broken_map_file":
        assert len(problems) == 1 and "broken.geojson" in problems[0]
    else:
        assert len(problems) == 2
        assert any("[ranking] floor_penalty_m" in p for p in problems)
        assert any("[ranking] bogus: unknown key" in p for p in problems)
    # Old state kept: the probe from the last good config is still served.
    with Client(tcp_url(s.cfg)) as c:
        ids = [x.id for x in c.nearest("printer", k=20).devices]
    assert PROBE_ID in ids
    logged = [line for line in d.logs().splitlines() if "reload refused" in line]
    assert len(logged) == len(problems)
    assert all("level=error" in line for line in logged)
    m = reload_metrics(s.metrics)
    assert m["nearest_config_reloads_total{failure}"] == 1
    assert m["nearest_config_last_reload_successful"] == 0
    stats = json.loads(nearestctl(d, "--json", "stats").stdout)["stats"]["operations"]
    assert stats["reloads_failed"] == 1 and stats["last_reload_ok"] is False
    # nearestctl says the same, exits 1, and names the problems.
    r = nearestctl(d, "reload")
    assert r.returncode == 1
    assert "still running the old configuration" in r.stderr
    assert all(p in r.stderr for p in problems)


def test_sighup_reloads(setup: tuple[Setup, DaemonProcess]) -> None:
    s, d = setup
    s.good()
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while PROBE_ID not in inventory(d):
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.05)
    assert "reloaded" in d.logs()


QUERY_LOOP = r"""
import json, os, sys, time
from nearest_client import Client
url, stop_file = sys.argv[1], sys.argv[2]
ok = failed = 0
announced = False
errors = []
deadline = time.monotonic() + 30  # bounded even if the parent never says stop
while time.monotonic() < deadline and ok + failed < 500000:
    if os.path.exists(stop_file):
        break
    try:
        with Client(url, timeout=5) as c:  # a new connection now and then, too
            for _ in range(50):
                reply = c.nearest("printer", k=3)
                ok += 1 if reply.devices else 0
                failed += 0 if reply.devices else 1
    except Exception as exc:
        failed += 1
        errors.append(repr(exc))
    if not announced and ok >= 50:
        announced = True
        print("running", flush=True)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}), flush=True)
"""


def test_reloads_under_query_load_from_another_process_lose_no_query(
    setup: tuple[Setup, DaemonProcess],
) -> None:
    s, d = setup
    stop = s.tmp / "stop-querying"
    child = subprocess.Popen(
        [sys.executable, "-c", QUERY_LOOP, tcp_url(s.cfg), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "running"
        results = []
        for step in ("good", "broken_map_file", "original", "broken_toml", "good", "original"):
            if step == "original":
                s.cfg.write_text(s.original)
            else:
                getattr(s, step)()
            results.append(reload(d)["ok"])
            time.sleep(0.2)
        stop.touch()
        out, _ = child.communicate(timeout=40)
    finally:
        child.kill()
    assert results == [True, False, True, False, True, True]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["failed"] == 0, report
    assert report["ok"] >= 100, report


def test_a_new_metrics_address_waits_for_a_restart_and_says_so(
    setup: tuple[Setup, DaemonProcess],
) -> None:
    s, d = setup
    old = s.metrics
    s.metrics = f"127.0.0.1:{free_port()}"
    s.good()
    assert reload(d)["ok"]
    assert "metrics listen changed; it takes effect at the next restart" in d.logs()
    assert reload_metrics(old)["nearest_config_reloads_total{success}"] == 1


SLOW_PARSE = 1.0


async def daemon_with_slow_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Setup, app.Daemon, list[str]]:
    """Start a daemon whose reloads read the files for SLOW_PARSE s; note their threads."""
    s = await asyncio.to_thread(Setup, tmp_path)
    daemon = await asyncio.to_thread(lambda: app.Daemon(load_world(s.cfg), str(s.cfg)))
    threads: list[str] = []

    def slow_load(path: str, use_cache: bool = False) -> Any:
        threads.append(threading.current_thread().name)
        time.sleep(SLOW_PARSE)  # stands in for a large campus (100k prefixes: ~4 s here)
        return load_world(path, use_cache)

    monkeypatch.setattr(app, "load_world", slow_load)
    await daemon.start()
    return s, daemon, threads


async def longest_stall(done: Callable[[], bool], started: float) -> float:
    """Tick the loop every 10 ms until ``done``; return the longest tick (a stalled loop)."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while not done():
        before = loop.time()
        await asyncio.sleep(0.01)
        worst = max(worst, loop.time() - before)
        assert loop.time() - started < 10
    return worst


async def test_sighup_reload_parses_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big site map takes seconds to parse; queries must not wait for it."""
    s, daemon, _ = await daemon_with_slow_parse(tmp_path, monkeypatch)
    try:
        await asyncio.to_thread(s.good)  # file writes stay off the loop
        loop = asyncio.get_running_loop()
        started = loop.time()
        daemon.reload_in_background()
        daemon.reload_in_background()  # before the parse starts: the same reload
        await asyncio.sleep(0.1)
        daemon.reload_in_background()  # while it parses: one more after it
        worst = await longest_stall(lambda: daemon.reloads_ok > 0, started)
        assert worst < 0.5, f"the event loop stalled {worst:.2f}s during the reload"
        assert loop.time() - started >= SLOW_PARSE
        assert daemon.service.table.get(PROBE_ID) is not None
        while daemon._reloading is not None and not daemon._reloading.done():
            await asyncio.sleep(0.05)
        assert daemon.reloads_ok == 2 and daemon.reloads_failed == 0
        await asyncio.to_thread(s.broken_toml)
        daemon.reload_in_background()
        while daemon.reloads_failed == 0:
            await asyncio.sleep(0.05)
        assert daemon.service.table.get(PROBE_ID) is not None  # old state kept
    finally:
        await daemon.stop()


async def test_the_admin_reload_op_takes_the_same_path_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin op waits for its answer without holding up anyone else's."""
    s, daemon, threads = await daemon_with_slow_parse(tmp_path, monkeypatch)
    try:
        await asyncio.to_thread(s.good)  # file writes stay off the loop
        started = asyncio.get_running_loop().time()
        answer = daemon.service.handle({"v": 1, "id": 7, "op": "reload"}, ADMIN_PEER, time.time())
        assert not isinstance(answer, dict)  # the reply comes when the reload is done
        waiting = asyncio.ensure_future(answer)
        worst = await longest_stall(waiting.done, started)
        assert waiting.result() == {"v": 1, "id": 7, "ok": True, "reloaded": True}
        assert worst < 0.5, f"the event loop stalled {worst:.2f}s during the reload"
        assert threads and threads[0] != "MainThread"
        assert daemon.service.table.get(PROBE_ID) is not None
        # SIGHUP during an admin reload: the asker still gets the answer of its own.
        await asyncio.to_thread(s.broken_toml)
        answer = daemon.service.handle({"v": 1, "id": 8, "op": "reload"}, ADMIN_PEER, time.time())
        daemon.reload_in_background()
        reply = await asyncio.ensure_future(answer)  # type: ignore[arg-type]
        assert reply["ok"] is False and len(reply["problems"]) == 2
        assert daemon.reloads_failed == 1  # one read of the files for both askers
    finally:
        await daemon.stop()


def test_pipelined_admin_requests_around_a_reload_are_answered_in_order(
    setup: tuple[Setup, DaemonProcess],
) -> None:
    import socket

    import msgpack

    s, d = setup
    s.good()
    frames = b""
    for i, op in enumerate(["ping", "reload", "stats", "ping"], start=1):
        body = msgpack.packb({"v": 1, "id": i, "op": op}, use_bin_type=True)
        frames += len(body).to_bytes(4, "big") + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(d.admin))
        sock.sendall(frames)
        replies = []
        buf = b""
        while len(replies) < 4:
            chunk = sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                size = int.from_bytes(buf[:4], "big")
                replies.append(msgpack.unpackb(buf[4 : 4 + size]))
                buf = buf[4 + size :]
    assert [r["id"] for r in replies] == [1, 2, 3, 4]
    assert replies[1]["reloaded"] is True
    assert replies[2]["stats"]["operations"]["reloads_ok"] == 1


def test_a_reload_shares_one_core_with_the_loop_and_gives_every_thread_its_cores_back() -> None:
    import os
    import threading

    from nearestd.app import restore_cores, share_one_core

    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this machine has one core: nothing to share (make test runs on two)")
    seen: dict[str, object] = {}

    def loop_thread() -> None:
        before = os.sched_getaffinity(0)
        core = share_one_core()
        assert core is not None
        cpu, cpus = core
        seen["during"] = os.sched_getaffinity(0)
        started = threading.Thread(target=lambda: seen.setdefault("child", os.sched_getaffinity(0)))
        started.start()  # a thread started meanwhile inherits the one core
        started.join()
        restore_cores(cpu, cpus)
        seen["after"] = os.sched_getaffinity(0)
        seen["cpu"], seen["before"] = cpu, before

    t = threading.Thread(target=loop_thread)
    t.start()
    t.join(30)
    assert seen["during"] == {seen["cpu"]} and seen["child"] == {seen["cpu"]}
    assert seen["after"] == seen["before"]
    assert os.sched_getaffinity(0) == seen["before"]  # other threads were never moved
