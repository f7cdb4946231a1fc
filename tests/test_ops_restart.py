"""Warm restart and shutdown: the inventory snapshot, kill -9, corrupt files, SIGTERM timing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from nearest_client import Client
from nearestd.adapters.snapshot import FILE_NAME
from nearestd.app import STOP_BUDGET, Daemon
from nearestd.core.inventory import Saved, decode_inventory, encode_inventory
from nearestd.core.model import Capabilities, Device, DeviceKind, DeviceState
from nearestd.loader import load_world
from support import DaemonProcess, tcp_url, write_config


def ops_device(n: int, **kw: Any) -> Device:
    fields: dict[str, Any] = {
        "id": f"mdns-printer-ops-{n}",
        "kind": DeviceKind.PRINTER,
        "name": f"Ops Printer {n}",
        "uri": f"ipp://127.0.0.{10 + n}:631/ipp/print",
        "capabilities": Capabilities(color=True),
        "source": "mdns",
        "state": DeviceState.IDLE,
        "instance": f"Ops Printer {n}",
        "addresses": (f"127.0.0.{10 + n}",),
    }
    fields.update(kw)
    return Device(**fields)


def seed(state_dir: Path, saved: list[Saved]) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / FILE_NAME
    path.write_bytes(encode_inventory(saved, time.time()))
    return path


def nearest_printers(d: DaemonProcess, client_ip: str = "127.0.0.1") -> dict[str, Any]:
    with Client(f"unix://{d.config.parent / 'query.sock'}") as c:
        reply = c.request({"op": "nearest", "kind": "printer", "k": 20, "client_ip": client_ip})
    return {dev["id"]: dev for dev in reply["devices"]}


def wait_until(what: str, pred: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_then_restart_answers_at_once_with_stale_devices(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    state = tmp_path / "state"
    snapshot = seed(state, [Saved(ops_device(1), time.time() - 5)])
    first = DaemonProcess(cfg).wait_ready()
    try:
        got = nearest_printers(first)["mdns-printer-ops-1"]
        assert got["state"] == "stale" and got["stale"] is True
        assert got["zone"] == "n0-lobby"  # placed again from the site map (subnet rule)
        # The restore is a change: the daemon rewrites the snapshot after its debounce.
        before = snapshot.stat().st_mtime_ns
        wait_until("snapshot rewrite", lambda: snapshot.stat().st_mtime_ns != before)
    finally:
        first.kill()
    names = sorted(p.name for p in state.iterdir() if p.name != "sitemap.cache")
    assert names == [FILE_NAME], "no temp file left behind"
    assert [s.device.id for s in decode_inventory(snapshot.read_bytes())] == ["mdns-printer-ops-1"]
    second = DaemonProcess(cfg).wait_ready()
    try:
        # No discovery runs in this config: the answer comes from the snapshot alone.
        got = nearest_printers(second)["mdns-printer-ops-1"]
        assert got["state"] == "stale"
        with Client(f"unix://{second.admin}") as c:
            inv = {d["id"]: d for d in c.request({"op": "devices"})["devices"]}
        assert inv["mdns-printer-ops-1"]["source"] == "mdns"
        assert "inventory restored" in second.logs()
    finally:
        second.stop()


def test_restored_stopped_device_is_not_answered_and_unconfirmed_ones_expire(
    tmp_path: Path,
) -> None:
    cfg = write_config(tmp_path, sections={"discovery": {"expire_after": "4s"}})
    now = time.time()
    snapshot = seed(
        tmp_path / "state",
        [
            Saved(ops_device(1), now),
            Saved(ops_device(2, state=DeviceState.STOPPED), now),
            Saved(ops_device(3), now - 3.0),  # expires about a second after start
        ],
    )
    d = DaemonProcess(cfg).wait_ready()
    try:
        answered = nearest_printers(d)
        assert "mdns-printer-ops-1" in answered and "mdns-printer-ops-2" not in answered
        wait_until("expiry of ops-3", lambda: "mdns-printer-ops-3" not in nearest_printers(d))
        assert "mdns-printer-ops-1" in nearest_printers(d)

        def saved_ids() -> set[str]:
            return {s.device.id for s in decode_inventory(snapshot.read_bytes())}

        # The expiry is a change: the snapshot follows it.
        wait_until("snapshot without ops-3", lambda: "mdns-printer-ops-3" not in saved_ids())
        wait_until(
            "expiry of the rest", lambda: not nearest_printers(d).keys() & {"mdns-printer-ops-1"}
        )
    finally:
        d.stop()
    assert saved_ids() == set()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"format": "nearestd-inventory", "version": 1, "devi', "not valid JSON"),
        (b'{"format": "nearestd-inventory", "version": 99, "devices": []}', "version 99"),
        (b'{"format": "something else"}', "not a nearestd-inventory snapshot"),
        (b"\x00\xff" * 100, "not valid JSON"),
    ],
)
def test_a_corrupt_or_foreign_snapshot_is_ignored_with_one_log_line(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    cfg = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / FILE_NAME).write_bytes(content)
    d = DaemonProcess(cfg).wait_ready()
    try:
        assert "prn-n0-lobby" in nearest_printers(d)
    finally:
        assert d.stop() == 0
    lines = [line for line in d.logs().splitlines() if "inventory snapshot" in line]
    assert len(lines) == 1, lines
    assert "level=warning" in lines[0] and problem in lines[0]


def test_the_snapshot_never_holds_client_data(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    snapshot = seed(tmp_path / "state", [Saved(ops_device(1), time.time())])
    before = snapshot.stat().st_mtime_ns
    d = DaemonProcess(cfg).wait_ready()
    try:
        for i in range(5):
            nearest_printers(d, client_ip=f"10.20.23.{100 + i}")
        wait_until("snapshot rewrite", lambda: snapshot.stat().st_mtime_ns != before)
    finally:
        d.stop()
    text = snapshot.read_text()
    assert "10.20.23." not in text
    doc = json.loads(text)
    assert set(doc) == {"format", "version", "written", "devices"}
    assert (snapshot.stat().st_mode & 0o777) == 0o600
    # Beside it only the compiled site map (mapcache.py), which holds no client data either.
    assert [p.name for p in snapshot.parent.iterdir() if p.name != "sitemap.cache"] == [FILE_NAME]


def _frame(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


class Replies:
    """Reads reply frames off a socket, keeping partial frames between calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def read(self, n: int, timeout: float) -> list[dict[str, Any]]:
        self.sock.settimeout(timeout)
        out: list[dict[str, Any]] = []
        while len(out) < n:
            while len(self.buf) >= 4 and len(self.buf) >= 4 + struct.unpack(">I", self.buf[:4])[0]:
                size = struct.unpack(">I", self.buf[:4])[0]
                out.append(msgpack.unpackb(self.buf[4 : 4 + size]))
                self.buf = self.buf[4 + size :]
                if len(out) == n:
                    return out
            chunk = self.sock.recv(65536)
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
        return out


def test_sigterm_answers_in_flight_requests_and_exits_within_5s(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, sections={"metrics": {"listen": "127.0.0.1:0"}})
    d = DaemonProcess(cfg).wait_ready()
    host, port = tcp_url(cfg)[6:].rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(5)]
    busy = socket.create_connection((host, int(port)))
    try:
        n = 300
        busy.sendall(
            b"".join(
                _frame({"v": 1, "id": i, "op": "nearest", "kind": "printer", "k": 3})
                for i in range(n)
            )
        )
        replies = Replies(busy)
        first = replies.read(1, 5)  # the daemon is answering the burst
        started = time.monotonic()
        d.signal(signal.SIGTERM)
        rest = replies.read(n - 1, 5)
        after = replies.read(1, 5)  # then the connection closes cleanly
        code = d.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        for s in [*idle, busy]:
            s.close()
        d.stop()
    assert code == 0
    assert elapsed < 5.0, f"SIGTERM to exit took {elapsed:.2f}s"
    answered = first + rest
    assert [r["id"] for r in answered] == list(range(n))
    assert all(r["ok"] for r in answered)
    assert after == [] and replies.eof
    logs = d.logs()
    assert "stopping" in logs and "stopped" in logs


class Hung:
    """A component that never finishes stopping, or fails to follow a reload."""

    name = "hung"

    def __init__(self, seen: list[str] | None = None) -> None:
        self.seen = seen

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await asyncio.sleep(3600)

    def reconfigure(self, cfg: Any) -> None:
        if self.seen is None:
            raise RuntimeError("adapter bug")
        self.seen.append("later component followed")

    def stats(self) -> dict[str, Any]:
        return {}


async def test_a_hung_adapter_cannot_hold_shutdown_past_the_budget(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    daemon = await asyncio.to_thread(lambda: Daemon(load_world(cfg), str(cfg)))
    daemon.components[1:1] = [Hung(), Hung(), Hung()]
    await daemon.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await daemon.stop()
    assert loop.time() - started < STOP_BUDGET + 1.0
    assert not os.path.exists(tmp_path / "query.sock")


def test_an_unwritable_state_dir_is_reported_once_and_not_fatal(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cfg = write_config(tmp_path, sections={"daemon": {"state_dir": str(blocker / "state")}})
    d = DaemonProcess(cfg).wait_ready()
    try:
        wait_until("a failed write", lambda: "cannot write inventory snapshot" in d.logs())
        assert "prn-n0-lobby" in nearest_printers(d)
    finally:
        assert d.stop() == 0  # the shutdown flush fails the same way, quietly
    lines = [x for x in d.logs().splitlines() if "inventory snapshot" in x]
    assert len([x for x in lines if "cannot write" in x]) == 1, lines
    assert all("level=error" in x for x in lines if "cannot write" in x)


async def test_a_component_failing_to_follow_a_reload_does_not_break_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    daemon = await asyncio.to_thread(lambda: Daemon(load_world(cfg), str(cfg)))
    seen: list[str] = []
    daemon.components[:0] = [Hung()]
    daemon.components.append(Hung(seen))
    try:
        assert await daemon.reload() == []
        assert seen == ["later component followed"] and daemon.reloads_ok == 1
    finally:
        daemon.components = [c for c in daemon.components if not isinstance(c, Hung)]
        await daemon.stop()


async def test_a_background_task_that_fails_is_logged_and_the_daemon_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_config(tmp_path)
    daemon = await asyncio.to_thread(lambda: Daemon(load_world(cfg), str(cfg)))
    await daemon.start()
    try:

        async def broken() -> None:
            raise RuntimeError("adapter bug")

        failed = daemon.spawn(broken(), "broken")
        await asyncio.wait_for(asyncio.shield(failed), 10)
        assert any(
            r.getMessage() == "background task failed" and getattr(r, "task", "") == "broken"
            for r in caplog.records
        )
        # The task group is intact: the other tasks run and the daemon still reloads.
        ticker = next(t for t in asyncio.all_tasks() if t.get_name() == "ticker")
        assert not ticker.done()
        assert await asyncio.wait_for(daemon.reload(), 30) == []
    finally:
        await daemon.stop()
    assert ticker.done()


def test_encoding_the_snapshot_holds_little_more_than_the_snapshot() -> None:
    # A flood fills the table to max_devices; the writer must not need 15x the file's size
    # (orjson's per-call buffers kept in a list did, and broke the mDNS flood's RSS budget).
    import tracemalloc

    saved = [
        Saved(
            Device(f"mdns-{i}", DeviceKind.PRINTER, f"P {i}", f"ipp://10.0.{i // 250}.{i % 250}/", source="mdns"),
            1.0,
        )
        for i in range(2000)
    ]
    tracemalloc.start()
    try:
        data = encode_inventory(saved, 2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(decode_inventory(data)) == 2000
    assert peak < 3 * len(data), (peak, len(data))
