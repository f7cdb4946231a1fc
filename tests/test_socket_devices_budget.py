"""`devices` is paged, and unread replies cannot grow the daemon: a real nearestd, 4,000 devices.

The attack is issue 12's: 6 connections each pipeline 64 `devices` requests (a few KB
sent, under the rate burst) and never read. Before paging and the output budget that
grew the daemon by about 600 MiB and kept an honest client waiting up to 15 s.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from cups_peer import device, write_map, zone
from nearest_client import Client, ServerError
from nearest_wire import MAX_LIMIT, DevicesRequest
from support import DaemonProcess, tcp_url, write_config

DEVICES = 4000
ATTACKERS = 6
PIPELINED = 64
# What the attack may add to the daemon's resident memory, and how long an honest query
# may take meanwhile: about 10x what this test measures on a quiet machine (2-4 MiB and
# 10-80 ms), far below the 600 MiB and 14.7 s the issue measured before the fix.
RSS_GROWTH_MAX_MIB = 32
HONEST_MAX_S = 1.0
# The output budget per connection the README documents.
BUDGET = 256 * 1024


@pytest.fixture(scope="module")
def big_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("budget")
    features = [zone("z0", "b", 0, ["127.0.0.0/8"])]
    for i in range(DEVICES):
        # Long names and URIs, as real inventories have: each record is about 600 bytes.
        features.append(
            device(
                f"prn-{i:05d}",
                f"Printer {i:05d} on the long corridor past the second stair well",
                f"ipps://printer-{i:05d}.floor.example.org:631/ipp/print/queue",
                "b",
                0,
            )
        )
    site = write_map(tmp / "site.geojson", features)
    # No trusted peers: the attackers are rate-limited like any stranger (64 x 6 < burst).
    cfg = write_config(tmp, {"daemon": {"trusted_peers": []}}, maps=[str(site)], subnets=[])
    d = DaemonProcess(cfg).wait_ready(timeout=60)
    try:
        yield d
    finally:
        d.stop()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def frame(obj: dict[str, object]) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


def read_frame(sock: socket.socket, buf: bytearray) -> dict[str, object]:
    while True:
        if len(buf) >= 4:
            (size,) = struct.unpack_from(">I", buf)
            if len(buf) >= 4 + size:
                body = bytes(buf[4 : 4 + size])
                del buf[: 4 + size]
                return msgpack.unpackb(body)  # type: ignore[no-any-return]
        chunk = sock.recv(1 << 20)
        assert chunk, "the daemon closed the connection"
        buf += chunk


def test_devices_are_paged_with_a_cursor(big_daemon: DaemonProcess) -> None:
    with Client(tcp_url(big_daemon.config), timeout=30) as c:
        first = c.send(DevicesRequest(c.next_id()))
        assert len(first.devices) == MAX_LIMIT and first.next_cursor  # type: ignore[union-attr]
        ids = [d.id for d in c.devices(limit=150)]
        assert ids == sorted(ids) and len(set(ids)) == DEVICES
        last = c.send(DevicesRequest(c.next_id(), limit=7, cursor=None))
        assert [d.id for d in last.devices] == ids[:7]  # type: ignore[union-attr]
        for bad, message in (
            ({"limit": 0}, f"limit: expected an integer from 1 to {MAX_LIMIT}"),
            ({"limit": MAX_LIMIT + 1}, f"limit: expected an integer from 1 to {MAX_LIMIT}"),
            ({"cursor": "not-a-cursor"}, "cursor: not a cursor from a devices reply"),
            ({"cursor": ""}, "cursor: expected a non-empty string of at most 512 bytes"),
        ):
            with pytest.raises(ServerError) as ei:
                c.request({"op": "devices", **bad})
            assert (ei.value.code, ei.value.message) == ("bad-request", message)


def test_unread_devices_replies_do_not_grow_the_daemon(big_daemon: DaemonProcess) -> None:
    pid = big_daemon.proc.pid
    url = tcp_url(big_daemon.config)
    host, port = url[6:].rsplit(":", 1)
    with Client(url, timeout=30) as c:  # warm up: one full listing, read
        assert len(list(c.devices())) == DEVICES
        page_bytes = len(msgpack.packb(c.request({"op": "devices", "limit": MAX_LIMIT})))
    before = rss_mib(pid)
    with Client(f"unix://{big_daemon.admin}") as admin:
        warmup = admin.request({"op": "stats"})["stats"]["queries"].get("tcp/devices/ok", 0)
    attackers = []
    try:
        request = frame({"v": 1, "id": 1, "op": "devices", "limit": MAX_LIMIT})
        for _ in range(ATTACKERS):
            s = socket.socket()
            # A small receive window, so the kernel holds little on the attacker's side.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((host, int(port)))
            s.sendall(request * PIPELINED)
            attackers.append(s)
        # Wait (bounded) until the daemon stops working for them: its CPU time stands still.
        deadline = time.monotonic() + 60
        last = -1
        while time.monotonic() < deadline:
            ticks = cpu_ticks(pid)
            if ticks == last:
                break
            last = ticks
            time.sleep(0.5)
        worst = 0.0
        with Client(url, timeout=30) as honest:
            for _ in range(20):
                started = time.perf_counter()
                assert honest.nearest("printer").devices
                worst = max(worst, time.perf_counter() - started)
        grown = rss_mib(pid) - before
        with Client(f"unix://{big_daemon.admin}") as admin:
            queries = admin.request({"op": "stats"})["stats"]["queries"]
        answered = queries.get("tcp/devices/ok", 0) - warmup
        assert grown < RSS_GROWTH_MAX_MIB, f"RSS grew by {grown:.1f} MiB"
        assert worst < HONEST_MAX_S, f"an honest query took {worst:.3f} s"
        # The budget itself: replies stop being computed once a connection holds its budget
        # unread, beyond what the kernel's socket buffers absorb (tcp_wmem's maximum).
        # Without the budget every one of the 384 requests is answered at once.
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        per_connection = (wmem_max + BUDGET) // page_bytes + 2
        if per_connection < PIPELINED:
            assert answered <= ATTACKERS * per_connection, (answered, per_connection)
        # The attackers were paused, not dropped: each still gets all its replies in order.
        s = attackers[0]
        buf = bytearray()
        for _ in range(PIPELINED):
            reply = read_frame(s, buf)
            assert reply["ok"] is True and len(reply["devices"]) == MAX_LIMIT  # type: ignore[arg-type]
    finally:
        for s in attackers:
            s.close()
