"""Floods against a live nearestd: junk headers, connection cap, slow drip, rate limits, mDNS.

Each flood runs against a daemon subprocess while a legitimate client in another
process asks ``nearest`` every 5 ms; its p99 is reported per flood. Daemon figures
come from /proc/PID (VmRSS sampled every 10 ms for the peak, open fds) and the admin
``stats`` op (event-loop tasks, connections, security counters).

Budgets (from the issue): junk headers RSS growth <= 16 MB and every connection closed
<= 100 ms after its header; connection cap + 1 refused three times with fds and tasks
back to baseline; 1,000 slow-drip connections closed by the read deadline; one
address rate-limited while another is served; address cycling bounded; 100,000
spoofed mDNS announcements: device table under its cap, <= 500 metric series;
legitimate p99 < 50 ms throughout.

Fair shares (issue 12): the ``devices`` amplification (6 connections x 64 pipelined
``devices`` requests over a 4,000-device inventory, replies unread) keeps RSS growth
<= 32 MB and the legitimate p99 < 100 ms (each page is a pass over the inventory); slot hogging (1,024 connections from one
untrusted address, each pinging every 3 s) leaves another TCP client, a trusted peer and
the Unix socket served with p99 < 50 ms; an MQTT flood (20,000 QoS-0 requests from one
client) keeps RSS growth <= 8 MB and an honest asker's p99 <= 2 s, losing none of its
requests (its request waits behind the flood on the broker's one connection to the daemon,
which paho decodes at some 10,000-20,000 messages a second: the p99 is that backlog).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from nearest_client import Client  # noqa: E402
from nearest_wire import decode_reply, encode_frame  # noqa: E402
from support import DaemonProcess, RssPeak, free_port, rss_of, tcp_url, write_config  # noqa: E402

RESULTS: list[tuple[str, str, str, bool]] = []
PINNED_UUID = "3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11"  # pinned to s1-east (10.20.61.0/24)


def uuid_of(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


JUNK = os.urandom(64 * 1024)


def record(flood: str, figure: str, value: str, ok: bool = True) -> None:
    RESULTS.append((flood, figure, value, ok))
    print(f"  {'ok ' if ok else 'BAD'} {figure}: {value}", flush=True)


# ---- measuring the daemon ------------------------------------------------------------------


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def admin_stats(d: DaemonProcess) -> dict[str, Any]:
    with Client(f"unix://{d.admin}", timeout=10) as c:
        return c.request({"op": "stats"})["stats"]  # type: ignore[no-any-return]


# ---- the legitimate client -------------------------------------------------------------


def _probe(url: str, source: str, stop: Any, out: Any, unix: str) -> None:
    if unix:
        s = socket.socket(socket.AF_UNIX)
        s.connect(unix)
    else:
        host, _, port = url[6:].rpartition(":")
        s = socket.socket()
        s.bind((source, 0))
        s.connect((host, int(port)))
    s.settimeout(10)
    lat: list[float] = []
    errors = 0
    i = 0
    while not stop.is_set():
        i += 1
        t0 = time.perf_counter()
        req: dict[str, Any] = {"v": 1, "id": i, "op": "nearest", "kind": "printer", "k": 3}
        try:
            s.sendall(encode_frame(req))
            head = _recv_exact(s, 4)
            body = _recv_exact(s, struct.unpack(">I", head)[0])
        except (OSError, EOFError):  # refused or closed: counted, and the probe ends
            errors += 1
            break
        lat.append(time.perf_counter() - t0)
        if not decode_reply(body).get("ok"):
            errors += 1
        time.sleep(0.005)
    out.send((lat, errors))


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed by the daemon")
        buf += chunk
    return buf


@contextmanager
def legit_client(
    d: DaemonProcess, source: str = "127.0.0.1", unix: str = ""
) -> Iterator[dict[str, Any]]:
    """Run the legitimate client in its own process; the dict gets p50/p99/max/errors."""
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    recv, send = ctx.Pipe(duplex=False)
    url = "" if unix else tcp_url(d.config)
    proc = ctx.Process(target=_probe, args=(url, source, stop, send, unix))
    proc.start()
    result: dict[str, Any] = {}
    time.sleep(0.2)
    try:
        yield result
    finally:
        stop.set()
        lat, errors = recv.recv() if recv.poll(20) else ([], -1)
        proc.join(10)
        lat.sort()
        if lat:
            result.update(
                n=len(lat),
                p50=lat[len(lat) // 2] * 1000,
                p99=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
                max=lat[-1] * 1000,
                errors=errors,
            )


def report_legit(
    flood: str, r: dict[str, Any], who: str = "legitimate client", budget_ms: float = 50
) -> None:
    ok = bool(r) and r["p99"] < budget_ms and r["errors"] == 0
    text = (
        f"p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, max {r['max']:.1f} ms over {r['n']} "
        f"requests, {r['errors']} errors (budget p99 {budget_ms:.0f} ms)"
        if r
        else "no data"
    )
    record(flood, who, text, ok)


# ---- floods ----------------------------------------------------------------------------


def tcp_addr(d: DaemonProcess) -> tuple[str, int]:
    host, _, port = tcp_url(d.config)[6:].rpartition(":")
    return host, int(port)


async def _junk_one(host: str, port: int, sem: asyncio.Semaphore, out: list[float]) -> None:
    async with sem:
        reader, writer = await asyncio.open_connection(host, port)
        # The header and 64 KiB of junk in one write; the clock starts once it is sent.
        writer.write(b"\xff\xff\xff\xff" + JUNK)
        await writer.drain()
        t0 = time.perf_counter()
        try:
            while await asyncio.wait_for(reader.read(65536), 5):
                pass
        except (ConnectionError, TimeoutError):
            pass
        out.append(time.perf_counter() - t0)
        writer.transport.abort()


def flood_junk_headers(d: DaemonProcess) -> None:
    print("\n### 1,000 connections: a 4 GiB length header, then 64 KiB of junk", flush=True)
    pid = d.proc.pid
    base = rss_of(pid)
    peak = RssPeak(pid)
    peak.start()
    closes: list[float] = []
    host, port = tcp_addr(d)
    with legit_client(d) as legit:

        async def run() -> None:
            sem = asyncio.Semaphore(50)
            await asyncio.gather(*(_junk_one(host, port, sem, closes) for _ in range(1000)))

        t0 = time.monotonic()
        asyncio.run(run())
        wall = time.monotonic() - t0
    top = peak.stop()
    closes.sort()
    record("junk", "connections", f"{len(closes)} in {wall:.1f} s", len(closes) == 1000)
    record(
        "junk",
        "close after header",
        f"max {closes[-1] * 1000:.1f} ms, p99 {closes[int(len(closes) * 0.99)] * 1000:.1f} ms",
        closes[-1] <= 0.100,
    )
    growth = (top - base) / 2**20
    record(
        "junk", "RSS growth (peak)", f"{growth:.1f} MB (base {base / 2**20:.0f} MB)", growth <= 16
    )
    report_legit("junk", legit)


def flood_connection_cap(d: DaemonProcess, cap: int) -> None:
    print(f"\n### connection cap ({cap}) plus one, three times over", flush=True)
    pid = d.proc.pid
    host, port = tcp_addr(d)
    with legit_client(d) as legit:
        time.sleep(0.3)
        st = admin_stats(d)
        base_fds, base_tasks, base_open = (
            fds_of(pid),
            st["connections"]["tasks"],
            st["connections"]["open"],
        )
        for cycle in range(3):
            conns = []
            for _ in range(cap - base_open):
                s = socket.create_connection((host, port), timeout=10)
                conns.append(s)
            for s in conns:
                s.sendall(encode_frame({"v": 1, "id": 1, "op": "ping"}))
            for s in conns:
                assert s.recv(65536), "a connection under the cap was not served"
            extra = socket.create_connection((host, port), timeout=10)
            t0 = time.perf_counter()
            got = b""
            while True:
                chunk = extra.recv(65536)
                if not chunk:
                    break
                got += chunk
            refused_in = time.perf_counter() - t0
            reply = decode_reply(got[4:])
            record(
                "cap",
                f"cycle {cycle + 1}: extra connection",
                f"{reply['error']['code']}, closed in {refused_in * 1000:.1f} ms",
                reply["error"]["code"] == "unavailable" and refused_in < 0.1,
            )
            extra.close()
            for s in conns:
                s.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                st = admin_stats(d)
                if st["connections"]["open"] == base_open and fds_of(pid) <= base_fds:
                    break
                time.sleep(0.05)
            fds, tasks = fds_of(pid), st["connections"]["tasks"]
            record(
                "cap",
                f"cycle {cycle + 1}: back to baseline",
                f"fds {fds} (base {base_fds}), tasks {tasks} (base {base_tasks}), "
                f"open {st['connections']['open']} (base {base_open})",
                # Fewer fds than the baseline is no leak: the baseline may have caught the
                # admin connection that asked for the stats still open.
                fds <= base_fds and tasks == base_tasks and st["connections"]["open"] == base_open,
            )
    report_legit("cap", legit)


def flood_slow_drip(d: DaemonProcess, n: int, deadline_s: float) -> None:
    print(
        f"\n### {n} slow-drip connections (1 byte per second), read deadline {deadline_s} s",
        flush=True,
    )
    host, port = tcp_addr(d)
    with legit_client(d) as legit:
        socks = []
        started = []
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"\x00")
            started.append(time.monotonic())
            s.setblocking(False)
            socks.append(s)
        closed_after: list[float | None] = [None] * n
        last_drip = time.monotonic()
        limit = time.monotonic() + deadline_s + 5
        while time.monotonic() < limit and any(c is None for c in closed_after):
            now = time.monotonic()
            drip = now - last_drip >= 1.0
            if drip:
                last_drip = now
            for i, s in enumerate(socks):
                if closed_after[i] is not None:
                    continue
                try:
                    if s.recv(1) == b"":
                        closed_after[i] = time.monotonic() - started[i]
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed_after[i] = time.monotonic() - started[i]
                    continue
                if drip:
                    try:
                        s.send(b"\x00")
                    except OSError:
                        closed_after[i] = time.monotonic() - started[i]
            time.sleep(0.02)
        for s in socks:
            s.close()
    done = [c for c in closed_after if c is not None]
    worst = max(done) if done else float("inf")
    record(
        "slow-drip",
        "closed by the deadline",
        f"{len(done)}/{n}, the last after {worst:.2f} s (deadline {deadline_s} s + 0.5 s sweep)",
        len(done) == n and worst <= deadline_s + 1.0,
    )
    report_legit("slow-drip", legit)


def flood_rate_limit(d: DaemonProcess) -> None:
    print("\n### rate-limit exhaustion from 127.50.0.1; 127.50.0.2 asks normally", flush=True)
    host, port = tcp_addr(d)
    before = admin_stats(d)["security"]["requests_rate_limited"].get("tcp", 0)
    with legit_client(d, source="127.50.0.2") as legit:
        s = socket.socket()
        s.bind(("127.50.0.1", 0))
        s.connect((host, port))
        batch = b"".join(encode_frame({"v": 1, "id": i, "op": "ping"}) for i in range(1000))
        got = [0]
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                try:
                    data = s.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                got[0] += len(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        sent = 0
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            s.sendall(batch)
            sent += 1000
        time.sleep(0.5)
        stop.set()
        s.close()
    limited = admin_stats(d)["security"]["requests_rate_limited"].get("tcp", 0) - before
    record(
        "rate-limit",
        "greedy address",
        f"{sent} requests in 3 s, {limited} answered rate-limited",
        limited > sent * 0.5,
    )
    report_legit("rate-limit", legit)


def flood_address_cycling(d: DaemonProcess, n: int, cap: int) -> None:
    print(f"\n### address cycling: {n} source addresses, one request each", flush=True)
    pid = d.proc.pid
    host, port = tcp_addr(d)
    base = rss_of(pid)
    frame = encode_frame({"v": 1, "id": 1, "op": "ping"})
    with legit_client(d) as legit:
        t0 = time.monotonic()
        for i in range(n):
            s = socket.socket()
            s.bind((f"127.{61 + i // 65000}.{i // 250 % 250 + 1}.{i % 250 + 1}", 0))
            s.connect((host, port))
            s.sendall(frame)
            s.recv(65536)
            s.close()
        wall = time.monotonic() - t0
    sec = admin_stats(d)["security"]
    growth = (rss_of(pid) - base) / 2**20
    record(
        "cycling",
        "rate limiter",
        f"{sec['rate_limiter_clients']} buckets held (cap {cap}), {sec['rate_limiter_evicted']} "
        f"evicted, {n} addresses in {wall:.1f} s",
        sec["rate_limiter_clients"] <= cap,
    )
    record("cycling", "RSS growth", f"{growth:.1f} MB", growth <= 16)
    report_legit("cycling", legit)


# ---- fair shares: devices amplification, slot hogging, MQTT flood ----------------------


def flood_devices_amplification(n_devices: int = 4000) -> None:
    print(
        f"\n### devices amplification: 6 connections x 64 pipelined `devices` over "
        f"{n_devices:,} devices, replies unread",
        flush=True,
    )
    from bench.gen import generate, write

    tmp = Path(tempfile.mkdtemp(prefix="flood-devices-"))
    world = generate(seed=12, sites=2, buildings=3, devices=n_devices, prefixes=400)
    world.prefixes.append(("127.0.0.0/8", world.zones[0].id))  # the legitimate client's zone
    write(world, tmp / "site", subnets_in_maps=0.0)
    cfg = write_config(
        tmp,
        {"logging": {"level": "warning"}},
        maps=[str(p) for p in world.map_files],
        subnets=[str(p) for p in world.csv_files],
    )
    d = DaemonProcess(cfg).wait_ready(timeout=60)
    try:
        pid = d.proc.pid
        host, port = tcp_addr(d)
        base = rss_of(pid)
        peak = RssPeak(pid)
        peak.start()
        batch = b"".join(encode_frame({"v": 1, "id": i, "op": "devices"}) for i in range(64))
        with legit_client(d) as legit:
            socks = []
            for _ in range(6):
                s = socket.socket()
                s.bind(("127.70.0.1", 0))  # untrusted: rate-limited, counted per source
                s.connect((host, port))
                s.sendall(batch)
                socks.append(s)
            time.sleep(5)  # the replies stay unread meanwhile
            for s in socks:
                s.close()
            time.sleep(0.5)
        top = peak.stop()
    finally:
        d.stop()
    growth = (top - base) / 2**20
    record(
        "devices",
        "RSS growth (peak)",
        f"{growth:.1f} MB (budget 32 MB; base {base / 2**20:.0f} MB)",
        growth <= 32,
    )
    # A page of `devices` is a bisection into the inventory sorted once per table change,
    # and a connection gets pages until its 256 KiB output budget is full: 100 ms.
    report_legit("devices", legit, budget_ms=100)


def flood_slot_hogging(d: DaemonProcess, n: int = 1024) -> None:
    print(
        f"\n### slot hogging: {n} connections from 127.80.0.1 (untrusted), a ping each per 3 s",
        flush=True,
    )
    host, port = tcp_addr(d)
    ping = encode_frame({"v": 1, "id": 1, "op": "ping"})
    hog: list[socket.socket] = []
    unix = str(d.config.parent / "query.sock")
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.80.0.1", 0))
            s.settimeout(10)
            s.connect((host, port))
            hog.append(s)
        live = []
        for s in hog:
            with contextlib.suppress(OSError):
                s.sendall(ping)
        for s in hog:
            try:
                head = s.recv(4)
                body = s.recv(65536) if head else b""
            except OSError:
                continue
            if body and decode_reply(body).get("ok"):
                live.append(s)
        # The others arrive while the hog holds its slots.
        with (
            legit_client(d, source="127.80.0.2") as other,
            legit_client(d, source="127.0.0.1") as trusted,
            legit_client(d, unix=unix) as local,
        ):
            for _ in range(2):
                time.sleep(3)
                for s in live:
                    s.sendall(ping)
                for s in live:
                    s.recv(65536)
    finally:
        for s in hog:
            s.close()
    record(
        "slots",
        "hog connections served",
        f"{len(live)} of {n} (max_connections_per_source 64); the rest told `unavailable`",
        len(live) <= 64,
    )
    report_legit("slots", other, "another TCP client (127.80.0.2)")
    report_legit("slots", trusted, "trusted peer (127.0.0.1)")
    report_legit("slots", local, "Unix socket client")


def _mqtt_flood_run(port: int, prefix: str, n: int) -> tuple[float, list[float], int]:
    """Flood from a child process while an honest asker asks every 50 ms; return its figures."""
    from mqtt_helpers import asker, flood_process

    request = {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "zone": "n0-lobby"}

    async def run() -> tuple[float, list[float], int]:
        latencies: list[float] = []
        lost = 0
        async with asker(port) as honest:
            await honest.ask(f"{prefix}/query", request, timeout=30)  # an established asker
            proc = flood_process(port, f"{prefix}/query", n, request, "flood/replies", False)
            settle: float | None = None
            while settle is None or time.monotonic() < settle:
                if settle is None and proc.poll() is not None:
                    settle = time.monotonic() + 1.0
                t0 = time.monotonic()
                try:
                    await honest.ask(f"{prefix}/query", request, timeout=10)
                except TimeoutError:
                    lost += 1
                else:
                    latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.05)
            return float(proc.communicate(timeout=30)[0]), latencies, lost

    return asyncio.run(run())


def flood_mqtt(n: int = 20_000) -> None:
    print(f"\n### MQTT flood: {n:,} QoS-0 requests from one client; an honest asker", flush=True)
    import shutil

    if shutil.which("mosquitto") is None:
        record("mqtt", "broker", "mosquitto is not installed", False)
        return
    from mosquitto import Mosquitto
    from mqtt_helpers import wait_payload

    tmp = Path(tempfile.mkdtemp(prefix="flood-mqtt-"))
    broker = Mosquitto(tmp / "broker").start()
    prefix, instance = "flood/v1", "bench"
    cfg = write_config(
        tmp / "d",
        {
            "mqtt": {"url": broker.url, "topic_prefix": prefix, "instance": instance},
            "logging": {"level": "warning"},
        },
    )
    d = DaemonProcess(cfg).wait_ready()
    try:
        asyncio.run(wait_payload(broker.port, f"{prefix}/status/{instance}", b"online", 15))
        pid = d.proc.pid
        base = rss_of(pid)
        peak = RssPeak(pid)
        peak.start()
        elapsed, latencies, lost = _mqtt_flood_run(broker.port, prefix, n)
        top = peak.stop()
        st = admin_stats(d)["mqtt"]
    finally:
        d.stop()
        broker.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 99.0
    growth = (top - base) / 2**20
    record("mqtt", "flood", f"{n:,} sent in {elapsed:.1f} s; stats {json.dumps(st)[:300]}")
    record(
        "mqtt",
        "RSS growth (peak)",
        f"{growth:.1f} MB (budget 8 MB; base {base / 2**20:.0f} MB)",
        growth <= 8,
    )
    record(
        "mqtt",
        "honest asker",
        f"p99 {p99 * 1000:.0f} ms (budget 2,000 ms), {len(latencies)} answered, {lost} lost "
        "(budget 0)",
        p99 <= 2.0 and lost == 0 and bool(latencies),
    )


# ---- mDNS ------------------------------------------------------------------------------


def _test_lan(row: str, n_hosts: int, net: int) -> Any:
    """Bring up the test LAN (tests/lan.py), or record why the row cannot run and return None."""
    try:
        from lan import Lan, can_run
    except ImportError as exc:
        record(row, "test LAN", f"not available ({exc})", False)
        return None
    why = can_run()
    if why:
        record(row, "test LAN", f"cannot run: {why}", False)
        return None
    return Lan(n_hosts=n_hosts, net=net).up()


def flood_mdns(n: int, max_devices: int) -> None:
    print(f"\n### {n} spoofed mDNS printer announcements on the test LAN", flush=True)
    lan = _test_lan("mdns", n_hosts=2, net=91)
    if lan is None:
        return
    from zeroconf import DNSAddress, DNSOutgoing, DNSPointer, DNSService, DNSText, const

    tmp = Path(tempfile.mkdtemp(prefix="flood-mdns-"))
    metrics_port = free_port()
    cfg = write_config(
        tmp,
        {
            "daemon": {"listen": [f"unix://{tmp}/query.sock"]},
            "discovery": {
                "enabled": True,
                "interfaces": ["eth0"],
                "max_devices": max_devices,
            },
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        },
    )
    d = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()
    try:
        pid = _daemon_pid(d)
        base = rss_of(pid)
        peak = RssPeak(pid)
        peak.start()
        with legit_client(d, unix=str(tmp / "query.sock")) as legit:
            t0 = time.monotonic()
            with lan.netns(2):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(
                    socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(lan.ip(2))
                )
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
                rng = random.Random(5)
                for i in range(n):
                    name = f"Spoof {i} {rng.getrandbits(32):08x}"
                    inst = f"{name}._ipp._tcp.local."
                    host = f"spoof-{i}.local."
                    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
                    out.add_answer_at_time(
                        DNSPointer(
                            "_ipp._tcp.local.", const._TYPE_PTR, const._CLASS_IN, 4500, inst
                        ),
                        0,
                    )
                    out.add_answer_at_time(
                        DNSService(
                            inst,
                            const._TYPE_SRV,
                            const._CLASS_IN | const._CLASS_UNIQUE,
                            120,
                            0,
                            0,
                            631,
                            host,
                        ),
                        0,
                    )
                    txt = b"".join(
                        bytes([len(x)]) + x
                        for x in (
                            b"txtvers=1",
                            b"rp=ipp/print",
                            f"ty=Spoof {i}".encode(),
                            b"note=Finance",
                            # One in ten claims the demo's pinned UUID from the wrong place.
                            f"UUID={PINNED_UUID if i % 10 == 0 else uuid_of(rng)}".encode(),
                        )
                    )
                    out.add_answer_at_time(
                        DNSText(
                            inst, const._TYPE_TXT, const._CLASS_IN | const._CLASS_UNIQUE, 4500, txt
                        ),
                        0,
                    )
                    addr = socket.inet_aton(f"198.18.{lan.net}.{20 + i % 200}")
                    out.add_answer_at_time(
                        DNSAddress(
                            host, const._TYPE_A, const._CLASS_IN | const._CLASS_UNIQUE, 120, addr
                        ),
                        0,
                    )
                    for packet in out.packets():
                        sock.sendto(packet, ("224.0.0.251", 5353))
                    if i % 2000 == 1999:
                        time.sleep(0.05)  # 100k in about a minute, as the anchors' budget reads
                sock.close()
            wall = time.monotonic() - t0
            time.sleep(3)
        top = peak.stop()
        st = admin_stats(d)
        with (
            lan.netns(1),
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp,
        ):
            text = resp.read().decode()
        series = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
        devices = st["devices"]
        record("mdns", "announcements", f"{n} sent in {wall:.1f} s")
        record(
            "mdns",
            "device table",
            f"{devices} devices (discovery cap {max_devices}; {json.dumps(st.get('discovery', {}))[:200]})",
            devices <= max_devices + 100,
        )
        record("mdns", "metric series", f"{series}", series <= 500)
        sec = st["security"]
        record(
            "mdns",
            "quarantine",
            f"{sec['devices_quarantined']} held, {sec['devices_quarantined_total']} ever "
            "(claims of the pinned UUID from the LAN)",
            1 <= sec["devices_quarantined"] <= 512,
        )
        growth = (top - base) / 2**20
        record("mdns", "RSS growth (peak)", f"{growth:.1f} MB", growth <= 50)
        report_legit("mdns", legit)
    except Exception:
        print(d.logs()[-3000:])
        raise
    finally:
        d.stop()
        lan.down()


def flood_mdns_services(n: int = 20_000, real: int = 12) -> None:
    """One LAN host announces ``n`` printer services; real printers announced after it count.

    Budgets: the flood host gets at most ``[discovery] max_devices_per_source`` devices
    (256), every real printer announced afterwards is discovered within 30 s, the zone's
    nearest three are not taken by flood printers at a cost a trusted device ties, RSS
    growth <= 64 MB, and the legitimate client's p99 < 50 ms throughout.
    """
    print(f"\n### {n} mDNS printer services from one LAN host, then {real} real ones", flush=True)
    lan = _test_lan("mdns-services", n_hosts=3, net=93)
    if lan is None:
        return
    from mdns_raw import RawAnnouncer, announcement

    tmp = Path(tempfile.mkdtemp(prefix="flood-services-"))
    cfg = write_config(
        tmp,
        {
            "daemon": {"listen": [f"unix://{tmp}/query.sock"]},
            "discovery": {"enabled": True, "interfaces": ["eth0"], "expire_after": "10m"},
        },
    )
    d = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()

    def top3() -> list[tuple[str, float, str]]:
        with Client(f"unix://{d.admin}", timeout=10) as c:
            reply = c.request({"op": "nearest", "kind": "printer", "k": 3, "zone": "n1-finance"})
        return [(x["name"], x["distance_m"], x["id"]) for x in reply["devices"]]

    try:
        pid = _daemon_pid(d)
        before = top3()
        base = rss_of(pid)
        peak = RssPeak(pid)
        peak.start()
        with legit_client(d, unix=str(tmp / "query.sock")) as legit:
            with lan.netns(2) as address:
                raw = RawAnnouncer(address)
            t0 = time.monotonic()
            try:
                for i in range(n):
                    raw.send(
                        announcement(
                            [f"Flood {i}".encode()],
                            [address],
                            txt=[b"txtvers=1", b"rp=ipp/print", b"note=Finance"],
                            host=[f"flood-{i}".encode(), b"local"],
                        )
                    )
                    if i % 500 == 499:
                        time.sleep(0.05)
            finally:
                raw.close()
            wall = time.monotonic() - t0
            peer = lan.zeroconf(3)
            t1 = time.monotonic()
            for j in range(real):
                peer.register(
                    f"r{j}",
                    f"Real Printer {j}",
                    type="_ipp._tcp.local.",
                    host=f"real-{j}.local.",
                    port=631,
                    addresses=[lan.ip(3)],
                    txt={"txtvers": "1", "rp": "ipp/print", "note": "Finance"},
                )
            found: set[str] = set()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(found) < real:
                names = set(_all_names(d))
                found = {x for x in names if x.startswith("Real Printer ")}
                time.sleep(0.2)
            seen_in = time.monotonic() - t1
            time.sleep(1)
            peer.close()
        top = peak.stop()
        st = admin_stats(d)
        disc = st.get("discovery", {})
        names = _all_names(d)
        flooded = sum(1 for x in names if x.startswith("Flood "))
        if len(found) < real:
            missing = sorted({f"Real Printer {j}" for j in range(real)} - found)
            print(f"  missing {missing}; discovery said {disc}")
        record("mdns-services", "announcements", f"{n} sent in {wall:.1f} s from {address}")
        record(
            "mdns-services",
            "flood devices kept",
            f"{flooded} (per-source cap 256; refused {disc.get('services_refused', {})})",
            flooded <= 256,
        )
        record(
            "mdns-services",
            "real printers announced afterwards",
            f"{len(found)} of {real} discovered, all within {seen_in:.1f} s",
            len(found) == real,
        )
        after = top3()
        # A flood printer may rank in the top three only where it is strictly cheaper than
        # the trusted device it displaced: never at a tie.
        displaced = [b for b in before if b not in after]
        fair = all(
            not (a[0].startswith("Flood ") and any(b[1] <= a[1] for b in displaced)) for a in after
        )
        record(
            "mdns-services",
            "Finance's nearest three",
            f"before {[(b[0], b[1]) for b in before]}, after {[(a[0], a[1]) for a in after]} "
            "(name, cost m): a flood printer whose note names the zone costs 0, as the "
            "contract's note placement says; it displaces only dearer devices, never a tie",
            fair,
        )
        growth = (top - base) / 2**20
        record("mdns-services", "RSS growth (peak)", f"{growth:.1f} MB", growth <= 64)
        report_legit("mdns-services", legit)
    except Exception:
        print(d.logs()[-3000:])
        raise
    finally:
        d.stop()
        lan.down()


def _all_names(d: DaemonProcess) -> list[str]:
    """Return the names of every device in the inventory, page by page."""
    names: list[str] = []
    cursor = None
    with Client(f"unix://{d.admin}", timeout=10) as c:
        for _ in range(1000):
            req: dict[str, Any] = {"op": "devices"}
            if cursor is not None:
                req["cursor"] = cursor
            reply = c.request(req)
            names += [x["name"] for x in reply["devices"]]
            cursor = reply.get("next_cursor")
            if cursor is None:
                break
    return names


def _daemon_pid(d: DaemonProcess) -> int:
    """Return the nearestd process id (``ip netns exec`` may run it as a child)."""
    pid = d.proc.pid
    for _ in range(3):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm.startswith("python") or comm == "nearestd":
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            break
        pid = int(children[0])
    return pid


# ---- main ------------------------------------------------------------------------------


def main() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    cap = 1100
    rate_clients = 4096
    tmp = Path(tempfile.mkdtemp(prefix="flood-"))
    cfg = write_config(
        tmp,
        {
            "daemon": {
                "max_connections": cap,
                "frame_timeout": "2s",
                "idle_timeout": "30s",
                "rate_clients": rate_clients,
            },
            "logging": {"level": "info"},
        },
    )
    d = DaemonProcess(cfg).wait_ready()
    try:
        flood_junk_headers(d)
        flood_connection_cap(d, cap)
        flood_slow_drip(d, 1000, 2.0)
        flood_rate_limit(d)
        flood_address_cycling(d, 20_000, rate_clients)
        flood_slot_hogging(d)
    finally:
        code = d.stop()
        record("daemon", "exit after the floods", f"status {code}", code == 0)
    flood_mdns(100_000, 2000)
    flood_mdns_services()
    flood_devices_amplification()
    flood_mqtt()
    bad = [r for r in RESULTS if not r[3]]
    print(f"\nfloods: {len(RESULTS) - len(bad)} of {len(RESULTS)} figures within budget")
    for flood, figure, value, _ in bad:
        print(f"  OVER BUDGET {flood}: {figure}: {value}")
    if bad:
        raise RuntimeError(f"{len(bad)} flood figures over budget")


if __name__ == "__main__":
    main()
