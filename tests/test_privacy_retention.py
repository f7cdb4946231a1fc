"""Subject access over the admin socket with a short retention: export, expiry, erase."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nearest_client import Client, ServerError
from nearest_wire import decode_reply, encode_frame
from support import DaemonProcess, tcp_url, wait_for, write_config


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    cfg = write_config(tmp_path, {"privacy": {"retention": "4s"}})
    d = DaemonProcess(cfg).wait_ready()
    yield d
    d.stop()


def ask_from(daemon: DaemonProcess, source: str, n: int = 1, op: str = "nearest") -> None:
    url = tcp_url(daemon.config)
    host, _, port = url[6:].rpartition(":")
    s = socket.socket()
    s.bind((source, 0))
    s.connect((host, int(port)))
    for i in range(n):
        req: dict[str, Any] = {"v": 1, "id": i, "op": op}
        if op == "nearest":
            req["kind"] = "printer"
        s.sendall(encode_frame(req))
        head = s.recv(4)
        body = b""
        size = int.from_bytes(head, "big")
        while len(body) < size:
            body += s.recv(size - len(body))
        assert decode_reply(body)["ok"]
    s.close()


def ctl(daemon: DaemonProcess, *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "nearestd.ctl", "--socket", str(daemon.admin), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stdout + proc.stderr


def export(daemon: DaemonProcess, ip: str) -> list[dict[str, Any]]:
    code, out = ctl(daemon, "--json", "privacy", "export", ip)
    assert code == 0, out
    return json.loads(out)["entries"]  # type: ignore[no-any-return]


def test_export_lists_what_each_address_asked(daemon: DaemonProcess) -> None:
    ask_from(daemon, "127.77.1.2", 2)
    ask_from(daemon, "127.77.1.2", 1, op="locate")
    ask_from(daemon, "127.77.1.3", 1)
    got = export(daemon, "127.77.1.2")
    assert [e["op"] for e in got] == ["nearest", "nearest", "locate"]
    assert all(e["zone"] == "n0-lobby" for e in got)
    assert got[0]["devices"] and got[0]["devices"][0].startswith("prn-")
    assert set(got[0]) == {"ts", "zone", "op", "devices"}, "no pseudonym or key in an export"
    assert len(export(daemon, "127.77.1.3")) == 1
    assert export(daemon, "127.77.1.4") == []


def test_entries_are_purged_once_their_retention_ends(tmp_path: Path) -> None:
    # When exactly an entry goes is test_privacy_log.py's, driven by ``now``; here the
    # daemon's tick purges them, which the test waits for (generously) instead of sleeping.
    cfg = write_config(tmp_path, {"privacy": {"retention": "1s"}})
    d = DaemonProcess(cfg).wait_ready()
    try:
        ask_from(d, "127.77.1.2", 3)
        wait_for(
            "the entries to be purged",
            lambda: stats(d)["location_log_purged"] >= 3,
            timeout=20,
            show=lambda: stats(d),
        )
        assert stats(d)["location_log_entries"] == 0
        assert export(d, "127.77.1.2") == []
    finally:
        d.stop()


def stats(d: DaemonProcess) -> dict[str, Any]:
    with Client(f"unix://{d.admin}") as c:
        return c.request({"op": "stats"})["stats"]  # type: ignore[no-any-return]


def test_erase_reports_the_count_and_leaves_others(daemon: DaemonProcess) -> None:
    ask_from(daemon, "127.78.0.9", 3)
    ask_from(daemon, "127.78.0.10", 1)
    code, out = ctl(daemon, "privacy", "erase", "127.78.0.9")
    assert code == 0 and out.strip() == "erased 3 entries"
    assert export(daemon, "127.78.0.9") == []
    assert len(export(daemon, "127.78.0.10")) == 1
    code, out = ctl(daemon, "privacy", "erase", "127.78.0.9")
    assert out.strip() == "erased 0 entries"
    assert "127.78.0.9" not in daemon.logs()


def test_privacy_ops_only_on_the_admin_socket(daemon: DaemonProcess) -> None:
    with Client(tcp_url(daemon.config)) as c, pytest.raises(ServerError) as err:
        c.request({"op": "privacy.export", "ip": "127.0.0.1"})
    assert err.value.code == "forbidden"


def test_ipv6_client_ip_export(daemon: DaemonProcess) -> None:
    with Client(tcp_url(daemon.config)) as c:
        c.request({"op": "nearest", "kind": "printer", "client_ip": "2001:db8:20:23::abcd"})
    got = export(daemon, "2001:DB8:20:23:0:0:0:ABCD")  # any spelling of the address
    assert [e["zone"] for e in got] == ["n1-finance"]


def test_operator_lookups_show_as_such_in_the_export(daemon: DaemonProcess) -> None:
    code, _ = ctl(daemon, "locate", "127.79.0.5")
    assert code == 0
    got = export(daemon, "127.79.0.5")
    assert [e["op"] for e in got] == ["admin.locate"]
