"""Scripted malformed input against a live daemon: each case's exact replies, then open or closed.

The cases live in tests/malformed/frames.json (written by tests/malformed/generate.py
and reviewed like code). The last test proves the daemon is still alive and counted
what it refused, as mosquitto's ZZ-broker-check does.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nearest_client import Client
from nearest_wire import encode_frame
from support import DaemonProcess, read_frame, tcp_url, write_config

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "malformed" / "frames.json").read_text()
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    cfg = write_config(tmp_path_factory.mktemp("malformed"))
    d = DaemonProcess(cfg).wait_ready()
    yield d
    d.stop()


def outcome(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok"):
        return {"ok": True, "id": reply["id"]}
    return {
        "id": reply["id"],
        "ok": False,
        "code": reply["error"]["code"],
        "message": reply["error"]["message"],
    }


def closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_the_table_is_big_enough_and_names_the_required_shapes() -> None:
    names = " | ".join(c["name"] for c in CASES)
    assert len(CASES) >= 300
    for needle in (
        "length header claiming 4 GiB",
        "array32 claiming 2^32-1 items",
        "nested 10,000 deep",
        "single byte 0xff",
        "cut after 0 of",
    ):
        assert needle in names


@pytest.mark.parametrize("case", CASES, ids=[f"{c['group']}: {c['name']}" for c in CASES])
def test_case(daemon: DaemonProcess, case: dict[str, Any]) -> None:
    host, _, port = tcp_url(daemon.config)[6:].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(bytes.fromhex(case["send"]))
        if case["half_close"]:
            s.shutdown(socket.SHUT_WR)
        got = []
        for _ in case["expect"]:
            reply = read_frame(s)
            assert reply is not None, f"connection closed after {len(got)} replies"
            got.append(outcome(reply))
        assert got == case["expect"]
        if case["after"] == "close":
            started = time.monotonic()
            assert closed_within(s, 2.0), "expected the daemon to close the connection"
            assert time.monotonic() - started < 0.5
        else:
            s.sendall(encode_frame({"v": 1, "id": 999_999, "op": "ping"}))
            reply = read_frame(s)
            assert reply is not None and reply["ok"] and reply["id"] == 999_999


def test_zz_daemon_alive_and_counted_malformed(daemon: DaemonProcess) -> None:
    assert daemon.proc.poll() is None
    with Client(f"unix://{daemon.admin}") as c:
        assert c.request({"op": "ping"})["ok"]
        sec = c.request({"op": "stats"})["stats"]["security"]
    assert sec["requests_malformed"]["tcp"] >= 300
    assert "Traceback" not in daemon.logs()
    assert "level=error" not in daemon.logs()
