"""Poller bench: a real nearestd polls 500 simulated IPP printers; its CPU per cycle and query latency.

The printers are one simulator process (its CPU is not the daemon's) listening on 500
loopback ports and answering Get-Printer-Attributes with a realistic reply, echoing the
request id; one in ten flips between idle and processing now and then, so state changes
(and answer-cache invalidations) happen during the cycles as they would on a real site.
The daemon runs as a subprocess with the 500 printers as static devices. Phases: poller
on, off (by reload), on again; in each, the bench sends nearest queries one after another
over TCP for a fixed time while reading the daemon's CPU time from /proc. The figures:
CPU time per poll cycle (500 polls) above the poller-off baseline, and the median query
latency with the poller on against off (the goal: within 10%).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = 500
ZONES = 50
WINDOW_S = 8.0
QUERY_GAP_S = 0.001


# ---- the simulated printers ---------------------------------------------------------------


def _attr(tag: int, name: str, value: bytes) -> bytes:
    n = name.encode()
    return struct.pack(">BH", tag, len(n)) + n + struct.pack(">H", len(value)) + value


def _reply(request_id: bytes, index: int, state: int) -> bytes:
    out = bytearray(b"\x02\x00\x00\x00" + request_id + b"\x01")
    out += _attr(0x47, "attributes-charset", b"utf-8")
    out += _attr(0x48, "attributes-natural-language", b"en")
    out += b"\x04"
    out += _attr(0x23, "printer-state", struct.pack(">i", state))
    out += _attr(0x44, "printer-state-reasons", b"none" if state == 3 else b"toner-low-warning")
    out += _attr(0x22, "printer-is-accepting-jobs", b"\x01")
    for i, name in enumerate(("marker-names", "marker-types", "marker-levels")):
        values: list[bytes] = [
            [b"Black", b"Cyan", b"Magenta", b"Yellow"],
            [b"toner"] * 4,
            [struct.pack(">i", (index * 7 + k * 13) % 101) for k in range(4)],
        ][i]
        tag = 0x21 if name == "marker-levels" else (0x42 if name == "marker-names" else 0x44)
        out += _attr(tag, name, values[0])
        for v in values[1:]:
            out += _attr(tag, "", v)
    out += _attr(0x41, "printer-location", f"Room {index}".encode())
    out += _attr(0x12, "printer-geo-location", b"")
    out += _attr(0x45, "printer-uuid", f"urn:uuid:00000000-0000-4000-8000-{index:012d}".encode())
    out += _attr(0x41, "printer-make-and-model", b"Simulated LaserJet 9000")
    out += b"\x03"
    return bytes(out)


async def _simulate(count: int) -> None:
    polls = [0] * count

    def handler(index: int) -> Any:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                polls[index] += 1
                busy = index % 10 == 0 and (polls[index] // 3) % 2 == 1
                resp = _reply(body[4:8], index, 4 if busy else 3)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/ipp\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(resp) + resp
                )
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError, ValueError):
                pass
            finally:
                writer.close()

        return serve

    servers = []
    ports = []
    for i in range(count):
        server = await asyncio.start_server(handler(i), "127.0.0.1", 0)
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# ---- the site ---------------------------------------------------------------------------------


def _site(directory: Path, ports: list[int]) -> tuple[Path, list[str]]:
    d = 0.0001
    features: list[dict[str, Any]] = []
    ips = []
    for z in range(ZONES):
        lon, lat = 4.9 + (z % 10) * d, 52.37 + (z // 10) * d
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]
                    ],
                },
                "properties": {
                    "feature_type": "zone",
                    "id": f"z{z}",
                    "site": "s",
                    "building": "b",
                    "level": z % 2,
                    "name": f"Zone {z}",
                    "subnets": [f"10.1.{z}.0/24"],
                },
            }
        )
        ips.append(f"10.1.{z}.7")
    rng = random.Random(8)
    for i, port in enumerate(ports):
        z = i % ZONES
        lon, lat = 4.9 + (z % 10) * d, 52.37 + (z // 10) * d
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Point",
                    "coordinates": [lon + rng.random() * d, lat + rng.random() * d],
                },
                "properties": {
                    "feature_type": "device",
                    "static": True,
                    "id": f"p{i:03d}",
                    "name": f"Printer {i}",
                    "kind": "printer",
                    "uri": f"ipp://127.0.0.1:{port}/ipp/print",
                    "site": "s",
                    "building": "b",
                    "level": z % 2,
                },
            }
        )
    path = directory / "site.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path, ips


def _config(directory: Path, site: Path, port: int, poller: dict[str, Any]) -> Path:
    lines = [
        "[daemon]",
        f'listen = ["tcp://127.0.0.1:{port}"]',
        f'admin_socket = "{directory / "admin.sock"}"',
        f'state_dir = "{directory / "state"}"',
        "rate = 100000.0",
        "burst = 100000",
        "[site]",
        f'maps = ["{site}"]',
        "[metrics]",
        'listen = ""',
        "[logging]",
        'level = "warning"',
        "[poller]",
        *(f"{k} = {json.dumps(v)}" for k, v in poller.items()),
    ]
    path = directory / "nearestd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the measurement ------------------------------------------------------------------------


def _phase(pid: int, client: Any, admin: Any, ips: list[str]) -> dict[str, float]:
    rng = random.Random(3)
    polls0 = admin.request({"op": "stats"})["stats"]["poller"]["polls_total"]
    cpu0, t0 = _cpu(pid), time.monotonic()
    lat: list[float] = []
    while time.monotonic() - t0 < WINDOW_S:
        req = {"op": "nearest", "kind": "printer", "k": 3, "client_ip": rng.choice(ips)}
        q0 = time.perf_counter()
        client.request(req)
        lat.append(time.perf_counter() - q0)
        time.sleep(QUERY_GAP_S)
    elapsed = time.monotonic() - t0
    cpu = _cpu(pid) - cpu0
    polls = admin.request({"op": "stats"})["stats"]["poller"]["polls_total"] - polls0
    lat.sort()
    return {
        "seconds": elapsed,
        "cpu": cpu,
        "polls": polls,
        "queries": len(lat),
        "median": statistics.median(lat),
        "p99": lat[int(len(lat) * 0.99)],
    }


def _reload(admin: Any, config: Path, site: Path, port: int, poller: dict[str, Any]) -> None:
    _config(config.parent, site, port, poller)
    admin.request({"op": "reload"})


def _scenario(interval: float, ports: list[int], base: Path) -> None:
    from nearest_client import Client

    directory = Path(tempfile.mkdtemp(prefix="pollbench-", dir=base))
    site, ips = _site(directory, ports)
    port = _free_port()
    on = {"enabled": True, "interval": f"{interval:g}s", "timeout": "2s", "concurrency": 16}
    off = {**on, "enabled": False}
    config = _config(directory, site, port, on)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nearestd.cli", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "nearestd.log", "wb"),  # noqa: SIM115
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while not (directory / "admin.sock").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((directory / "nearestd.log").read_text()[-2000:])
            time.sleep(0.05)
        time.sleep(0.3)
        with (
            Client(f"unix://{directory / 'admin.sock'}", timeout=10) as admin,
            Client(f"tcp://127.0.0.1:{port}", timeout=10) as client,
        ):
            t0 = time.monotonic()
            while admin.request({"op": "stats"})["stats"]["poller"]["polls_total"] < DEVICES:
                if time.monotonic() - t0 > interval * 2 + 20:
                    raise RuntimeError("the first poll cycle did not finish")
                time.sleep(0.2)
            first = time.monotonic() - t0
            stats = admin.request({"op": "stats"})["stats"]["poller"]
            phases = []
            for name, poller in (("on", on), ("off", off), ("on", on), ("off", off)):
                _reload(admin, config, site, port, poller)
                time.sleep(0.5)
                phases.append((name, _phase(proc.pid, client, admin, ips)))
            final = admin.request({"op": "stats"})["stats"]["poller"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    ons = [p for n, p in phases if n == "on"]
    offs = [p for n, p in phases if n == "off"]
    on_polls = sum(p["polls"] for p in ons)
    on_cpu_rate = sum(p["cpu"] for p in ons) / sum(p["seconds"] for p in ons)
    off_cpu_rate = sum(p["cpu"] for p in offs) / sum(p["seconds"] for p in offs)
    poll_rate = on_polls / sum(p["seconds"] for p in ons)
    per_poll = (on_cpu_rate - off_cpu_rate) / poll_rate if poll_rate else float("nan")
    med_on = statistics.median([p["median"] for p in ons])
    med_off = statistics.median([p["median"] for p in offs])
    moved = (med_on - med_off) / med_off * 100
    print(f"### interval {interval:g} s: {DEVICES} printers, concurrency 16, timeout 2 s")
    print(
        f"first cycle complete after {first:.1f} s; states: {stats['devices_by_state']}; "
        f"errors: {sum(final['poll_errors_total'].values())}; "
        f"state changes: {final['state_changes_total']}"
    )
    print(
        f"{'phase':<6} {'s':>5} {'polls':>6} {'daemon cpu':>10} {'queries':>8} {'median':>9} {'p99':>9}"
    )
    for name, p in phases:
        print(
            f"{name:<6} {p['seconds']:5.1f} {p['polls']:6.0f} {p['cpu']:9.2f}s {p['queries']:8d} "
            f"{p['median'] * 1e6:7.0f}us {p['p99'] * 1e6:7.0f}us"
        )
    print(
        f"poll rate {poll_rate:.0f}/s; daemon CPU per poll {per_poll * 1e6:.0f} us; "
        f"per cycle of {DEVICES} polls {per_poll * DEVICES * 1e3:.0f} ms "
        f"(CPU {on_cpu_rate * 100:.1f}% on vs {off_cpu_rate * 100:.1f}% off, same query load)"
    )
    verdict = "ok" if moved <= 10 else "OVER"
    print(
        f"query latency median: {med_on * 1e6:.0f} us poller on vs {med_off * 1e6:.0f} us off: "
        f"{moved:+.1f}% (goal <= +10%: {verdict})"
    )


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="pollbench-"))
    sim = subprocess.Popen(
        [sys.executable, "-m", "bench.poller", "--simulate", str(DEVICES)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert sim.stdout is not None
        ports = json.loads(sim.stdout.readline())
        for interval in (10.0, 2.0):
            _scenario(interval, ports, base)
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--simulate":
        asyncio.run(_simulate(int(sys.argv[2])))
    else:
        main()
