"""The socket protocol end to end against a nearestd subprocess: order, errors, limits."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from nearest_wire import encode_frame
from nearestd.adapters.socket_server import Connections
from nearestd.config import DaemonConfig, Duration
from support import DaemonProcess, ask, read_frame, tcp_url, wait_for, write_config


def open_connections(daemon: DaemonProcess) -> int:
    """Return the open query connections the daemon counts."""
    return int(ask(daemon, {"op": "stats"}, admin=True)["stats"]["connections"]["open"])


def connect(url: str, source: str | None = None) -> socket.socket:
    host, _, port = url[6:].rpartition(":")
    s = socket.socket()
    if source:
        s.bind((source, 0))
    s.settimeout(5)
    s.connect((host, int(port)))
    return s


def is_closed(s: socket.socket, timeout: float = 3.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    cfg = write_config(
        tmp_path,
        {
            "daemon": {
                "max_connections": 8,
                "idle_timeout": "1s",
                "frame_timeout": "1s",
                "allow": ["127.0.0.0/9", "::1/128"],
                "trusted_peers": ["127.0.0.1/32"],
            }
        },
    )
    d = DaemonProcess(cfg).wait_ready()
    yield d
    d.stop()


def test_pipelined_requests_are_answered_in_order(daemon: DaemonProcess) -> None:
    s = connect(tcp_url(daemon.config))
    reqs = [
        {
            "v": 1,
            "id": i,
            "op": "nearest",
            "kind": "printer" if i % 2 else "scanner",
            "k": 1 + i % 3,
        }
        for i in range(200)
    ]
    s.sendall(b"".join(encode_frame(r) for r in reqs))
    replies = [read_frame(s) for _ in reqs]
    assert [r["id"] for r in replies if r] == list(range(200))
    assert all(r and r["ok"] and len(r["devices"]) == 1 + r["id"] % 3 for r in replies)


def test_malformed_frame_gets_error_and_connection_keeps_serving(daemon: DaemonProcess) -> None:
    s = connect(tcp_url(daemon.config))
    junk = b"\xc1\xc1"
    s.sendall(struct.pack(">I", len(junk)) + junk + encode_frame({"v": 1, "id": 2, "op": "ping"}))
    first, second = read_frame(s), read_frame(s)
    assert first == {
        "v": 1,
        "id": None,
        "ok": False,
        "error": {
            "code": "bad-request",
            "message": "malformed MessagePack: invalid data (a reserved or unknown type byte)",
        },
    }
    assert second and second["ok"] and second["id"] == 2


def test_oversized_frame_closes_only_that_connection(daemon: DaemonProcess) -> None:
    url = tcp_url(daemon.config)
    bystander = connect(url)
    bad = connect(url)
    bad.sendall(struct.pack(">I", 2**32 - 1) + b"x" * 1000)
    reply = read_frame(bad)
    assert reply is not None and reply["error"]["code"] == "too-large"
    assert "4294967295 bytes exceeds the limit of 65536 bytes" in reply["error"]["message"]
    assert is_closed(bad)
    bystander.sendall(encode_frame({"v": 1, "id": 9, "op": "nearest", "kind": "printer"}))
    r = read_frame(bystander)
    assert r and r["ok"] and r["devices"][0]["id"] == "prn-n0-lobby"


def test_connection_cap_refuses_the_extra_one_and_frees_slots(daemon: DaemonProcess) -> None:
    url = tcp_url(daemon.config)
    for _ in range(2):  # the slots come back after the connections close
        conns = [connect(url) for _ in range(8)]
        for c in conns:
            c.sendall(encode_frame({"v": 1, "id": 1, "op": "ping"}))
            assert read_frame(c)
        extra = connect(url)
        reply = read_frame(extra)
        assert reply is not None and reply["error"] == {
            "code": "unavailable",
            "message": "too many connections; try again later",
        }
        assert is_closed(extra)
        for c in conns:
            c.close()
        wait_for("the slots to come back", lambda: open_connections(daemon) == 0)


def test_idle_and_slow_connections_are_closed(daemon: DaemonProcess) -> None:
    url = tcp_url(daemon.config)
    idle = connect(url)
    slow = connect(url)
    slow.sendall(struct.pack(">I", 100) + b"\x80")  # a frame that never completes
    # Closed after their 1 s deadlines (when exactly: test_deadline_sweep_follows_the_clock).
    assert is_closed(idle, 10) and is_closed(slow, 10)
    conns = ask(daemon, {"op": "stats"}, admin=True)["stats"]["connections"]
    assert conns["closed_idle"] == 1 and conns["closed_slow"] == 1


class Conn:
    """What the sweep reads of a connection, and what it does to one."""

    def __init__(
        self,
        conns: Connections,
        last_activity: float,
        frame_started: float | None,
        waiting: bool = False,
    ) -> None:
        self.interface = "tcp"
        self.source = "192.0.2.1"
        self.slot_trusted = False
        self.last_activity = last_activity
        self.frame_started = frame_started
        self.waiting = waiting
        self.conns = conns
        self.closed = ""

    def abort(self, why: str) -> None:
        self.closed = why
        self.conns.forget(self)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("last_activity", "frame_started", "waiting", "now", "closed"),
    [
        (0.0, None, False, 0.9, ""),
        (0.0, None, False, 1.0, ""),  # exactly at the idle deadline: still open
        (0.0, None, False, 1.01, "idle"),
        (0.5, None, False, 1.01, ""),  # activity restarts the idle clock
        (0.9, 0.0, False, 1.01, "frame not completed in time"),
        (0.9, 0.5, False, 1.01, ""),  # a frame begun later has time left
        (0.0, 0.0, False, 1.01, "frame not completed in time"),  # slow wins over idle
        (0.0, None, True, 5.0, ""),  # the daemon is answering it (a reload): not idle
    ],
)
def test_deadline_sweep_follows_the_clock(
    last_activity: float, frame_started: float | None, waiting: bool, now: float, closed: str
) -> None:
    clock = [now]
    conns = Connections(
        DaemonConfig(idle_timeout=Duration(1.0), frame_timeout=Duration(1.0)), lambda: clock[0]
    )
    conn = Conn(conns, last_activity, frame_started, waiting)
    assert conns.add(conn) is None  # type: ignore[arg-type]
    conns.sweep()
    assert conn.closed == closed
    assert (conn in conns.open) == (not closed)
    assert conns.closed_idle == (closed == "idle")
    assert conns.closed_slow == (closed == "frame not completed in time")
    assert conns.slots.untrusted_open == (not closed)  # a closed one gives its slot back


def test_a_steady_stream_cut_mid_frame_is_not_a_slow_frame(daemon: DaemonProcess) -> None:
    # Frames sent for twice the 1 s frame deadline, each send ending in the middle of a
    # frame: every read leaves a partial frame, yet frames keep completing.
    s = connect(tcp_url(daemon.config))
    frames = [encode_frame({"v": 1, "id": i, "op": "ping"}) for i in range(1000)]
    half = 8
    buf = b""
    s.setblocking(False)
    s.sendall(frames[0][:half])
    sent = 0
    t_end = time.monotonic() + 2.2
    while time.monotonic() < t_end and sent < len(frames) - 1:
        s.sendall(frames[sent][half:] + frames[sent + 1][:half])
        sent += 1
        time.sleep(0.005)
        with contextlib.suppress(BlockingIOError):
            buf += s.recv(1 << 16)
    assert sent < len(frames) - 1, "the stream must outlast the deadline"
    s.setblocking(True)
    s.settimeout(5)
    s.sendall(frames[sent][half:])
    want = sent + 1
    replies = 0
    while replies < want:
        size = int.from_bytes(buf[:4], "big") if len(buf) >= 4 else -1
        if size >= 0 and len(buf) >= 4 + size:
            reply = msgpack.unpackb(buf[4 : 4 + size])
            assert reply["ok"] is True and reply["id"] == replies, reply
            replies += 1
            buf = buf[4 + size :]
            continue
        data = s.recv(1 << 16)
        assert data, f"closed after {replies} of {want} replies"
        buf += data
    assert not is_closed(s, 0.2)


def test_forbidden_outside_allow_and_client_ip_only_from_trusted(daemon: DaemonProcess) -> None:
    url = tcp_url(daemon.config)
    outsider = connect(url, source="127.200.0.1")  # outside allow = 127.0.0.0/9
    outsider.sendall(encode_frame({"v": 1, "id": 1, "op": "nearest", "kind": "printer"}))
    r = read_frame(outsider)
    assert r and r["error"]["code"] == "forbidden" and r["id"] == 1
    untrusted = connect(url, source="127.0.0.2")  # allowed, but not a trusted peer
    untrusted.sendall(
        encode_frame(
            {"v": 1, "id": 2, "op": "nearest", "kind": "printer", "client_ip": "10.20.50.9"}
        )
    )
    r = read_frame(untrusted)
    assert r and r["error"] == {
        "code": "forbidden",
        "message": "client_ip: only trusted peers may ask on behalf of another client",
    }
    trusted = connect(url)
    trusted.sendall(
        encode_frame(
            {"v": 1, "id": 3, "op": "nearest", "kind": "printer", "client_ip": "10.20.50.9"}
        )
    )
    r = read_frame(trusted)
    assert r and r["ok"] and r["where"]["zone"] != "n0-lobby"


def test_unknown_location_and_admin_ops_refused_on_query_socket(daemon: DaemonProcess) -> None:
    s = connect(tcp_url(daemon.config))
    s.sendall(encode_frame({"v": 1, "id": 1, "op": "locate", "client_ip": "192.0.2.1"}))
    r = read_frame(s)
    assert r and r["error"] == {
        "code": "unknown-location",
        "message": "no zone's subnets contain this client's address",
    }
    for op in ("reload", "stats", "privacy.export"):
        s.sendall(
            encode_frame(
                {
                    "v": 1,
                    "id": 2,
                    "op": op,
                    **({"ip": "10.0.0.1"} if op.startswith("privacy") else {}),
                }
            )
        )
        r = read_frame(s)
        assert r and r["error"]["code"] == "forbidden" and op in r["error"]["message"]


def test_admin_socket_is_owner_only_and_serves_admin_ops(daemon: DaemonProcess) -> None:
    mode = stat.S_IMODE(os.stat(daemon.admin).st_mode)
    assert mode == 0o600
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.admin))
    s.sendall(encode_frame({"v": 1, "id": 1, "op": "stats"}))
    r = read_frame(s)
    assert r and r["ok"] and r["stats"]["zones"] == 24


def test_unix_socket_peer_is_local_host(daemon: DaemonProcess) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.config.parent / "query.sock"))
    s.sendall(encode_frame({"v": 1, "id": 5, "op": "locate"}))
    r = read_frame(s)
    assert r and r["where"]["zone"] == "n0-lobby"


def test_bad_requests_never_stop_the_daemon(daemon: DaemonProcess) -> None:
    url = tcp_url(daemon.config)
    s = connect(url)
    payloads = [
        b"",
        b"\x00",
        msgpack.packb({"v": 1}),
        msgpack.packb({"id": 1, "v": 1, "op": "nearest", "kind": "x"}),
        b"\xdd\xff\xff\xff\xff",
        b"\x91" * 5000,
        msgpack.packb("x" * 5000),
    ]
    for p in payloads:
        s.sendall(struct.pack(">I", len(p)) + p)
    replies = [read_frame(s) for _ in payloads]
    assert all(
        r is not None and r["ok"] is False and r["error"]["code"] == "bad-request" for r in replies
    )
    assert daemon.proc.poll() is None
    s.sendall(encode_frame({"v": 1, "id": 1, "op": "ping"}))
    assert read_frame(s)["ok"]  # type: ignore[index]
