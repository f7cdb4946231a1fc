"""MQTT benchmark: the daemon's request/response through one mosquitto on loopback, vs a bare echo.

Figures (each beside the same run's baseline):
- sequential round trip (median, p99) and pipelined throughput with 64 requests in
  flight, for nearestd answering ``nearest`` over MQTT 5 (JSON, Response Topic and
  Correlation Data), and for a bare aiomqtt echo responder (the same library idiom:
  ``async for message`` then ``await publish``) through the same broker, and the ratio
  (goal: at least 0.8 of the echo's throughput);
- 100 cycles of kill -9 / restart of the broker: the time from the broker accepting
  connections again to the daemon's retained ``online`` (goal: at most 2 s each), and
  the answers lost among queries sent after ``online`` (goal: none).

Usage: python -m bench.mqtt [--cycles N]   (also run by ``make bench``)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
sys.path.insert(0, str(ROOT / "tests"))

SEQUENTIAL = 600
PIPELINED = 3000
DEPTH = 64
ROUNDS = 5
CYCLES = 100
QUERIES_PER_CYCLE = 10
ZONES = [
    "n0-lobby", "n0-mailroom", "n1-east", "n1-hr", "n2-west", "n2-it",
    "s0-entrance", "s0-print-shop", "s1-lab", "s1-studio",
]  # fmt: skip


# ---- the baseline: a bare aiomqtt echo responder ----------------------------------------
async def echo_responder(port: int, topic: str) -> None:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY
    ) as client:
        await client.subscribe(topic, qos=1)
        print("ready", flush=True)
        async for m in client.messages:
            props = Properties(PacketTypes.PUBLISH)
            rt = getattr(m.properties, "ResponseTopic", None)
            if rt is None:
                continue
            cd = getattr(m.properties, "CorrelationData", None)
            if cd is not None:
                props.CorrelationData = cd
            props.ContentType = "application/json"
            await client.publish(rt, m.payload, qos=min(m.qos, 1), properties=props)


# ---- the requester -----------------------------------------------------------------------
def _request(i: int) -> bytes:
    zone = ZONES[i % len(ZONES)]
    return json.dumps({"v": 1, "id": i, "op": "nearest", "kind": "printer", "zone": zone}).encode()


async def measure(port: int, topic: str, n: int, depth: int) -> tuple[float, list[float], int]:
    """Send n requests with ``depth`` in flight; return (per second, latencies, answered)."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from mqtt_helpers import NODELAY

    reply_topic = f"bench-replies/{uuid.uuid4().hex}"
    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY
    ) as client:
        await client.subscribe(reply_topic, qos=1)
        sent: dict[bytes, float] = {}
        lat: list[float] = []
        window = asyncio.Semaphore(depth)
        done = asyncio.Event()

        async def read() -> None:
            async for m in client.messages:
                t0 = sent.pop(getattr(m.properties, "CorrelationData", b""), None)
                if t0 is None:
                    continue
                lat.append(time.perf_counter() - t0)
                window.release()
                if len(lat) == n:
                    done.set()

        reader = asyncio.create_task(read())
        payloads = [_request(i) for i in range(n)]
        start = time.perf_counter()
        try:
            for i in range(n):
                await window.acquire()
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = reply_topic
                key = i.to_bytes(4, "big")
                props.CorrelationData = key
                sent[key] = time.perf_counter()
                await client.publish(topic, payloads[i], qos=0, properties=props)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 10)
        finally:
            elapsed = time.perf_counter() - start
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
    return len(lat) / elapsed, lat, len(lat)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def throughput_section(port: int, prefix: str) -> None:
    echo_topic = f"{prefix}/echo"
    echo = subprocess.Popen(
        [sys.executable, "-m", "bench.mqtt", "--echo", str(port), echo_topic],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
    )
    assert echo.stdout is not None
    try:
        echo.stdout.readline()
        targets = {"nearestd": f"{prefix}/query", "echo": echo_topic}
        seq: dict[str, list[float]] = {k: [] for k in targets}
        tput: dict[str, list[float]] = {k: [] for k in targets}
        answered: dict[str, tuple[int, int]] = {k: (0, 0) for k in targets}
        # Warm up both, then alternate rounds so that machine noise hits both alike.
        for topic in targets.values():
            await measure(port, topic, 200, DEPTH)
        for _ in range(ROUNDS):
            for name, topic in targets.items():
                _, lat, got1 = await measure(port, topic, SEQUENTIAL, 1)
                rate, _, got2 = await measure(port, topic, PIPELINED, DEPTH)
                seq[name] += lat
                tput[name].append(rate)
                a, b = answered[name]
                answered[name] = (a + got1 + got2, b + SEQUENTIAL + PIPELINED)
        print(f"requests: JSON nearest over MQTT 5 (Response Topic + Correlation Data), QoS 0, "
              f"{ROUNDS} alternating rounds of {SEQUENTIAL} sequential + {PIPELINED} pipelined")  # fmt: skip
        print(f"{'responder':<10} {'seq median':>11} {'seq p99':>10} {'seq /s':>8} "
              f"{'pipelined /s (64 in flight)':>28} {'answered':>10}")  # fmt: skip
        for name in targets:
            med = statistics.median(seq[name])
            p99 = _pct(seq[name], 0.99)
            a, b = answered[name]
            print(f"{name:<10} {_ms(med):>11} {_ms(p99):>10} {1 / med:>8.0f} "
                  f"{statistics.median(tput[name]):>28.0f} {f'{a}/{b}':>10}")  # fmt: skip
        # Rounds alternate, so the ratio within a round shares that moment's machine noise.
        ratio = statistics.median(
            a / b for a, b in zip(tput["nearestd"], tput["echo"], strict=True)
        )
        seq_ratio = statistics.median(seq["echo"]) / statistics.median(seq["nearestd"])
        print(f"ratio nearestd/echo: pipelined throughput {ratio:.2f} (median of per-round ratios; goal >= 0.80), "
              f"sequential rate {seq_ratio:.2f}; per-round pipelined: "
              f"nearestd {[round(x) for x in tput['nearestd']]}, echo {[round(x) for x in tput['echo']]}")  # fmt: skip
    finally:
        echo.kill()
        echo.wait()


async def restart_section(broker: Any, prefix: str, instance: str, cycles: int) -> None:
    from mqtt_helpers import asker, wait_payload

    status = f"{prefix}/status/{instance}"
    await wait_payload(broker.port, status, b"online", 15)
    times: list[float] = []
    lost = 0
    sent = 0
    failures = 0
    t_start = time.monotonic()
    for cycle in range(cycles):
        broker.kill()
        broker.start()  # returns when the broker accepts connections
        t0 = time.monotonic()
        try:
            await wait_payload(broker.port, status, b"online", 15)
        except TimeoutError:
            failures += 1
            continue
        times.append(time.monotonic() - t0)
        async with asker(broker.port) as a:
            for i in range(QUERIES_PER_CYCLE):
                sent += 1
                req = {"v": 1, "id": cycle * 100 + i, "op": "nearest", "kind": "printer",
                       "zone": ZONES[i % len(ZONES)]}  # fmt: skip
                try:
                    r = await a.ask(f"{prefix}/query", req, timeout=5)
                    if not r.get("ok") or r.get("id") != req["id"]:
                        lost += 1
                except TimeoutError:
                    lost += 1
    print(f"broker kill -9/restart cycles: {cycles} in {time.monotonic() - t_start:.0f} s; "
          f"reconnect failures {failures}")  # fmt: skip
    if times:
        print(f"time from broker up to daemon 'online': median {_ms(statistics.median(times))}, "
              f"p99 {_ms(_pct(times, 0.99))}, max {_ms(max(times))} (goal: max <= 2000 ms)")  # fmt: skip
    print(f"answers lost after reconnecting: {lost} of {sent} (goal: 0)")


async def run(cycles: int) -> None:
    from mosquitto import Mosquitto
    from nearest_client import Client
    from support import DaemonProcess, write_config

    work = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker = Mosquitto(work / "broker").start()
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        work / "d",
        {
            "mqtt": {"url": broker.url, "topic_prefix": prefix, "instance": "bench"},
            "logging": {"level": "warning"},
            "privacy": {"retention": "1m"},
        },
    )
    daemon = DaemonProcess(cfg).wait_ready()
    try:
        from mqtt_helpers import wait_payload

        await wait_payload(broker.port, f"{prefix}/status/bench", b"online", 15)
        await throughput_section(broker.port, prefix)
        print()
        await restart_section(broker, prefix, "bench", cycles)
        with Client(f"unix://{daemon.admin}") as c:
            st = c.request({"op": "stats"})["stats"]["mqtt"]
        print(f"daemon's own counters: reconnects {st['reconnects']} (expected {cycles}), "
              f"received {st['received']}, replied {st['replied']}, malformed {st['malformed']}")  # fmt: skip
    finally:
        daemon.stop()
        broker.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--echo"]:
        asyncio.run(echo_responder(int(args[1]), args[2]))
        return
    # A timeout's SIGTERM must still stop the daemon and the broker (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cycles = CYCLES
    if "--cycles" in args:
        cycles = int(args[args.index("--cycles") + 1])
    asyncio.run(run(cycles))


if __name__ == "__main__":
    main()
