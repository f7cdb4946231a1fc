"""Resolver benchmark: 100,000 devices and 100,000 prefixes, in-process and over TCP, vs Redis.

Figures (each with its goal and the same run's baseline):
- in-process latency of the exact index (``SpatialIndex.nearest``: no cache) and of
  ``Service.handle`` (parse, LPM, index, wire view, location log) with every query a
  distinct cache key, so neither is a cache hit; the warm (cached) figure separately;
- socket throughput from a separate client process, pipelined, and the sequential
  round trip; daemon start-up (subprocess until the admin socket answers ping, which
  includes reading, validating and indexing the generated maps); resident memory;
- the baseline: a bare pytricia lookup plus a bare rtree nearest over the same 100,000
  points, and the peer a user might otherwise pick, Redis GEOSEARCH over the same
  devices from the same kind of client process;
- the LPM library choice: pytricia vs py-radix on the same 100,000 prefixes.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack

from bench import gen

SEED = 11
PIPELINE_DEPTH = 64
THROUGHPUT_SECONDS = 5.0
WARM_SECONDS = 3.0
SEQUENTIAL_SECONDS = 2.0
LATENCY_QUERIES = 9000
REDIS_URL = ("127.0.0.1", 6379)
REDIS_RADIUS_M = 200
# Need variants for the socket mix: k=1 with a capability filter, varied so that every
# query of a run is a distinct (zone, kind, need) key and the daemon's answer cache
# never hits.
PRINTER_NEEDS: list[dict[str, Any]] = [
    {"color": True},
    {"duplex": True},
    {"color": True, "duplex": True},
    {"paper": "A3"},
    {"color": True, "paper": "A4"},
    {"secure": True},
    {"duplex": True, "secure": True},
    {"color": True, "duplex": True, "paper": "A4"},
    {"paper": "A4"},
    {"duplex": True, "paper": "A3"},
    {"color": True, "secure": True},
    {"duplex": True, "paper": "A4"},
]
SCANNER_NEEDS: list[dict[str, Any]] = [
    {"adf": True},
    {"color": True},
    {"adf": True, "color": True},
    {"secure": True},
    {"adf": True, "secure": True},
    {"paper": "A4"},
]


# ---- helpers ------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def _timed(fn: Callable[[Any], Any], args: Sequence[Any]) -> list[float]:
    """Call ``fn`` on each argument; return the per-call wall times in seconds."""
    clock = time.perf_counter
    out = []
    for a in args:
        t0 = clock()
        fn(a)
        out.append(clock() - t0)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_memory(pid: int) -> tuple[float, float]:
    """Return (VmRSS, VmHWM) of a process in MB."""
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def _write_config(directory: Path, world: gen.World, port: int) -> Path:
    maps = ", ".join(f'"{p}"' for p in world.map_files)
    subnets = ", ".join(f'"{p}"' for p in world.csv_files)
    text = f"""
[daemon]
listen = ["tcp://127.0.0.1:{port}"]
admin_socket = "{directory}/admin.sock"
state_dir = "{directory}/state"
trusted_peers = ["127.0.0.1/32", "::1/128"]

[discovery]
enabled = false

[site]
maps = [{maps}]
subnets = [{subnets}]

[metrics]
listen = ""

[logging]
level = "warning"
"""
    path = directory / "nearestd.toml"
    path.write_text(text)
    return path


def _random_ip(rng: random.Random, cidr: str) -> str:
    net = ipaddress.ip_network(cidr)
    return str(net.network_address + rng.randrange(net.num_addresses))


class Queries:
    """Client addresses per zone, drawn from the zone's own prefixes."""

    def __init__(self, world: gen.World, lookup: Callable[[str], str | None]) -> None:
        self.rng = random.Random(SEED)
        self.by_zone: dict[str, list[str]] = {}
        for cidr, zid in world.prefixes:
            self.by_zone.setdefault(zid, []).append(cidr)
        self.lookup = lookup

    def ip_in(self, zone_id: str) -> tuple[str, str]:
        """Return a random client IP of one of the zone's prefixes and the zone LPM gives it."""
        ip = _random_ip(self.rng, self.rng.choice(self.by_zone[zone_id]))
        found = self.lookup(ip)
        assert found is not None, ip
        return ip, found

    def distinct(self, zones: Sequence[str], count: int) -> list[dict[str, Any]]:
        """Return ``nearest`` requests that are each a distinct (zone, kind, need) key."""
        keys = [
            (z, kind, i)
            for z in zones
            for kind, needs in (("printer", PRINTER_NEEDS), ("scanner", SCANNER_NEEDS))
            for i in range(len(needs))
        ]
        self.rng.shuffle(keys)
        out = []
        seen: set[tuple[str, str, int]] = set()
        for zone, kind, i in keys:
            ip, found = self.ip_in(zone)
            key = (found, kind, i)
            if key in seen:  # a nested prefix put this IP in another zone
                continue
            seen.add(key)
            need = (PRINTER_NEEDS if kind == "printer" else SCANNER_NEEDS)[i]
            out.append(
                {"v": 1, "op": "nearest", "kind": kind, "k": 1, "need": need, "client_ip": ip}
            )
            if len(out) >= count:
                break
        return out


# ---- the client processes -----------------------------------------------------------


def _nearestd_client(
    port: int, requests: list[dict[str, Any]], seconds: float, depth: int, conn: Any
) -> None:
    """Pipeline ``requests`` (a sliding window of ``depth``), then time sequential ones."""
    frames = []
    for i, req in enumerate(requests):
        body = msgpack.packb({**req, "id": i + 1}, use_bin_type=True)
        frames.append(len(body).to_bytes(4, "big") + body)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    unpack = msgpack.unpackb
    n = len(frames)
    errors = 0
    found = 0
    buf = bytearray()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    sent = min(depth, n)
    sock.sendall(b"".join(frames[:sent]))
    done = 0
    while done < sent:
        chunk = sock.recv(1 << 18)
        if not chunk:
            raise RuntimeError("nearestd closed the connection")
        buf += chunk
        pos = 0
        got = 0
        end = len(buf)
        while end - pos >= 4:
            size = int.from_bytes(buf[pos : pos + 4], "big")
            if end - pos - 4 < size:
                break
            reply = unpack(buf[pos + 4 : pos + 4 + size])
            if reply.get("ok") is not True:
                errors += 1
            elif reply["devices"]:
                found += 1
            pos += 4 + size
            got += 1
        if pos:
            del buf[:pos]
        done += got
        if got and sent < n and time.perf_counter() < deadline:
            more = min(got, n - sent)
            sock.sendall(b"".join(frames[sent : sent + more]))
            sent += more
    elapsed = time.perf_counter() - t0
    rtts = []
    t_end = time.perf_counter() + SEQUENTIAL_SECONDS
    i = 0
    while time.perf_counter() < t_end and i < 20000:
        frame = frames[i % n]
        i += 1
        t1 = time.perf_counter()
        sock.sendall(frame)
        buf.clear()
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            buf += sock.recv(1 << 16)
        rtts.append(time.perf_counter() - t1)
    sock.close()
    conn.send({"done": done, "seconds": elapsed, "errors": errors, "found": found, "rtts": rtts})


def _redis_client(
    key: str, points: list[tuple[float, float]], seconds: float, depth: int, conn: Any
) -> None:
    """GEOSEARCH nearest-1 pipelined in batches of ``depth`` with redis-py, then sequentially."""
    import redis

    r = redis.Redis(host=REDIS_URL[0], port=REDIS_URL[1])
    n = len(points)
    done = 0
    found = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline and done < n:
        pipe = r.pipeline(transaction=False)
        batch = points[done : done + depth]
        for lon, lat in batch:
            pipe.geosearch(
                key,
                longitude=lon,
                latitude=lat,
                radius=REDIS_RADIUS_M,
                unit="m",
                sort="ASC",
                count=1,
            )
        for res in pipe.execute():
            found += 1 if res else 0
        done += len(batch)
    elapsed = time.perf_counter() - t0
    rtts = []
    t_end = time.perf_counter() + SEQUENTIAL_SECONDS
    i = 0
    while time.perf_counter() < t_end and i < 20000:
        lon, lat = points[i % n]
        i += 1
        t1 = time.perf_counter()
        r.geosearch(
            key, longitude=lon, latitude=lat, radius=REDIS_RADIUS_M, unit="m", sort="ASC", count=1
        )
        rtts.append(time.perf_counter() - t1)
    r.close()
    conn.send({"done": done, "seconds": elapsed, "errors": 0, "found": found, "rtts": rtts})


def _in_client_process(target: Callable[..., None], *args: Any) -> dict[str, Any]:
    """Run a client function in a fresh (spawned) process and return what it reports."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    child.close()
    try:
        if not parent.poll(120):
            raise RuntimeError("the client process did not report in 120 s")
        result: dict[str, Any] = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return result


# ---- sections -----------------------------------------------------------------------


def _in_process(
    cfg: Path, world: gen.World, queries: Queries, zone_ids: list[str]
) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Measure the index, the service and the bare baselines on the same map, in process."""
    from nearest_wire import Need, encode_frame
    from nearestd.loader import load_world
    from nearestd.service import Peer, Service

    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    loaded = load_world(cfg)
    t1 = time.perf_counter()
    service = Service(loaded.config, loaded.sitemap, time.time(), lambda: os.urandom(32))
    t2 = time.perf_counter()
    notes.append(
        f"in-process start-up split: load_world (read, parse, validate maps) "
        f"{t1 - t0:.2f} s, Service (device table, rtree bulk load) {t2 - t1:.2f} s"
    )
    peer = Peer("tcp", "127.0.0.1", trusted=True)
    sm = loaded.sitemap
    index = service.table.index
    ranking = service.ranking
    need = Need(color=True)
    rng = random.Random(SEED + 1)
    sample = rng.sample(zone_ids, min(LATENCY_QUERIES, len(zone_ids)))
    reqs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, zid in enumerate(sample):
        ip, found = queries.ip_in(zid)
        if found in seen:
            continue
        seen.add(found)
        reqs.append(
            {
                "v": 1,
                "id": i,
                "op": "nearest",
                "kind": "printer",
                "k": 1,
                "need": {"color": True},
                "client_ip": ip,
            }
        )
    zones = [sm.zones[z] for z in seen]
    idx_t = _timed(lambda z: index.nearest(z, "printer", need, 1, ranking), zones)
    now = time.time()
    handle = service.handle
    svc_t = _timed(lambda r: handle(r, peer, now), reqs)
    service._cache.clear()  # the next pass must not hit the first pass's answers
    payloads = [msgpack.packb(r, use_bin_type=True) for r in reqs]
    handle_payload = service.handle_payload
    full_t = _timed(lambda p: encode_frame(handle_payload(p, peer, now)), payloads)
    hot = reqs[:1000]
    for r in hot:
        handle(r, peer, now)
    warm_t = _timed(lambda r: handle(r, peer, now), hot * 5)

    import pytricia
    from rtree import index as rtree_index

    v4tree = pytricia.PyTricia(32)
    for cidr, zid in world.prefixes:
        if ":" not in cidr:
            v4tree[cidr] = zid
    v4ips = [r["client_ip"] for r in reqs if ":" not in r["client_ip"]]
    lpm_t = _timed(v4tree.get, v4ips)
    points = [(p.lon, p.lat) for _, p in sm.static_devices]
    tree = rtree_index.Index(
        ((i, (x, y, x, y), None) for i, (x, y) in enumerate(points)), interleaved=True
    )
    centres = [z.representative_lonlat for z in zones]
    rt_t = _timed(lambda c: list(tree.nearest((c[0], c[1], c[0], c[1]), 1)), centres)
    base = statistics.median(lpm_t) + statistics.median(rt_t)

    def ratio(ts: list[float]) -> str:
        return f"{statistics.median(ts) / base:.1f}x the baseline"

    rows.append(
        (
            f"SpatialIndex.nearest, k=1, need color (no cache; {len(zones)} zones)",
            _lat(idx_t),
            f"median < 50 µs: {_verdict(statistics.median(idx_t) < 50e-6)}",
            ratio(idx_t),
        )
    )
    rows.append(
        (
            "Service.handle, decoded map in/out (every query a distinct key: uncached)",
            _lat(svc_t),
            f"median < 50 µs: {_verdict(statistics.median(svc_t) < 50e-6)}",
            ratio(svc_t),
        )
    )
    rows.append(
        (
            "handle_payload + encode_frame, bytes in/out (uncached)",
            _lat(full_t),
            "-",
            ratio(full_t),
        )
    )
    rows.append(("Service.handle, warm (answer-cache hits)", _lat(warm_t), "-", ratio(warm_t)))
    rows.append(
        (
            "baseline: bare pytricia lookup + bare rtree nearest (100k points)",
            f"{_us(statistics.median(lpm_t))} + {_us(statistics.median(rt_t))} = {_us(base)}",
            "-",
            "1.0x",
        )
    )
    return rows, notes


def _lat(ts: list[float]) -> str:
    return f"median {_us(statistics.median(ts))}, p99 {_us(_pct(ts, 0.99))}"


def _wait_ready(proc: subprocess.Popen[bytes], admin: Path, timeout: float) -> None:
    from nearest_client import Client, ClientError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nearestd exited with status {proc.returncode}")
        if admin.exists():
            try:
                with Client(f"unix://{admin}", timeout=2) as c:
                    c.request({"op": "ping"})
                    return
            except ClientError:
                pass
        time.sleep(0.01)
    raise RuntimeError(f"nearestd did not answer ping within {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _lpm_comparison(world: gen.World, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """Return rows: library, insert time, IPv4 and IPv6 lookup per op (string keys)."""
    import pytricia

    try:
        import radix
    except ImportError:
        radix = None
    v4 = [(c, z) for c, z in world.prefixes if ":" not in c]
    v6 = [(c, z) for c, z in world.prefixes if ":" in c]
    ips4 = [_random_ip(rng, rng.choice(v4)[0]) for _ in range(50000)]
    ips6 = [_random_ip(rng, rng.choice(v6)[0]) for _ in range(20000)]

    def per_op(fn: Callable[[str], Any], ips: list[str]) -> float:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for ip in ips:
                fn(ip)
            runs.append((time.perf_counter() - t0) / len(ips))
        return statistics.median(runs)

    rows = []
    t0 = time.perf_counter()
    t4, t6 = pytricia.PyTricia(32), pytricia.PyTricia(128)
    for c, z in v4:
        t4[c] = z
    for c, z in v6:
        t6[c] = z
    build = time.perf_counter() - t0
    rows.append(
        (
            "pytricia 1.3 (one tree per family)",
            f"{build:.2f} s",
            _us(per_op(t4.get, ips4)),
            _us(per_op(t6.get, ips6)),
        )
    )
    if radix is None:
        rows.append(("py-radix", "not installed (pip install -e '.[dev]')", "-", "-"))
        return rows
    t0 = time.perf_counter()
    rt = radix.Radix()
    for c, z in world.prefixes:
        rt.add(c).data["zone"] = z
    build = time.perf_counter() - t0
    rows.append(
        (
            "py-radix 1.1 (search_best)",
            f"{build:.2f} s",
            _us(per_op(rt.search_best, ips4)),
            _us(per_op(rt.search_best, ips6)),
        )
    )
    return rows


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    """Run the resolver benchmark and print its table."""
    from nearestd.core.sitemap import PrefixTable

    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    load = os.getloadavg()[0]
    print(
        f"load average before: {load:.2f} on {os.cpu_count()} cores"
        + (" (busy machine: figures are noisy)" if load > 0.5 else "")
    )
    tmp = Path(tempfile.mkdtemp(prefix="nearest-bench-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.perf_counter()
        world = gen.generate(seed=SEED)
        gen.write(world, tmp / "sites")
        size = sum(p.stat().st_size for p in (*world.map_files, *world.csv_files)) / 2**20
        print(
            f"world: {len(world.zones)} zones, {len(world.prefixes)} prefixes "
            f"({sum(':' in c for c, _ in world.prefixes)} IPv6), {len(world.devices)} devices "
            f"({sum(d.kind == 'printer' for d in world.devices)} printers); "
            f"{len(world.map_files)} GeoJSON files + 1 CSV, {size:.0f} MB; "
            f"generated and written in {time.perf_counter() - t0:.1f} s"
        )
        table = PrefixTable()
        for cidr, zid in world.prefixes:
            table.add(ipaddress.ip_network(cidr), zid)
        queries = Queries(world, table.lookup)
        zone_ids = [z.id for z in world.zones]
        mix = queries.distinct(zone_ids, 200_000)
        warm = [dict(q) for q in mix[:1000]] * 200

        # -- daemon: start-up, memory, throughput, round trip ----------------------------
        port = _free_port()
        cfg = _write_config(tmp, world, port)
        log = open(tmp / "nearestd.log", "wb")  # noqa: SIM115
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "nearestd.cli", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_ready(proc, tmp / "admin.sock", 120)
        startup = time.perf_counter() - t0
        rss_ready, _ = _proc_memory(proc.pid)
        got = _in_client_process(_nearestd_client, port, mix, THROUGHPUT_SECONDS, PIPELINE_DEPTH)
        qps = got["done"] / got["seconds"]
        if got["errors"]:
            notes.append(f"{got['errors']} error replies in the pipelined run")
        if got["done"] >= len(mix):
            notes.append("the pipelined run used up its distinct keys before the time bound")
        rtt = got["rtts"]
        warm_got = _in_client_process(_nearestd_client, port, warm, WARM_SECONDS, PIPELINE_DEPTH)
        warm_qps = warm_got["done"] / warm_got["seconds"]
        rss_after, rss_peak = _proc_memory(proc.pid)
        _stop(proc)
        log.close()

        # -- in process: the index, the service, the baselines ---------------------------
        got_rows, got_notes = _in_process(cfg, world, queries, zone_ids)
        rows += got_rows
        notes += got_notes
        rng = random.Random(SEED + 2)

        # -- Redis, the peer a user might otherwise pick ---------------------------------
        redis_qps: float | None = None
        redis_rtt: list[float] = []
        try:
            import redis

            r = redis.Redis(host=REDIS_URL[0], port=REDIS_URL[1], socket_timeout=10)
            key = f"nearest-bench:{os.getpid()}:geo"
            try:
                pipe = r.pipeline(transaction=False)
                for i in range(0, len(world.devices), 5000):
                    flat: list[Any] = []
                    for d in world.devices[i : i + 5000]:
                        flat += [d.lon, d.lat, d.id]
                    pipe.geoadd(key, flat)
                pipe.execute()
                pts = [world.zones[rng.randrange(len(world.zones))].inside for _ in range(200_000)]
                rgot = _in_client_process(
                    _redis_client, key, pts, THROUGHPUT_SECONDS, PIPELINE_DEPTH
                )
                redis_qps = rgot["done"] / rgot["seconds"]
                redis_rtt = rgot["rtts"]
                notes.append(
                    f"Redis GEOSEARCH FROMLONLAT BYRADIUS {REDIS_RADIUS_M} m ASC COUNT 1 over all "
                    f"devices (no kind, floor or capability filter), redis-py pipelines of "
                    f"{PIPELINE_DEPTH}; {rgot['found'] / max(rgot['done'], 1):.0%} found one"
                )
            finally:
                r.delete(key)
                r.close()
        except Exception as exc:
            notes.append(f"Redis not measured: {type(exc).__name__}: {exc}")

        rows.append(
            (
                f"socket throughput, 1 client process, {PIPELINE_DEPTH} in flight, uncached mix",
                f"{qps:,.0f} queries/s",
                f">= 20,000/s: {_verdict(qps >= 20000)}",
                (
                    f"{qps / redis_qps:.1f}x Redis ({redis_qps:,.0f}/s); >= 2x: "
                    f"{_verdict(qps >= 2 * redis_qps)}"
                    if redis_qps
                    else "Redis not measured"
                ),
            )
        )
        rows.append(
            (
                "socket throughput, same, warm (1,000 keys repeated: cache hits)",
                f"{warm_qps:,.0f} queries/s",
                "-",
                f"{warm_qps / redis_qps:.1f}x Redis" if redis_qps else "-",
            )
        )
        rows.append(
            (
                "sequential round trip (one in flight)",
                _lat(rtt),
                "-",
                f"Redis: {_lat(redis_rtt)}" if redis_rtt else "-",
            )
        )
        rows.append(
            (
                "daemon start-up: spawn until the admin socket answers ping",
                f"{startup:.2f} s",
                "-",
                "includes reading and validating every map",
            )
        )
        rows.append(
            (
                "daemon resident memory (VmRSS) after start-up / after the runs",
                f"{rss_ready:.0f} MB / {rss_after:.0f} MB (peak {rss_peak:.0f} MB)",
                f"< 300 MB: {_verdict(rss_after < 300)}",
                "-",
            )
        )
        print()
        _print_table(("figure", "measured", "goal", "baseline / ratio"), rows)
        print()
        print("LPM library, chosen by measurement (same 100,000 prefixes, string keys):")
        _print_table(
            ("library", "insert all", "IPv4 lookup / op", "IPv6 lookup / op"),
            _lpm_comparison(world, rng),
        )
        for note in notes:
            print(f"- {note}")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
