"""Poller bench: a real nearestd polls 500 simulated IPP printers; its CPU per cycle and query latency.

The printers are one simulator process (its CPU is not the daemon's) listening on 500
loopback ports and answering Get-Printer-Attributes with a realistic reply, echoing the
request id; one in ten flips between idle and processing every third poll, so state
changes (and answer-cache invalidations) happen during the cycles as on a real site.
Two daemons run with the 500 printers as static devices; both poll one full cycle, so
they hold the same live state and give the same answers, then one is quiesced. The
bench asks both the same nearest queries in turn over TCP for a fixed window while the
other's cycles run, and reads their CPU time from /proc. The figures: the daemon CPU
time per poll cycle (500 polls) above the quiesced daemon, and the median query latency
while cycles run against quiesced (the goal: within 10%). A control run (neither daemon
polling, another process making the same requests) shows the set-up's own bias.
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
        "poll_this_host = true",
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


def _paired(c_on: Any, c_off: Any, ips: list[str]) -> tuple[dict[str, list[float]], float]:
    """Ask both daemons the same queries in turn for WINDOW_S; return latencies per daemon."""
    rng = random.Random(3)
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
    return lat, time.monotonic() - t0


def _shift(lat: dict[str, list[float]]) -> tuple[float, list[str]]:
    """Return the median shift of "on" over "off" in percent, and the same in five slices."""
    shift = (statistics.median(lat["on"]) / statistics.median(lat["off"]) - 1) * 100
    n = min(len(lat["on"]), len(lat["off"]))
    slices = []
    for i in range(5):
        a, b = i * n // 5, (i + 1) * n // 5
        ratio = statistics.median(lat["on"][a:b]) / statistics.median(lat["off"][a:b])
        slices.append(f"{(ratio - 1) * 100:+.0f}%")
    return shift, slices


BURNER = """
import socket, sys, time
ports = [int(p) for p in sys.argv[1].split(",")]
body = bytes([1, 1, 0, 11, 0, 0, 0, 1, 3])
end = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < end:
    s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]))
    i += 1
    s.sendall(b"POST /ipp/print HTTP/1.1\\r\\nHost: p\\r\\nContent-Length: 9\\r\\n\\r\\n" + body)
    while s.recv(65536):
        pass
    s.close()
    time.sleep(1 / float(sys.argv[3]))
"""


def _control(ports: list[int], base: Path, rate: float) -> float:
    """Both daemons without a poller while another process makes the same requests.

    Started and asked exactly as in the scenarios (the "on" one second), so the shift
    measured here is what the set-up alone gives; return it in percent.
    """
    from nearest_client import Client

    directory = Path(tempfile.mkdtemp(prefix="pollbench-", dir=base))
    site, ips = _site(directory, ports)
    off = {"enabled": False}
    p_a, port_a = _start(directory / "a", site, off)
    p_b, port_b = _start(directory / "b", site, off)
    burner = subprocess.Popen(
        [sys.executable, "-c", BURNER, ",".join(map(str, ports)), str(WINDOW_S + 2), str(rate)]
    )
    try:
        time.sleep(1.0)
        with (
            Client(f"tcp://127.0.0.1:{port_a}", timeout=10) as c_a,
            Client(f"tcp://127.0.0.1:{port_b}", timeout=10) as c_b,
        ):
            lat, _ = _paired(c_b, c_a, ips)
    finally:
        burner.kill()
        _stop(p_a)
        _stop(p_b)
    shift, slices = _shift(lat)
    print(f"### control: neither daemon polls; another process makes the same {rate:g} polls/s")
    print(
        f"median shift between two identical daemons: {shift:+.1f}% "
        f"(slices: {', '.join(slices)}): how far this machine alone moves it"
    )
    return shift


def _scenario(
    interval: float, ports: list[int], base: Path, scheme: str = "ipp", control: float = 0.0
) -> None:
    from nearest_client import Client

    directory = Path(tempfile.mkdtemp(prefix="pollbench-", dir=base))
    site, ips = _site(directory, ports, scheme)
    on = {"enabled": True, "static": True, "interval": f"{interval:g}s", "timeout": "2s", "concurrency": 16}
    # Two daemons, asked the same queries in turn: both see the same machine at the same
    # moments, which on a shared machine matters more than anything the poller does. Both
    # poll a first cycle, so they hold the same live state and send the same answers;
    # then the baseline ("off") is quiesced (interval 1 h) and only "on" keeps cycling.
    p_off, port_off = _start(directory / "off", site, on)
    p_on, port_on = _start(directory / "on", site, on)

    def polls_of(admin: Any) -> int:
        return int(admin.request({"op": "stats"})["stats"]["poller"]["polls_total"])

    try:
        with (
            Client(f"unix://{directory / 'on' / 'admin.sock'}", timeout=10) as admin,
            Client(f"unix://{directory / 'off' / 'admin.sock'}", timeout=10) as admin_off,
            Client(f"tcp://127.0.0.1:{port_off}", timeout=10) as c_off,
            Client(f"tcp://127.0.0.1:{port_on}", timeout=10) as c_on,
        ):
            t0 = time.monotonic()
            while polls_of(admin) < DEVICES or polls_of(admin_off) < DEVICES:
                if time.monotonic() - t0 > interval * 2 + 20:
                    raise RuntimeError("the first poll cycle did not finish")
                time.sleep(0.2)
            first = time.monotonic() - t0
            _config(directory / "off", site, port_off, {**on, "interval": "3600s"})
            admin_off.request({"op": "reload"})
            # Its polls already due still happen, one interval at most; then it is quiet.
            time.sleep(interval * 1.1 + 1.0)
            quiet = polls_of(admin_off)
            polls0 = polls_of(admin)
            cpu0 = {"on": _cpu(p_on.pid), "off": _cpu(p_off.pid)}
            lat, seconds = _paired(c_on, c_off, ips)
            cpu = {"on": _cpu(p_on.pid) - cpu0["on"], "off": _cpu(p_off.pid) - cpu0["off"]}
            final = admin.request({"op": "stats"})["stats"]["poller"]
            polls = final["polls_total"] - polls0
            baseline_polls = polls_of(admin_off) - quiet
    finally:
        _stop(p_on)
        _stop(p_off)
    per_poll = (cpu["on"] - cpu["off"]) / polls if polls else float("nan")
    med = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: sorted(v)[int(len(v) * 0.99)] for k, v in lat.items()}
    # Also in five consecutive slices of the window: the spread is the machine's own drift.
    moved, slices = _shift(lat)
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
        f"{cpu['off']:.2f} s quiesced ({baseline_polls} polls), same queries and answers"
    )
    print(
        f"daemon CPU per poll {per_poll * 1e6:.0f} us; per poll cycle of {DEVICES} printers "
        f"{per_poll * DEVICES * 1e3:.0f} ms"
    )
    verdict = "ok" if moved <= 10 else "OVER"
    print(
        f"query latency ({len(lat['on'])} queries each): median {med['on'] * 1e6:.0f} us with "
        f"cycles running vs {med['off'] * 1e6:.0f} us quiesced ({moved:+.1f}%, goal <= +10%: "
        f"{verdict}); p99 {p99['on'] * 1e6:.0f} us vs {p99['off'] * 1e6:.0f} us"
    )
    print(f"median shift in five slices of the window: {', '.join(slices)}")
    print(f"(the control's shift, which no polling causes, was {control:+.1f}%)")


def _simulator(count: int, certdir: str = "") -> tuple[subprocess.Popen[bytes], list[int]]:
    sim = subprocess.Popen(
        [sys.executable, "-m", "bench.poller", "--simulate", str(count), certdir],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert sim.stdout is not None
    return sim, json.loads(sim.stdout.readline())


def _certificate(directory: Path) -> bool:
    """Make a self-signed RSA-2048 certificate, as printers have; False without openssl."""
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    argv += ["-subj", "/CN=printer", "-keyout", str(directory / "key.pem")]
    argv += ["-out", str(directory / "cert.pem")]
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="pollbench-"))
    sims = []
    try:
        sim, ports = _simulator(DEVICES)
        sims.append(sim)
        control = _control(ports, base, 48.0)
        for interval in (10.0, 2.0):
            _scenario(interval, ports, base, control=control)
        # ipps polls pay a full TLS handshake each.
        if _certificate(base):
            tls_sim, tls_ports = _simulator(DEVICES, str(base))
            sims.append(tls_sim)
            _scenario(10.0, tls_ports, base, "ipps", control=control)
        else:
            print("### ipps: skipped (no openssl to make a certificate)")
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
