"""Poller bench: a real nearestd polls 500 simulated IPP printers; its CPU per cycle and query latency.

The printers are one simulator process (its CPU is not the daemon's) listening on 500
loopback ports and answering Get-Printer-Attributes with a realistic reply, echoing the
request id; one in ten flips between idle and processing every third poll, so state
changes (and answer-cache invalidations) happen during the cycles as on a real site.
Two daemons run with the 500 printers as static devices, identical but for the poller;
the bench asks both the same nearest queries in turn over TCP for a fixed window while
the poller's cycles run, and reads their CPU time from /proc. The figures: the daemon
CPU time per poll cycle (500 polls) above the poller-less daemon, and the median query
latency with the poller against without (the goal: within 10%).
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
WINDOW_S = 15.0
QUERY_GAP_S = 0.001
# One printer in ten flips between idle and processing every third poll (0 to turn off).
CHURN = os.environ.get("POLLBENCH_CHURN", "1") != "0"


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


async def _simulate(count: int, certdir: str = "") -> None:
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
                busy = CHURN and index % 10 == 0 and (polls[index] // 3) % 2 == 1
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

    tls = None
    if certdir:
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(f"{certdir}/cert.pem", f"{certdir}/key.pem")
    servers = []
    ports = []
    for i in range(count):
        server = await asyncio.start_server(handler(i), "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# ---- the site ---------------------------------------------------------------------------------


def _site(directory: Path, ports: list[int], scheme: str = "ipp") -> tuple[Path, list[str]]:
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
                    "uri": f"{scheme}://127.0.0.1:{port}/ipp/print",
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


def _start(
    directory: Path, site: Path, poller: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], int]:
    directory.mkdir()
    port = _free_port()
    config = _config(directory, site, port, poller)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nearestd.cli", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "nearestd.log", "wb"),  # noqa: SIM115
        env=env,
    )
    deadline = time.monotonic() + 20
    while not (directory / "admin.sock").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError((directory / "nearestd.log").read_text()[-2000:])
        time.sleep(0.05)
    time.sleep(0.3)
    return proc, port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _scenario(interval: float, ports: list[int], base: Path, scheme: str = "ipp") -> None:
    from nearest_client import Client

    directory = Path(tempfile.mkdtemp(prefix="pollbench-", dir=base))
    site, ips = _site(directory, ports, scheme)
    on = {"enabled": True, "interval": f"{interval:g}s", "timeout": "2s", "concurrency": 16}
    # Two daemons, identical but for the poller, asked the same queries in turn: both
    # see the same machine at the same moments, which on a shared machine matters more
    # than anything the poller does.
    p_off, port_off = _start(directory / "off", site, {**on, "enabled": False})
    p_on, port_on = _start(directory / "on", site, on)
    try:
        with (
            Client(f"unix://{directory / 'on' / 'admin.sock'}", timeout=10) as admin,
            Client(f"tcp://127.0.0.1:{port_off}", timeout=10) as c_off,
            Client(f"tcp://127.0.0.1:{port_on}", timeout=10) as c_on,
        ):
            t0 = time.monotonic()
            while admin.request({"op": "stats"})["stats"]["poller"]["polls_total"] < DEVICES:
                if time.monotonic() - t0 > interval * 2 + 20:
                    raise RuntimeError("the first poll cycle did not finish")
                time.sleep(0.2)
            first = time.monotonic() - t0
            rng = random.Random(3)
            polls0 = admin.request({"op": "stats"})["stats"]["poller"]["polls_total"]
            cpu0 = {"on": _cpu(p_on.pid), "off": _cpu(p_off.pid)}
            lat: dict[str, list[float]] = {"on": [], "off": []}
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < WINDOW_S:
                req = {"op": "nearest", "kind": "printer", "k": 3, "client_ip": rng.choice(ips)}
                order = (("on", c_on), ("off", c_off)) if n % 2 else (("off", c_off), ("on", c_on))
                for name, client in order:
                    q0 = time.perf_counter()
                    client.request(req)
                    lat[name].append(time.perf_counter() - q0)
                    time.sleep(QUERY_GAP_S)
                n += 1
            seconds = time.monotonic() - t0
            cpu = {"on": _cpu(p_on.pid) - cpu0["on"], "off": _cpu(p_off.pid) - cpu0["off"]}
            final = admin.request({"op": "stats"})["stats"]["poller"]
            polls = final["polls_total"] - polls0
    finally:
        _stop(p_on)
        _stop(p_off)
    per_poll = (cpu["on"] - cpu["off"]) / polls if polls else float("nan")
    med = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: sorted(v)[int(len(v) * 0.99)] for k, v in lat.items()}
    moved = (med["on"] - med["off"]) / med["off"] * 100
    print(f"### {scheme}, interval {interval:g} s: {DEVICES} printers, concurrency 16, timeout 2 s")
    print(
        f"first cycle complete after {first:.1f} s; states now: {final['devices_by_state']}; "
        f"poll errors: {sum(final['poll_errors_total'].values())}; "
        f"state changes: {final['state_changes_total']}; load average "
        f"{Path('/proc/loadavg').read_text().split()[0]} on {os.cpu_count()} CPUs"
    )
    print(
        f"{seconds:.0f} s window: {polls} polls ({polls / seconds:.0f}/s, "
        f"{polls / DEVICES:.1f} cycles); daemon CPU {cpu['on']:.2f} s with the poller, "
        f"{cpu['off']:.2f} s without, same queries"
    )
    print(
        f"daemon CPU per poll {per_poll * 1e6:.0f} us; per poll cycle of {DEVICES} printers "
        f"{per_poll * DEVICES * 1e3:.0f} ms"
    )
    verdict = "ok" if moved <= 10 else "OVER"
    print(
        f"query latency ({len(lat['on'])} queries each): median {med['on'] * 1e6:.0f} us with "
        f"the poller vs {med['off'] * 1e6:.0f} us without ({moved:+.1f}%, goal <= +10%: "
        f"{verdict}); p99 {p99['on'] * 1e6:.0f} us vs {p99['off'] * 1e6:.0f} us"
    )


def _simulator(count: int, certdir: str = "") -> tuple[subprocess.Popen[bytes], list[int]]:
    sim = subprocess.Popen(
        [sys.executable, "-m", "bench.poller", "--simulate", str(count), certdir],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert sim.stdout is not None
    return sim, json.loads(sim.stdout.readline())


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="pollbench-"))
    # A self-signed RSA-2048 certificate, as printers have: ipps polls pay a full handshake.
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=printer",
            "-keyout",
            str(base / "key.pem"),
            "-out",
            str(base / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    sims = []
    try:
        sim, ports = _simulator(DEVICES)
        sims.append(sim)
        tls_sim, tls_ports = _simulator(DEVICES, str(base))
        sims.append(tls_sim)
        for interval in (10.0, 2.0):
            _scenario(interval, ports, base)
        _scenario(10.0, tls_ports, base, "ipps")
    finally:
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(10)
            except subprocess.TimeoutExpired:
                sim.kill()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--simulate":
        asyncio.run(_simulate(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""))
    else:
        main()
