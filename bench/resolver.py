"""Resolver benchmark: 100,000 devices and 100,000 prefixes, in-process and over TCP, vs Redis.

Figures (each with its goal and the same run's baseline):
- in-process latency of the exact index (``SpatialIndex.nearest``: it caches no answers;
  it walks the zone's neighbour list, warmed when the map loads; and ``search``, the
  floor search alone that a query falls back to) and of
  ``Service.handle`` (parse, LPM, index, wire view, location log) with every query a
  distinct cache key, so none is an answer-cache hit; the warm (cached) figure apart;
- socket throughput from a separate client process, pipelined (64 in flight), over a
  mix of distinct keys and, apart, over repeated ones; the sequential round trip;
  daemon start-up (spawn until the admin socket answers ping, which includes reading,
  validating and indexing the generated maps); resident memory;
- CPU per query beside the wall-clock figures (process CPU time; the server's from
  /proc, Redis's from INFO, read by the client process around its pipelined phase only),
  which a machine shared with other work disturbs less;
- the baseline: a bare pytricia lookup plus a bare rtree nearest over the same 100,000
  points, and the peer a user might otherwise pick, Redis GEOSEARCH over the same
  devices (at two radii) from the same kind of client process;
- the prototype the issue's goal was set from (``bench.prototype``: LPM + one rtree
  nearest + MessagePack over an asyncio.Protocol, no filters), driven by the same client
  over the same mix: this machine's same-run figure for the issue's 25,000/s;
- the LPM library choice: pytricia vs py-radix on the same 100,000 prefixes.

The world comes from ``bench.gen`` (deterministic) and is written as real GeoJSON and
CSV files in a temporary directory, removed afterwards, as is the Redis key.
"""

from __future__ import annotations

import gc
import ipaddress
import multiprocessing
import multiprocessing.connection
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

from bench import gen, prototype

SEED = 11
PIPELINE_DEPTH = 64
THROUGHPUT_SECONDS = 5.0
WARM_SECONDS = 3.0
SEQUENTIAL_SECONDS = 2.0
LATENCY_QUERIES = 9000
REDIS_URL = ("127.0.0.1", 6379)
# GEOSEARCH needs a radius and sorts every member inside it: a wide one costs Redis
# more, a narrow one may find nothing. Both are measured; the ratio uses the faster.
REDIS_RADII_M = (50, 200)
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


class Timing:
    """Per-call wall times, and the CPU time per call over the whole run (seconds)."""

    def __init__(self, walls: list[float], cpu: float) -> None:
        self.walls = walls
        self.cpu = cpu
        self.median = statistics.median(walls)

    def show(self) -> str:
        """Return the median and p99, and the CPU per call (robust to a busy machine)."""
        return (
            f"median {_us(self.median)}, p99 {_us(_pct(self.walls, 0.99))}; "
            f"CPU {_us(self.cpu)}/call"
        )


def _timed(fn: Callable[[Any], Any], args: Sequence[Any]) -> Timing:
    """Call ``fn`` on each argument; return the per-call wall times and CPU per call."""
    clock = time.perf_counter
    out = []
    c0 = time.process_time()
    for a in args:
        t0 = clock()
        fn(a)
        out.append(clock() - t0)
    return Timing(out, (time.process_time() - c0) / max(len(args), 1))


def _cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time a process has used."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_cpu(r: Any) -> float:
    """Return the CPU time the Redis server has used (INFO cpu)."""
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


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
    port: int,
    requests: list[dict[str, Any]],
    seconds: float,
    depth: int,
    server_pid: int,
    conn: Any,
) -> None:
    """Pipeline ``requests`` (a sliding window of ``depth``), then time sequential ones.

    The server's CPU time (/proc/``server_pid``/stat) is read right before the first send
    and right after the last pipelined reply, so it covers the pipelined phase only.
    """
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
    s0 = _cpu_seconds(server_pid)
    t0 = time.perf_counter()
    c0 = time.process_time()
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
    client_cpu = time.process_time() - c0
    server_cpu = _cpu_seconds(server_pid) - s0
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
    conn.send(
        {
            "done": done,
            "seconds": elapsed,
            "client_cpu": client_cpu,
            "server_cpu": server_cpu,
            "errors": errors,
            "found": found,
            "rtts": rtts,
        }
    )


def _redis_client(
    key: str,
    points: list[tuple[float, float]],
    radius: float,
    seconds: float,
    depth: int,
    conn: Any,
) -> None:
    """GEOSEARCH nearest-1 pipelined in batches of ``depth`` with redis-py, then sequentially.

    Redis's CPU time (INFO cpu) is read right before the first pipeline and right after
    the last one, so it covers the pipelined phase only.
    """
    import redis

    r = redis.Redis(host=REDIS_URL[0], port=REDIS_URL[1])
    n = len(points)
    done = 0
    found = 0
    s0 = _redis_cpu(r)
    t0 = time.perf_counter()
    c0 = time.process_time()
    deadline = t0 + seconds
    while time.perf_counter() < deadline and done < n:
        pipe = r.pipeline(transaction=False)
        batch = points[done : done + depth]
        for lon, lat in batch:
            pipe.geosearch(
                key,
                longitude=lon,
                latitude=lat,
                radius=radius,
                unit="m",
                sort="ASC",
                count=1,
            )
        for res in pipe.execute():
            found += 1 if res else 0
        done += len(batch)
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - c0
    server_cpu = _redis_cpu(r) - s0
    rtts = []
    t_end = time.perf_counter() + SEQUENTIAL_SECONDS
    i = 0
    while time.perf_counter() < t_end and i < 20000:
        lon, lat = points[i % n]
        i += 1
        t1 = time.perf_counter()
        r.geosearch(key, longitude=lon, latitude=lat, radius=radius, unit="m", sort="ASC", count=1)
        rtts.append(time.perf_counter() - t1)
    r.close()
    conn.send(
        {
            "done": done,
            "seconds": elapsed,
            "client_cpu": client_cpu,
            "server_cpu": server_cpu,
            "errors": 0,
            "found": found,
            "rtts": rtts,
        }
    )


def _in_client_process(target: Callable[..., None], *args: Any) -> dict[str, Any]:
    """Run a client function in a fresh (spawned) process and return what it reports."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    child.close()
    try:
        ready = multiprocessing.connection.wait([parent, proc.sentinel], timeout=120)
        if parent not in ready:
            raise RuntimeError(
                "the client process did not report in 120 s"
                if not ready
                else f"the client process exited with status {proc.exitcode}"
            )
        result: dict[str, Any] = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return result


# ---- sections -----------------------------------------------------------------------


def _in_process(
    cfg: Path,
    queries: Queries,
    zone_ids: list[str],
    world: gen.World,
    mix: list[dict[str, Any]],
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
        f"{t1 - t0:.2f} s, Service (device table, index, neighbour lists) {t2 - t1:.2f} s"
    )
    # As the daemon does after loading (app.serve): the world is out of the cyclic
    # collector's reach, so a full collection does not land in the figures.
    gc.freeze()
    peer = Peer("tcp", "127.0.0.1", trusted=True)
    sm = loaded.sitemap
    index = service.table.index
    ranking = service.ranking
    need = Need(color=True)
    rng = random.Random(SEED + 1)
    sample = rng.sample(zone_ids, min(LATENCY_QUERIES, len(zone_ids)))
    reqs: list[dict[str, Any]] = []
    seen: list[str] = []
    for i, zid in enumerate(sample):
        ip, found = queries.ip_in(zid)
        if found in seen:
            continue
        seen.append(found)
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
    cold_t = _timed(lambda z: index.nearest(z, "printer", need, 1, ranking), zones)
    idx_t = _timed(lambda z: index.search(z, "printer", need, 1, ranking), zones)
    index._near.clear()
    t3 = time.perf_counter()
    service.warm()
    notes.append(
        f"neighbour lists: {len(index._near):,} (zone, kind) lists warmed in "
        f"{time.perf_counter() - t3:.2f} s (part of the Service figure above)"
    )
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
    service._cache.clear()
    mix_payloads = [msgpack.packb({**r, "id": i}, use_bin_type=True) for i, r in enumerate(mix)]
    mix_t = _timed(lambda p: encode_frame(handle_payload(p, peer, now)), mix_payloads)

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
    base = lpm_t.median + rt_t.median

    def ratio(t: Timing) -> str:
        return f"{t.median / base:.1f}x the baseline"

    goal = "median < 50 µs: "
    rows.append(
        (
            f"SpatialIndex.nearest, k=1, need color: one query in each of {len(zones)} zones "
            "(the zones' neighbour lists were warmed when the map loaded; no answer is cached)",
            cold_t.show(),
            goal + _verdict(cold_t.median < 50e-6),
            ratio(cold_t),
        )
    )
    rows.append(
        (
            "SpatialIndex.search, same queries: the floor search alone, without neighbour lists "
            "(what a query falls back to when its list cannot prove the answer)",
            idx_t.show(),
            "-",
            ratio(idx_t),
        )
    )
    rows.append(
        (
            "Service.handle: map in, map out (parse, LPM, index, views, location log; "
            "each query a distinct cache key, so uncached)",
            svc_t.show(),
            goal + _verdict(svc_t.median < 50e-6),
            ratio(svc_t),
        )
    )
    rows.append(
        (
            "Service.handle_payload + encode_frame: bytes in, bytes out (uncached)",
            full_t.show(),
            "-",
            ratio(full_t),
        )
    )
    rows.append(
        (
            f"Service.handle_payload + encode_frame over the socket run's first {len(mix):,} "
            "queries (18 need variants, both kinds; uncached): the server's floor",
            mix_t.show(),
            "-",
            ratio(mix_t),
        )
    )
    rows.append(
        (
            "Service.handle, warm (1,000 keys repeated: answer-cache hits)",
            warm_t.show(),
            "-",
            ratio(warm_t),
        )
    )
    rows.append(
        (
            "baseline: bare pytricia lookup + bare rtree nearest k=1 (100k points, no filter)",
            f"{_us(lpm_t.median)} + {_us(rt_t.median)} = {_us(base)}",
            "-",
            "1.0x",
        )
    )
    gc.unfreeze()
    return rows, notes


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


def _wait_warm(admin: Path, timeout: float) -> float:
    """Wait until the daemon has warmed every neighbour list; return how long that took."""
    from nearest_client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Client(f"unix://{admin}", timeout=10) as c:
            warmed = c.request({"op": "stats"})["stats"]["operations"]["lists_warmed_in"]
        if warmed is not None:
            return float(warmed)
        time.sleep(0.2)
    raise RuntimeError("the daemon did not finish warming its neighbour lists")


def _daemon_counts(admin: Path) -> tuple[int, int]:
    """Return (queries answered, location-log entries held) from the daemon's stats."""
    from nearest_client import Client

    with Client(f"unix://{admin}", timeout=10) as c:
        stats = c.request({"op": "stats"})["stats"]
    answered = sum(
        n for key, n in stats["queries"].items() if key.split("/")[1:] == ["nearest", "ok"]
    )
    return answered, int(stats["location_log_entries"])


def _prototype_run(tmp: Path, mix: list[dict[str, Any]]) -> dict[str, Any]:
    """Start ``bench.prototype`` on the world in ``tmp``, drive it like nearestd, stop it."""
    port = _free_port()
    log_path = tmp / "prototype.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.prototype",
                "--port",
                str(port),
                "--world-dir",
                str(tmp),
            ],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while b"ready" not in log_path.read_bytes():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the prototype exited with status {proc.returncode}: "
                        + log_path.read_text(errors="replace")[-500:]
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError("the prototype was not ready within 120 s")
                time.sleep(0.02)
            return _in_client_process(
                _nearestd_client, port, mix, THROUGHPUT_SECONDS, PIPELINE_DEPTH, proc.pid
            )
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _lpm_comparison(
    world: gen.World, rng: random.Random
) -> tuple[list[tuple[str, str, str, str]], str]:
    """Return rows (library, insert time, IPv4 and IPv6 lookup per op) and the verdict."""
    import pytricia

    try:
        import radix
    except ImportError:
        radix = None
    v4 = [(c, z) for c, z in world.prefixes if ":" not in c]
    v6 = [(c, z) for c, z in world.prefixes if ":" in c]
    ips4 = [_random_ip(rng, rng.choice(v4)[0]) for _ in range(50000)]
    ips6 = [_random_ip(rng, rng.choice(v6)[0]) for _ in range(20000)]
    t0 = time.perf_counter()
    t4, t6 = pytricia.PyTricia(32), pytricia.PyTricia(128)
    for c, z in v4:
        t4[c] = z
    for c, z in v6:
        t6[c] = z
    tricia_build = time.perf_counter() - t0
    if radix is None:
        rows = [("pytricia", f"{tricia_build:.2f} s", "-", "-")]
        rows.append(("py-radix", "not installed (pip install -e '.[dev]')", "-", "-"))
        return rows, "py-radix not installed: no comparison"
    t0 = time.perf_counter()
    rt = radix.Radix()
    for c, z in world.prefixes:
        rt.add(c).data["zone"] = z
    radix_build = time.perf_counter() - t0
    for ip in ips4[:2000] + ips6[:2000]:
        tree = t6 if ":" in ip else t4
        assert tree.get(ip) == rt.search_best(ip).data["zone"], ip

    def per_op(fn: Callable[[str], Any], ips: list[str]) -> float:
        t0 = time.perf_counter()
        for ip in ips:
            fn(ip)
        return (time.perf_counter() - t0) / len(ips)

    # Alternate the libraries, five rounds, and take medians: the machine's noise
    # then falls on both alike.
    runs: dict[str, list[float]] = {"t4": [], "t6": [], "r4": [], "r6": []}
    for _ in range(5):
        runs["t4"].append(per_op(t4.get, ips4))
        runs["r4"].append(per_op(rt.search_best, ips4))
        runs["t6"].append(per_op(t6.get, ips6))
        runs["r6"].append(per_op(rt.search_best, ips6))
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [
        (
            f"pytricia {_version('pytricia')} (a tree per address family)",
            f"{tricia_build:.2f} s",
            f"{med['t4'] * 1e6:.2f} µs",
            f"{med['t6'] * 1e6:.2f} µs",
        ),
        (
            f"py-radix {_version('py-radix')} (search_best)",
            f"{radix_build:.2f} s",
            f"{med['r4'] * 1e6:.2f} µs",
            f"{med['r6'] * 1e6:.2f} µs",
        ),
    ]
    faster = med["t4"] < med["r4"] and med["t6"] < med["r6"]
    verdict = (
        f"pytricia kept: {med['r4'] / med['t4']:.1f}x faster on IPv4 and "
        f"{med['r6'] / med['t6']:.1f}x on IPv6 lookups here, {radix_build / tricia_build:.1f}x "
        "faster to fill; both agree on every sampled address"
        if faster
        else "py-radix was not slower on this run: the choice of pytricia should be revisited"
    )
    return rows, verdict


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


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
        + (
            " (a busy machine: wall-clock figures are noisy; CPU per query less so)"
            if load > 0.5
            else ""
        )
    )
    tmp = Path(tempfile.mkdtemp(prefix="nearest-bench-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.perf_counter()
        world = gen.generate(seed=SEED)
        gen.write(world, tmp / "sites")
        prototype.write_world(world, tmp)
        size = sum(p.stat().st_size for p in (*world.map_files, *world.csv_files)) / 2**20
        print(
            f"world: {len(world.zones)} zones, {len(world.prefixes)} prefixes "
            f"({sum(':' in c for c, _ in world.prefixes)} IPv6), {len(world.devices)} devices "
            f"({sum(d.kind == 'printer' for d in world.devices)} printers); "
            f"{len(world.map_files)} GeoJSON files + 1 CSV, {size:.0f} MB; "
            f"generated and written in {time.perf_counter() - t0:.1f} s",
            flush=True,
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
        # The neighbour lists are built in the loop's idle time after start: measure the
        # steady state, and report how long that warming took.
        warmed_in = _wait_warm(tmp / "admin.sock", 120)
        rss_ready, _ = _proc_memory(proc.pid)
        got = _in_client_process(
            _nearestd_client, port, mix, THROUGHPUT_SECONDS, PIPELINE_DEPTH, proc.pid
        )
        qps = got["done"] / got["seconds"]
        if got["errors"]:
            notes.append(f"{got['errors']} error replies in the pipelined run")
        if got["done"] >= len(mix):
            notes.append("the pipelined run used up its distinct keys before the time bound")
        rtt = got["rtts"]
        warm_got = _in_client_process(
            _nearestd_client, port, warm, WARM_SECONDS, PIPELINE_DEPTH, proc.pid
        )
        warm_server_cpu = warm_got["server_cpu"] / max(warm_got["done"], 1)
        warm_qps = warm_got["done"] / warm_got["seconds"]
        rss_after, rss_peak = _proc_memory(proc.pid)
        answered, log_entries = _daemon_counts(tmp / "admin.sock")
        _stop(proc)
        log.close()
        print("daemon measured", flush=True)

        # -- the prototype the goal was set from, same client, same mix ---------
        proto_got: dict[str, Any] | None = None
        proto_qps = 0.0
        try:
            proto_got = _prototype_run(tmp, mix)
            proto_qps = proto_got["done"] / proto_got["seconds"]
            if proto_got["errors"] or proto_got["found"] < proto_got["done"]:
                notes.append(
                    f"prototype: {proto_got['errors']} error replies, a device found for "
                    f"{proto_got['found']:,} of {proto_got['done']:,} queries"
                )
        except Exception as exc:
            notes.append(f"prototype not measured: {type(exc).__name__}: {exc}")
        print("prototype measured", flush=True)

        # -- in process: the index, the service, the baselines ---------------------------
        got_rows, got_notes = _in_process(cfg, queries, zone_ids, world, mix[:20000])
        rows += got_rows
        notes += got_notes
        print("in-process measured", flush=True)

        # -- Redis, the peer a user might otherwise pick ---------------------------------
        rng = random.Random(SEED + 2)
        redis_runs: list[tuple[float, dict[str, Any]]] = []
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
                for radius in REDIS_RADII_M:
                    one = _in_client_process(
                        _redis_client, key, pts, radius, THROUGHPUT_SECONDS, PIPELINE_DEPTH
                    )
                    redis_runs.append((radius, one))
                notes.append(
                    "Redis: GEOSEARCH key FROMLONLAT lon lat BYRADIUS r m ASC COUNT 1 over all "
                    "devices in one key (no kind, floor, building or capability filter), "
                    f"redis-py pipelines of {PIPELINE_DEPTH}; a device found for "
                    + ", ".join(
                        f"{one['found'] / max(one['done'], 1):.0%} of queries at {radius} m"
                        for radius, one in redis_runs
                    )
                )
            finally:
                r.delete(key)
                r.close()
        except Exception as exc:
            notes.append(f"Redis not measured: {type(exc).__name__}: {exc}")
        print("redis measured", flush=True)
        redis_got: dict[str, Any] | None = None
        redis_qps = 0.0
        for _, one in redis_runs:
            if one["done"] / one["seconds"] > redis_qps:
                redis_got, redis_qps = one, one["done"] / one["seconds"]

        against = [
            f"{qps / proto_qps:.2f}x the prototype's {proto_qps:,.0f}/s"
            if proto_qps
            else "prototype not measured",
            f"{qps / redis_qps:.1f}x Redis's faster run ({redis_qps:,.0f}/s); >= 2x: "
            f"{_verdict(qps >= 2 * redis_qps)}"
            if redis_qps
            else "Redis not measured",
        ]
        rows.append(
            (
                f"socket throughput: 1 client process, {PIPELINE_DEPTH} in flight, "
                "each query a distinct key (uncached)",
                f"{qps:,.0f} queries/s ({_cpu_pair(got)})",
                f">= 20,000/s (absolute): {_verdict(qps >= 20000)}",
                "; ".join(against),
            )
        )
        if proto_got is not None:
            rows.append(
                (
                    "prototype (bare LPM + one rtree nearest + MessagePack over "
                    "asyncio.Protocol, no filters/validation/privacy log), same client and "
                    "mix (uncached)",
                    f"{proto_qps:,.0f} queries/s ({_cpu_pair(proto_got)})",
                    "-",
                    "same-run reference for the issue's ~25,000/s",
                )
            )
        rows.append(
            (
                "socket throughput, same client, warm (1,000 keys repeated: cache hits)",
                f"{warm_qps:,.0f} queries/s (server CPU {_us(warm_server_cpu)}/query)",
                f">= 20,000/s: {_verdict(warm_qps >= 20000)}",
                f"{warm_qps / redis_qps:.1f}x Redis" if redis_qps else "-",
            )
        )
        for radius, one in redis_runs:
            rows.append(
                (
                    f"Redis GEOSEARCH nearest 1 within {radius} m, redis-py, pipelines of "
                    f"{PIPELINE_DEPTH}, same kind of client process",
                    f"{one['done'] / one['seconds']:,.0f} queries/s ({_cpu_pair(one)})",
                    "-",
                    "the peer",
                )
            )
        rtt_refs = []
        if redis_got:
            rtt_refs.append(f"Redis: {_lat_only(redis_got['rtts'])}")
        if proto_got is not None:
            rtt_refs.append(f"prototype: {_lat_only(proto_got['rtts'])}")
        rows.append(
            (
                "sequential round trip (one in flight, uncached keys)",
                _lat_only(rtt),
                "-",
                "; ".join(rtt_refs) or "-",
            )
        )
        rows.append(
            (
                "daemon start-up: spawn until the admin socket answers ping",
                f"{startup:.2f} s",
                "-",
                "reads, validates and indexes every map",
            )
        )
        rows.append(
            (
                "neighbour lists warmed after start-up, in 5 ms slices of the loop's idle time",
                f"{warmed_in:.2f} s",
                "-",
                "queries are answered meanwhile (a zone not yet warmed builds its own lists)",
            )
        )
        rows.append(
            (
                f"daemon resident memory (VmRSS): after start-up / after the runs "
                f"({answered:,} queries answered, {log_entries:,} location-log entries held)",
                f"{rss_ready:.0f} MB / {rss_after:.0f} MB (peak {rss_peak:.0f} MB)",
                f"< 300 MB: {_verdict(max(rss_ready, rss_after) < 300)}",
                "-",
            )
        )
        print()
        _print_table(("figure", "measured", "goal", "baseline / ratio"), rows)
        print()
        print("LPM library, chosen by measurement (the same 100,000 prefixes, string keys):")
        lpm_rows, verdict = _lpm_comparison(world, rng)
        _print_table(("library", "insert all", "IPv4 lookup / op", "IPv6 lookup / op"), lpm_rows)
        print(f"{verdict}. py-radix is a dev extra, for this comparison only.")
        notes.append(
            "the prototype (bench/prototype.py) rebuilds the one the issue's goal was set from "
            "(LPM + rtree nearest + MessagePack over an asyncio.Protocol, about 25,000/s on the "
            "issue's machine); run here with the same client process, mix, pipeline depth and "
            "time bound, it is this machine's same-run speed for that figure. The >= 20,000/s "
            "goal is still judged on nearestd's absolute figure, not on the ratio"
        )
        notes.append(
            "server CPU per query of the socket rows covers the pipelined phase only: the client "
            "process reads it right before its first send and right after its last pipelined "
            "reply (/proc/<pid>/stat utime+stime for nearestd and the prototype, "
            f"1/{os.sysconf('SC_CLK_TCK')} s resolution; INFO cpu for Redis)"
        )
        for note in notes:
            print(f"- {note}")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_pair(got: dict[str, Any]) -> str:
    """Return the server and client CPU per query of a pipelined client run."""
    done = max(got["done"], 1)
    return (
        f"server CPU {_us(got['server_cpu'] / done)}/query, "
        f"client CPU {_us(got['client_cpu'] / done)}/query"
    )


def _lat_only(ts: list[float]) -> str:
    return f"median {_us(statistics.median(ts))}, p99 {_us(_pct(ts, 0.99))}"


if __name__ == "__main__":
    main()
