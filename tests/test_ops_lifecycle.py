"""The daemon under a service manager: sd_notify in order, and one structured log line per event."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from nearest_client import Client
from nearestd.logs import JsonFormatter, KeyValueFormatter
from support import DaemonProcess, write_config


def receive(rx: socket.socket, until: str, timeout: float, into: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rx.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            into.append(rx.recv(4096).decode())
        except TimeoutError:
            break
        if into[-1].startswith(until):
            return
    raise AssertionError(f"no {until} within {timeout}s; got {into}")


def test_ready_status_watchdog_and_stopping_arrive_in_order(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"nearest-notify-{uuid.uuid4().hex}"
    rx.bind("\0" + name)  # an abstract socket, as systemd may hand out
    messages: list[str] = []
    d = DaemonProcess(
        write_config(tmp_path),
        env={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "200000"},
    )
    try:
        receive(rx, "READY=1", 15, messages)
        # READY comes only once the sockets answer.
        with Client(f"unix://{d.admin}") as c:
            assert c.request({"op": "ping"})["ok"]
        for _ in range(3):
            receive(rx, "WATCHDOG=1", 2, messages)
        assert d.stop() == 0
        receive(rx, "STOPPING=1", 5, messages)
    finally:
        d.kill()
        rx.close()
    kinds = [m.split("\n", 1)[0].split("=", 1)[0] for m in messages]
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING"
    assert kinds.count("READY") == 1 and kinds.count("STOPPING") == 1
    assert kinds.count("WATCHDOG") >= 3
    assert "STATUS" in kinds[1:-1]  # a STATUS update of its own, between READY and STOPPING
    status = [line for m in messages for line in m.split("\n") if line.startswith("STATUS=")]
    assert status[0] == "STATUS=serving 17 devices (0 unlocated, 0 stale) in 24 zones"
    assert "NOTIFY_SOCKET" not in d.logs()


def test_without_a_watchdog_request_no_pings_are_sent(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    rx.bind(str(path))
    messages: list[str] = []
    d = DaemonProcess(write_config(tmp_path / "d"), env={"NOTIFY_SOCKET": str(path)})
    try:
        receive(rx, "READY=1", 15, messages)
        time.sleep(0.5)
        assert d.stop() == 0
        receive(rx, "STOPPING=1", 5, messages)
    finally:
        d.kill()
        rx.close()
    assert not any(m.startswith("WATCHDOG") for m in messages)


def kv_fields(line: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        value = m.group(2)
        out[m.group(1)] = json.loads(value) if value.startswith('"') else value
    return out


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_every_log_line_is_one_structured_event(tmp_path: Path, fmt: str) -> None:
    cfg = write_config(tmp_path, sections={"logging": {"format": fmt, "level": "debug"}})
    d = DaemonProcess(cfg).wait_ready()
    with Client(f"unix://{d.admin}") as c:
        c.request({"op": "reload"})
    d.stop()
    lines = d.logs().splitlines()
    assert len(lines) >= 4
    events = []
    for line in lines:
        if fmt == "json":
            rec = json.loads(line)
        else:
            assert line.startswith("ts="), line
            rec = kv_fields(line)
        assert rec["level"] in ("debug", "info", "warning", "error", "critical"), line
        events.append(rec["event"])
    for wanted in ("serving", "reloaded", "stopping", "stopped"):
        assert wanted in events


def test_log_level_flag_overrides_the_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, sections={"logging": {"level": "debug"}})
    d = DaemonProcess(cfg, extra_args=["--log-level", "warning"]).wait_ready()
    d.stop()
    assert "event=serving" not in d.logs()
    assert all("level=warning" in x or "level=error" in x for x in d.logs().splitlines())
    cfg = write_config(tmp_path / "verbose", sections={"logging": {"level": "error"}})
    d = DaemonProcess(cfg, extra_args=["--log-level", "debug"]).wait_ready()
    d.stop()
    assert "event=serving" in d.logs()


def test_exceptions_and_newlines_stay_on_one_line() -> None:
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed:\n%s", ("detail\nmore",), None
        )
        record.exc_info = sys.exc_info()
    record.detail = "a\nb"
    kv = KeyValueFormatter().format(record)
    js = JsonFormatter().format(record)
    assert "\n" not in kv and "\n" not in js
    assert kv_fields(kv)["error"] == "ValueError"
    assert kv_fields(kv)["error_at"].startswith("test_ops_lifecycle.py:")
    assert json.loads(js)["detail"] == "a\nb"
