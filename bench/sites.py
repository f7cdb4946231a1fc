"""Many sites: 200 simulated sites of 100 devices through a bridged pair of brokers, 3 daemons.

A publisher process per site (bench/site_publisher.py) speaks the inventory protocol on a
"sites" mosquitto, bridged (as docs/sites.md says) to a "hub" mosquitto where three real
daemons federate. Figures, each beside its goal:
- convergence of a change at one site to a daemon (median, max over probes; goal < 2 s);
- steady-state bridge traffic per site with one state change per device per minute
  (goal < 1 kB/s), from the sites broker's own byte counter;
- a daemon's memory with 20,000 foreign devices, and per foreign device;
- a daemon's query latency while 10,000 foreign records arrive at once, beside the same
  daemon's latency just before (median shift goal < 10%).

Usage: python -m bench.sites [--sites N]   (also run by ``make bench``)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mosquitto import Mosquitto  # noqa: E402
from nearest_client import Client  # noqa: E402
from support import DaemonProcess, tcp_url, write_config  # noqa: E402

PREFIX = "nearest/v1"
DEVICES = 100
DAEMONS = 3
PROBES = 20
WINDOW = 20.0


def site_name(k: int) -> str:
    return f"site-{k:03d}"


def site_position(k: int) -> tuple[float, float]:
    return 4.0 + (k % 20) * 0.05, 50.0 + (k // 20) * 0.05


def site_map(n: int) -> dict[str, Any]:
    features = []
    for k in range(n + 1):  # the last one is the probe site
        lon, lat = site_position(k)
        d = 0.001
        ring = [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]
        name = site_name(k) if k < n else "probe"
        features.append(
            {
                "type": "Feature",
                "properties": {
                    "feature_type": "zone",
                    "id": f"{name}-z",
                    "site": name,
                    "building": "main",
                    "level": 0,
                    "name": f"{name}-z",
                    "subnets": [f"10.{k // 250}.{k % 250}.0/24"],
                },
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sys_value(port: int, key: str) -> int:
    out = subprocess.run(
        ["mosquitto_sub", "-p", str(port), "-t", f"$SYS/broker/{key}", "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return int(out or 0)


def mqtt_stats(d: DaemonProcess) -> dict[str, Any]:
    with Client(f"unix://{d.admin}", timeout=10) as c:
        return dict(c.request({"op": "stats"})["stats"]["mqtt"])


def wait(what: str, pred: Any, timeout: float, show: Any = None) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}: {show() if show else ''}")
        time.sleep(0.05)
    return time.monotonic() - t0


def latencies(url: str, ip: str, seconds: float) -> list[float]:
    out = []
    with Client(url, timeout=10) as c:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end and i < 100000:
            t = time.perf_counter()
            c.request({"op": "nearest", "kind": "printer", "k": 3, "client_ip": ip})
            out.append(time.perf_counter() - t)
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=200)
    n = ap.parse_args(argv if argv is not None else []).sites
    tmp = Path(tempfile.mkdtemp(prefix="bench-sites-"))
    hub = Mosquitto(tmp / "hub")
    # A daemon subscribing replays every retained record at once: mosquitto's per-client
    # queue must hold them (docs/sites.md), else it drops QoS 1 messages past its limit.
    unlimited = "max_queued_messages 0"
    hub.conf.write_text(
        hub.conf.read_text().replace("max_queued_messages 10000", unlimited) + "sys_interval 1\n"
    )
    hub.start()
    pub = Mosquitto(tmp / "pub")
    pub.conf.write_text(
        pub.conf.read_text().replace("max_queued_messages 10000", unlimited)
        + "\n".join(
            [
                "sys_interval 1",
                "connection hub",
                f"address 127.0.0.1:{hub.port}",
                "remote_clientid bench-bridge",
                "cleansession false",
                "restart_timeout 1 10",
                "try_private true",
                f"topic devices/# out 1 {PREFIX}/ {PREFIX}/",
                f"topic status/# both 1 {PREFIX}/ {PREFIX}/",
                f"topic alive/# both 0 {PREFIX}/ {PREFIX}/",
                "",
            ]
        )
    )
    pub.start()
    maps = tmp / "sites.geojson"
    maps.write_text(json.dumps(site_map(n)))
    daemons: list[DaemonProcess] = []
    publishers: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(DAEMONS):
            cfg = write_config(
                tmp / f"d{i}",
                sections={
                    "mqtt": {
                        "url": hub.url,
                        "instance": f"bench-daemon-{i}",
                        "federate": True,
                        "max_foreign": 30000,
                        "max_foreign_per_site": 200,
                    },
                    "discovery": {"enabled": False},
                },
                maps=[str(maps)],
                subnets=[],
            )
            daemons.append(DaemonProcess(cfg).wait_ready(60))
        for d in daemons:
            wait("the daemons connected", lambda d=d: mqtt_stats(d)["connected"], 30)
        rss0 = rss_kb(daemons[0].proc.pid)
        t0 = time.monotonic()
        for k in range(n):
            lon, lat = site_position(k)
            argv = [sys.executable, "-m", "bench.site_publisher", "--port", str(pub.port),
                    "--site", site_name(k), "--devices", str(DEVICES),
                    "--lon", str(lon), "--lat", str(lat)]  # fmt: skip
            if k < 10000 // DEVICES:
                argv.append("--burst")
            publishers.append(
                subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            )
        for p in publishers:
            assert p.stdout is not None
            p.stdout.readline()
        total = n * DEVICES
        for d in daemons:
            wait(
                "every foreign device at every daemon",
                lambda d=d: mqtt_stats(d)["federated_devices"] >= total,
                300,
                lambda: [
                    {k: mqtt_stats(x)[k] for k in ("federated_devices", "messages_dropped")}
                    for x in daemons
                ],
            )
        print(f"{n} sites x {DEVICES} devices: at all {DAEMONS} daemons in "
              f"{time.monotonic() - t0:.1f} s from the first publisher's start")  # fmt: skip
        time.sleep(2)
        rss1 = rss_kb(daemons[0].proc.pid)
        per = (rss1 - rss0) * 1024 / total
        print(f"daemon memory: {rss0 / 1024:.0f} MB before, {rss1 / 1024:.0f} MB with "
              f"{total:,} foreign devices: {per:,.0f} bytes per foreign device")  # fmt: skip

        # Steady state: one change per device per minute at every site.
        b0, t_0 = sys_value(pub.port, "bytes/sent"), time.monotonic()
        time.sleep(WINDOW)
        b1, t_1 = sys_value(pub.port, "bytes/sent"), time.monotonic()
        per_site = (b1 - b0) / (t_1 - t_0) / n
        print(f"bridge traffic at steady state: {per_site:,.0f} B/s per site "
              f"({(b1 - b0) / (t_1 - t_0) / 1024:,.1f} kB/s for {n} sites; goal < 1,000 B/s per site)")  # fmt: skip

        # Convergence: a change at the probe site, timed to its arrival at another daemon.
        import paho.mqtt.client as mqtt

        from bench.site_publisher import record

        probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-probe")
        probe.connect("127.0.0.1", pub.port)
        probe.loop_start()
        lon, lat = site_position(n)
        probe.publish(f"{PREFIX}/status/probe", b"online", qos=1, retain=True).wait_for_publish(10)
        times = []
        watcher = daemons[1]

        def probe_state() -> str | None:
            with Client(f"unix://{watcher.admin}", timeout=10) as c:
                inv = c.request({"op": "devices", "site": "probe"})["devices"]
            return str(inv[0]["state"]) if inv else None

        for j in range(PROBES):
            state = "processing" if j % 2 == 0 else "idle"
            t = time.monotonic()
            probe.publish(
                f"{PREFIX}/devices/probe/probe-d000",
                record("probe", 0, lon, lat, state, "Probe"),
                qos=1,
                retain=True,
            )
            wait("the probe's change", lambda s=state: probe_state() == s, 30)
            times.append(time.monotonic() - t)
        probe.loop_stop()
        print(f"convergence of one change, site to a daemon: median {statistics.median(times) * 1000:.0f} ms, "
              f"max {max(times) * 1000:.0f} ms over {PROBES} changes (goal < 2 s)")  # fmt: skip

        # Query latency while 10,000 foreign records arrive at once.
        url = tcp_url(daemons[0].config)
        ip = "10.0.1.5"
        before = latencies(url, ip, 3.0)
        burster = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-burst")
        burster.connect("127.0.0.1", pub.port)
        burster.publish("bench/burst", b"go", qos=1).wait_for_publish(10)
        burster.disconnect()
        during = latencies(url, ip, 3.0)
        m0, m1 = statistics.median(before), statistics.median(during)
        print(f"query latency, median: {m0 * 1e6:.0f} µs before, {m1 * 1e6:.0f} µs while "
              f"{min(n, 10000 // DEVICES) * DEVICES:,} foreign records arrive "
              f"({(m1 / m0 - 1) * 100:+.1f}%; goal < +10%); p99 {statistics.quantiles(before, n=100)[98] * 1e6:.0f} "
              f"-> {statistics.quantiles(during, n=100)[98] * 1e6:.0f} µs")  # fmt: skip
    finally:
        for p in publishers:
            p.terminate()
        for p in publishers:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for d in daemons:
            d.stop()
        pub.close()
        hub.close()
        os.system(f"rm -rf {tmp}")


if __name__ == "__main__":
    main(sys.argv[1:])
