"""The poller's HTTP/1.1 client and schedule against hand-made servers on loopback sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from nearestd.adapters.poller import Poller, PollFailure, exchange, insecure_tls_context
from nearestd.config import PollerConfig
from nearestd.core.model import Device, DeviceKind, DeviceState
from nearestd.loader import load_world
from nearestd.service import Service
from support import DEMO_MAP, DaemonProcess, free_port, write_config

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def attr(tag: int, name: str, value: bytes) -> bytes:
    n = name.encode()
    return struct.pack(">BH", tag, len(n)) + n + struct.pack(">H", len(value)) + value


def ipp_reply(request_id: bytes, state: int = 3) -> bytes:
    return (
        b"\x02\x00\x00\x00"
        + request_id
        + b"\x01"
        + attr(0x47, "attributes-charset", b"utf-8")
        + b"\x04"
        + attr(0x23, "printer-state", struct.pack(">i", state))
        + attr(0x44, "printer-state-reasons", b"none")
        + b"\x03"
    )


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[None]] = set()

    async def start(handler: Handler) -> int:
        async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await handler(r, w)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()
                handlers.discard(task)

        s = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(s)
        return int(s.sockets[0].getsockname()[1])

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()
    # A handler still talking to a poller that gave up (a slow drip) ends with the test.
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def aservice(tmp_path: Path) -> Service:
    """Build the service in a worker thread: loading the demo campus would block the loop."""
    return await asyncio.to_thread(service, tmp_path)


def service(tmp_path: Path) -> Service:
    data = json.loads(DEMO_MAP.read_text())
    data["features"] = [f for f in data["features"] if not f["properties"].get("static")]
    site = tmp_path / "site.geojson"
    site.write_text(json.dumps(data))
    world = load_world(str(write_config(tmp_path, maps=[str(site)])))
    return Service(world.config, world.sitemap, time.time(), lambda: b"k" * 32)


async def poll_once(tmp_path: Path, uri: str, **cfg: object) -> Device:
    svc = await aservice(tmp_path)
    kind = DeviceKind.SCANNER if uri.startswith("http") else DeviceKind.PRINTER
    svc.upsert_device(Device("d", kind, "D", uri, source="mdns"), time.time())
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, **{"timeout": 2.0, **cfg}))  # type: ignore[arg-type]
    await poller.start()
    try:
        await poller.poll_all()
    finally:
        await poller.stop()
    rec = svc.table.get("d")
    assert rec is not None
    return rec.device


async def test_chunked_reply_after_100_continue(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        body = await read_request(r)
        reply = ipp_reply(body[4:8], state=4)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(reply), 7):
            chunk = reply[i : i + 7]
            w.write(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk))
        w.write(b"0\r\n\r\n")
        await w.drain()

    port = await server(handler)
    dev = await poll_once(tmp_path, f"ipp://127.0.0.1:{port}/ipp/print")
    assert dev.state == DeviceState.PROCESSING


async def test_close_delimited_reply(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        body = await read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/ipp\r\n\r\n" + ipp_reply(body[4:8]))
        await w.drain()

    port = await server(handler)
    assert (await poll_once(tmp_path, f"ipp://127.0.0.1:{port}/")).state == DeviceState.IDLE


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "http-error"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "http-error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n", "too-large"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000, "too-large"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n" + b"x" * 8192,
            "too-large",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "http-error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\x02\x00\x00\x00", "bad-response"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", "http-error"),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", "http-error"),
    ],
)
async def test_bad_replies_make_the_device_unreachable_with_a_reason(
    server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    response: bytes,
    reason: str,
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(response)
        await w.drain()

    port = await server(handler)
    dev = await poll_once(tmp_path, f"ipp://127.0.0.1:{port}/ipp/print", max_response=4096)
    assert dev.state == DeviceState.UNREACHABLE
    assert dev.state_reasons == (reason,)


async def test_wrong_request_id_and_ipp_error_status(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def wrong_id(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        reply = ipp_reply(b"\x00\x00\x99\x99")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))

    async def error_status(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        body = await read_request(r)
        reply = b"\x02\x00\x04\x06" + body[4:8] + b"\x01\x03"
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))

    for handler in (wrong_id, error_status):
        port = await server(handler)
        dev = await poll_once(tmp_path, f"ipp://127.0.0.1:{port}/ipp/print")
        assert dev.state_reasons == ("bad-response",)


async def test_a_slow_drip_is_cut_at_the_timeout(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            w.write(b"\x00")
            await w.drain()
            await asyncio.sleep(0.1)

    port = await server(handler)
    # The drip lasts 10 s; the poll gives up at its 0.5 s timeout (a generous deadline here).
    dev = await asyncio.wait_for(
        poll_once(tmp_path, f"ipp://127.0.0.1:{port}/ipp/print", timeout=0.5), 8.0
    )
    assert dev.state_reasons == ("timeout",)


async def test_escl_status_over_http(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await r.readuntil(b"\r\n\r\n"))
        body = (
            b'<?xml version="1.0"?><scan:ScannerStatus xmlns:scan="http://schemas.hp.com/imaging/'
            b'escl/2011/05/03" xmlns:pwg="http://www.pwg.org/schemas/2010/12/sm">'
            b"<pwg:State>Down</pwg:State></scan:ScannerStatus>"
        )
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    port = await server(handler)
    dev = await poll_once(tmp_path, f"http://127.0.0.1:{port}/eSCL/")
    assert dev.state == DeviceState.STOPPED
    assert seen[0].startswith(b"GET /eSCL/ScannerStatus HTTP/1.1\r\n")
    assert b"Accept-Encoding: identity" in seen[0]


async def test_refused_and_backoff_schedule(tmp_path: Path) -> None:
    svc = await aservice(tmp_path)
    uri = f"ipp://127.0.0.1:{free_port()}/ipp/print"
    svc.upsert_device(Device("d", DeviceKind.PRINTER, "D", uri, source="mdns"), time.time())
    clock = Clock()
    poller = Poller(
        svc,
        PollerConfig(enabled=True, poll_this_host=True, interval=1.0, max_backoff=8.0),
        clock=clock,
        rand=lambda: 0.5,
    )
    await poller.start()
    try:
        for expected in (1.0, 2.0, 4.0, 8.0, 8.0):
            await poller.poll_all()
            assert poller.plan.due["d"] - clock.now == expected
    finally:
        await poller.stop()
    rec = svc.table.get("d")
    assert rec is not None and rec.device.state_reasons == ("connection-refused",)
    assert poller.stats()["poll_errors_total"]["connection-refused"] == 5


def test_first_polls_are_spread_over_one_interval(tmp_path: Path) -> None:
    svc = service(tmp_path)
    for i in range(200):
        uri = f"ipp://127.0.0.1:9/p{i}"
        svc.upsert_device(Device(f"d{i}", DeviceKind.PRINTER, "D", uri, source="mdns"), 0.0)
    svc.upsert_device(
        Device("q", DeviceKind.PRINTER, "Q", "ipp://h/", is_queue=True, source="mdns"), 0.0
    )
    svc.upsert_device(Device("w", DeviceKind.PRINTER, "W", "http://h/", source="mdns"), 0.0)
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, interval=30.0))
    poller.plan.started_at = 99.0  # the poller has just started
    poller.sync_targets(100.0)
    due = sorted(poller.plan.due.values())
    assert len(due) == 200  # the CUPS queue and the non-IPP printer are not polled
    assert due[0] >= 100.0 and due[-1] <= 130.0
    assert due[100] - due[0] > 5 and due[-1] - due[100] > 5


async def test_stopping_wakes_a_poll_blocked_in_its_socket(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    asked, closed = asyncio.Event(), asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        asked.set()
        await r.read()  # never answers; returns when the poller's side goes away
        closed.set()

    port = await server(handler)
    svc = await aservice(tmp_path)
    uri = f"ipp://127.0.0.1:{port}/ipp/print"
    svc.upsert_device(Device("d", DeviceKind.PRINTER, "D", uri, source="mdns"), time.time())
    poller = Poller(svc, PollerConfig(enabled=True, poll_this_host=True, timeout=30.0))
    await poller.start()
    task = asyncio.ensure_future(poller.poll_all())
    await asyncio.wait_for(asked.wait(), 10.0)
    await poller.stop()
    task.cancel()
    # The poll would wait 30 s for its answer; stopping closes its socket long before.
    await asyncio.wait_for(closed.wait(), 10.0)
    await asyncio.gather(task, return_exceptions=True)


async def test_a_failing_device_heard_again_is_asked_at_once_once(tmp_path: Path) -> None:
    svc = await aservice(tmp_path)
    uri = f"ipp://127.0.0.1:{free_port()}/ipp/print"
    svc.upsert_device(Device("d", DeviceKind.PRINTER, "D", uri, source="mdns"), 1000.0)
    clock = Clock()
    poller = Poller(
        svc,
        PollerConfig(enabled=True, poll_this_host=True, interval=30.0, max_backoff=300.0),
        clock=clock,
        rand=lambda: 0.5,
    )
    await poller.start()
    try:
        await poller.poll_all()
        await poller.poll_all()
        now = clock.now
        assert poller.plan.due["d"] - now > 50  # backing off: two failures, 60 s
        poller.heard_again(now)
        assert poller.plan.due["d"] > now + 50  # not heard since: nothing changes
        svc.table.touch("d", 1001.0)  # discovery hears it (an announcement after a reboot)
        poller.heard_again(now)
        assert poller.plan.due["d"] == now
        await poller.poll_all()  # still refused
        svc.table.touch("d", 1002.0)
        clock.now = later = now + 1.0
        poller.heard_again(later)
        assert poller.plan.due["d"] > later + 50  # once per failure streak
    finally:
        await poller.stop()


async def test_after_start_new_devices_are_asked_soon(tmp_path: Path) -> None:
    svc = await aservice(tmp_path)
    clock = Clock()
    poller = Poller(
        svc,
        PollerConfig(enabled=True, poll_this_host=True, interval=30.0),
        clock=clock,
        rand=lambda: 0.99,
    )
    await poller.start()
    try:
        now = clock.now
        svc.upsert_device(
            Device("a", DeviceKind.PRINTER, "A", "ipp://127.0.0.1:9/", source="mdns"), 0.0
        )
        poller.sync_targets(now)
        assert poller.plan.due["a"] > now + 25  # at start: spread over the interval
        poller.plan.started_at = now - 31
        svc.upsert_device(
            Device("b", DeviceKind.PRINTER, "B", "ipp://127.0.0.1:9/", source="mdns"), 0.0
        )
        poller.sync_targets(now)
        assert poller.plan.due["b"] <= now + 2.0
    finally:
        await poller.stop()


def test_daemon_exits_promptly_with_polls_hanging(tmp_path: Path) -> None:
    # A printer that accepts and never answers, polled with a long timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    data = json.loads(DEMO_MAP.read_text())
    data["features"] = [f for f in data["features"] if not f["properties"].get("static")]
    data["features"].append(
        {
            "type": "Feature",
            "properties": {
                "feature_type": "device",
                "static": True,
                "id": "hung",
                "name": "Hung",
                "kind": "printer",
                "uri": f"ipp://127.0.0.1:{port}/ipp/print",
                "site": "hq",
                "building": "north",
                "level": 0,
            },
            "geometry": {"type": "Point", "coordinates": [4.8947504, 52.3702337]},
        }
    )
    site = tmp_path / "site.geojson"
    site.write_text(json.dumps(data))
    cfg = write_config(
        tmp_path,
        sections={
            "poller": {
                "enabled": True,
                "static": True,
                "poll_this_host": True,
                "interval": "0.2s",
                "timeout": "60s",
            }
        },
        maps=[str(site)],
    )
    daemon = DaemonProcess(cfg).wait_ready()
    try:
        conns = []
        deadline = time.monotonic() + 5
        listener.settimeout(5)
        while not conns and time.monotonic() < deadline:
            conns.append(listener.accept()[0])  # the poll is now waiting for a reply
        # SIGTERM to exit within 5 s is a documented guarantee, not a speed figure.
        t0 = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - t0 < 5.0
    finally:
        daemon.kill()
        listener.close()


# ---- where the poller may connect ---------------------------------------------------------


async def test_a_redirect_is_not_followed(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    elsewhere: list[bytes] = []

    async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        elsewhere.append(await r.read(100))

    other = await server(target)

    async def redirect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(
            f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{other}/admin\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        await w.drain()

    port = await server(redirect)
    dev = await poll_once(tmp_path, f"ipp://127.0.0.1:{port}/ipp/print")
    assert dev.state == DeviceState.UNREACHABLE and dev.state_reasons == ("http-error",)
    await asyncio.sleep(0.2)  # a follow-up connection would have landed by now
    assert elsewhere == []


@pytest.mark.parametrize(
    ("uri", "source", "addresses", "why"),
    [
        ("ipp://127.0.0.1:{port}/ipp/print", "mdns", ("127.0.0.1",), "loopback"),
        ("ipp://127.0.0.1:{port}/ipp/print", "static", (), "loopback"),
        ("ipp://localhost:{port}/ipp/print", "static", (), "resolved"),
        ("ipp://localhost:{port}/ipp/print", "mdns", (), "host-name"),
    ],
)
async def test_this_host_is_never_polled_unless_allowed(  # type: ignore[no-untyped-def]
    server, tmp_path: Path, uri: str, source: str, addresses: tuple[str, ...], why: str
) -> None:
    hits: list[int] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hits.append(1)
        body = await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(ipp_reply(body[4:8])))
        w.write(ipp_reply(body[4:8]))
        await w.drain()

    port = await server(handler)
    svc = await aservice(tmp_path)
    dev = Device(
        "d", DeviceKind.PRINTER, "D", uri.format(port=port), source=source, addresses=addresses
    )
    svc.upsert_device(dev, time.time())
    poller = Poller(svc, PollerConfig(enabled=True, static=True, timeout=2.0))
    await poller.start()
    try:
        await poller.poll_all()
    finally:
        await poller.stop()
    assert hits == []
    stats = poller.stats()
    if why == "loopback":
        assert stats["refused_targets"] == {"loopback": 1} and stats["devices_polled"] == 0
    elif why == "resolved":  # a host name is checked where it resolves to, at connect
        assert stats["poll_errors_total"]["refused-address"] == 1
        assert svc.live["d"].reasons == ("refused-address",)
    else:  # a discovered device is polled at an address literal only
        assert stats["devices_polled"] == 0 and stats["polls_total"] == 0
    # The same devices are polled when the operator allows this host.
    allowed = Poller(svc, PollerConfig(enabled=True, static=True, timeout=2.0, poll_this_host=True))
    await allowed.start()
    try:
        await allowed.poll_all()
    finally:
        await allowed.stop()
    assert hits == ([] if why == "host-name" else [1])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/ipp/print\r\nX-Injected: 1",
        "http://127.0.0.1:9/ipp print",
        "http://127.0.0.1:9/ipp/\x00",
    ],
)
def test_a_url_that_would_break_the_request_head_is_never_sent(url: str) -> None:
    # Port 9 is never connected to: the check comes before the connect.
    with pytest.raises(PollFailure) as err:
        exchange("GET", url, None, 4096, time.monotonic() + 2, insecure_tls_context())
    assert err.value.kind == "http-error"
    assert "space or control character" in str(err.value)
