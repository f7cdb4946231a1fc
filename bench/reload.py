"""Reload under load: how long queries wait while the bench's 100,000-device map reloads.

The daemon serves the resolver bench's world (40 sites, 100,000 devices, 100,000
prefixes). A client in its own process asks ``nearest`` over TCP every 2 ms, one at a
time, and notes each round trip; first with nothing else going on (the baseline), then
while the admin socket asks for reloads of the same files, back to back. Each reload
reads, validates and builds the new table and neighbour lists in a worker thread; only
the swap runs on the event loop. The figure that matters is the largest round trip
during the reloads (goal: under 50 ms), beside the same client's largest without them.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from bench import gen
from bench.resolver import SEED, _free_port, _stop, _wait_ready, _write_config

PACE_SECONDS = 0.002
BASELINE_SECONDS = 8.0
RELOADS = 3
GOAL_MS = 50.0
MAX_QUERIES = 200_000


def _client(port: int, zones: list[str], stop: Any, conn: Any) -> None:
    """Ask ``nearest`` every PACE_SECONDS until ``stop`` is set; report (sent at, round trip)."""
    rng = random.Random(SEED)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    unpack = msgpack.unpackb
    samples: list[tuple[float, float]] = []
    errors = 0
    buf = bytearray()
    next_at = time.perf_counter()
    conn.send("running")
    while not stop.is_set() and len(samples) < MAX_QUERIES:
        zone = rng.choice(zones)
        kind = "printer" if rng.random() < 0.8 else "scanner"
        body = msgpack.packb(
            {"v": 1, "id": len(samples) + 1, "op": "nearest", "kind": kind, "k": 3, "zone": zone},
            use_bin_type=True,
        )
        t1 = time.perf_counter()
        sock.sendall(len(body).to_bytes(4, "big") + body)
        buf.clear()
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise RuntimeError("nearestd closed the connection")
            buf += chunk
        t2 = time.perf_counter()
        if unpack(buf[4:]).get("ok") is not True:
            errors += 1
        samples.append((t1, t2 - t1))
        next_at = max(next_at + PACE_SECONDS, t2)
        time.sleep(max(0.0, next_at - time.perf_counter()))
    sock.close()
    conn.send({"samples": samples, "errors": errors})


def _run_client(port: int, zones: list[str], during: Any) -> tuple[dict[str, Any], Any]:
    """Run the client in a fresh process while ``during()`` runs; return its report."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    proc = ctx.Process(target=_client, args=(port, zones, stop, child))
    proc.start()
    child.close()
    try:
        if not parent.poll(60) or parent.recv() != "running":
            raise RuntimeError("the client process did not start")
        outcome = during()
        stop.set()
        ready = multiprocessing.connection.wait([parent, proc.sentinel], timeout=60)
        if parent not in ready:
            raise RuntimeError(f"the client process exited with status {proc.exitcode}")
        report: dict[str, Any] = parent.recv()
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return report, outcome


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _row(label: str, rtts: list[float], errors: int) -> list[str]:
    ms = [r * 1000 for r in rtts]
    return [
        label,
        f"{len(ms):,}",
        f"{_pct(ms, 0.5):.2f}",
        f"{_pct(ms, 0.99):.2f}",
        f"{max(ms, default=float('nan')):.1f}",
        str(errors),
    ]


def _reload(admin: Path) -> float:
    from nearest_client import Client

    t0 = time.perf_counter()
    with Client(f"unix://{admin}", timeout=300) as c:
        reply = c.request({"op": "reload"})
    if reply.get("reloaded") is not True:
        raise RuntimeError(f"reload refused: {reply}")
    return time.perf_counter() - t0


def main() -> None:
    """Run the reload-under-load bench and print its table."""
    load = os.getloadavg()[0]
    print(
        f"load average before: {load:.2f} on {os.cpu_count()} cores"
        + (" (a busy machine: round trips are noisy)" if load > 0.5 else "")
    )
    tmp = Path(tempfile.mkdtemp(prefix="nearest-bench-reload-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        world = gen.generate(seed=SEED)
        gen.write(world, tmp / "sites")
        port = _free_port()
        cfg = _write_config(tmp, world, port)
        # Static devices name hosts under example.net: nothing here may poll them.
        cfg.write_text(cfg.read_text() + "\n[poller]\nenabled = false\n")
        print(
            f"world: {len(world.zones)} zones, {len(world.prefixes)} prefixes, "
            f"{len(world.devices)} devices",
            flush=True,
        )
        log = open(tmp / "nearestd.log", "wb")  # noqa: SIM115
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "nearestd.cli", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        admin = tmp / "admin.sock"
        _wait_ready(proc, admin, 600)
        print(f"daemon ready in {time.perf_counter() - t0:.1f} s", flush=True)
        # The daemon writes its compiled map (state_dir/sitemap.cache) once serving: not
        # part of either figure, so both start after it.
        cache = tmp / "state" / "sitemap.cache"
        deadline = time.monotonic() + 300
        while not cache.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)
        zones = [z.id for z in world.zones]

        base, _ = _run_client(port, zones, lambda: time.sleep(BASELINE_SECONDS))

        def reloads() -> list[tuple[float, float, float]]:
            spans = []
            time.sleep(0.5)
            for _ in range(RELOADS):
                started = time.perf_counter()
                took = _reload(admin)
                spans.append((started, started + took, took))
                time.sleep(0.5)
            return spans

        during, spans = _run_client(port, zones, reloads)
        inside = [
            rtt
            for sent, rtt in during["samples"]
            if any(a <= sent <= b or a <= sent + rtt <= b for a, b, _ in spans)
        ]
        headers = ["client asking every 2 ms", "queries", "p50 ms", "p99 ms", "max ms", "errors"]
        rows = [
            _row("without reload (baseline)", [r for _, r in base["samples"]], base["errors"]),
            _row(f"during {RELOADS} reloads of the same map", inside, during["errors"]),
        ]
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        for r in [headers, ["-" * w for w in widths], *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        took = [t for _, _, t in spans]
        worst = max(inside, default=0.0) * 1000
        print(
            f"reload (read and validate the files, build table and neighbour lists, swap, free the old): "
            f"{min(took):.1f}-{max(took):.1f} s each, answered by the admin op"
        )
        verdict = "met" if worst <= GOAL_MS else "NOT met"
        print(f"goal: no query delayed more than {GOAL_MS:.0f} ms during a reload: {verdict}")
        proc.send_signal(signal.SIGTERM)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
