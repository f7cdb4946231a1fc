"""No full client IP in any output: random canary addresses, proven processed, then a scan.

Hundreds of random 127.a.b.c addresses really connect over loopback (Linux routes all
of 127/8 to lo); IPv6 canaries (random ULAs) come through a trusted peer's
``client_ip``. Each canary has a zone of its own (its /32 or /128) holding one static
printer, and the test first proves every canary was processed: it was placed in its
own zone and answered with that zone's printer. Then every output is scanned for
every canary in every encoding (dotted, zero-padded, compressed/exploded/upper-case,
IPv4-mapped, hex, both byte orders as integers, packed bytes, base64, reverse DNS,
and unkeyed MD5/SHA-1/SHA-256/BLAKE2 of the text and the bytes): the daemon's log
at debug level (stdout and stderr), every file under ``state_dir``, ``/metrics``,
and every MQTT topic when the MQTT adapter exists.

Negative controls run the same scenario against deliberately leaking builds
(tests/leaky/sitecustomize.py) and require the scan to fail; a leak through the
logger's message is the exception that proves the scrubbing backstop.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import ipaddress
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nearest_client import Client
from nearest_wire import decode_reply, encode_frame
from nearestd import mapcache
from nearestd.loader import _cache_key, load_world
from support import DaemonProcess, free_port, skip_or_fail, tcp_url, write_config

LEAKY = Path(__file__).parent / "leaky"
CTL = (sys.executable, "-m", "nearestd.ctl", "--socket")
DEG = 0.0001  # about 7 m of longitude, 11 m of latitude here


@dataclass
class Canary:
    """One client address with the zone and printer that prove it was processed."""

    ip: str
    zone: str
    printer: str

    @property
    def addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.ip)


def make_canaries(rng: random.Random, n4: int, n6: int) -> list[Canary]:
    seen: set[str] = set()
    out: list[Canary] = []
    while len(out) < n4:
        # Not 127.0.x.x (the trusted local peer lives there); no .0 or .255 hosts.
        ip = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        if ip not in seen:
            seen.add(ip)
            out.append(Canary(ip, f"cz{len(out)}", f"cp{len(out)}"))
    while len(out) < n4 + n6:
        ip = str(ipaddress.IPv6Address((0xFD << 120) | rng.getrandbits(120)))
        if ip not in seen:
            seen.add(ip)
            out.append(Canary(ip, f"cz{len(out)}", f"cp{len(out)}"))
    return out


def site_map(canaries: list[Canary]) -> dict[str, Any]:
    feats: list[dict[str, Any]] = []
    cols = 25
    for i, c in enumerate(canaries):
        lon = 4.0 + (i % cols) * 1.5 * DEG
        lat = 52.0 + (i // cols) * 1.5 * DEG
        ring = [[lon, lat], [lon + DEG, lat], [lon + DEG, lat + DEG], [lon, lat + DEG], [lon, lat]]
        bits = 32 if c.addr.version == 4 else 128
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "feature_type": "zone",
                    "id": c.zone,
                    "site": "canary",
                    "building": "b",
                    "level": 0,
                    "name": f"Canary {i}",
                    "subnets": [f"{c.ip}/{bits}"],
                },
            }
        )
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [lon + DEG / 2, lat + DEG / 2]},
                "properties": {
                    "feature_type": "device",
                    "static": True,
                    "id": c.printer,
                    "name": f"Canary printer {i}",
                    "kind": "printer",
                    "uri": f"ipp://printer-{i}.example:631/ipp/print",
                    "site": "canary",
                    "building": "b",
                    "level": 0,
                },
            }
        )
    return {"type": "FeatureCollection", "features": feats}


# ---- encodings -------------------------------------------------------------------------


def encodings(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[list[str], list[bytes]]:
    """Return (text needles, byte needles) that would reveal the address."""
    packed = addr.packed
    texts: list[str] = [str(addr)]
    if addr.version == 4:
        octets = str(addr).split(".")
        texts += [
            ".".join(f"{int(o):03d}" for o in octets),
            f"::ffff:{addr}",
            ".".join(reversed(octets)) + ".in-addr.arpa",
            packed.hex(),
            str(int.from_bytes(packed, "big")),
            str(int.from_bytes(packed, "little")),
        ]
    else:
        texts += [addr.exploded, str(addr).upper(), addr.reverse_pointer, packed.hex()]
        texts += [str(int.from_bytes(packed, "big"))]
    texts += [
        base64.b64encode(packed).decode(),
        base64.b64encode(str(addr).encode()).decode(),
    ]
    raw: list[bytes] = [packed]
    for source in (str(addr).encode(), packed):
        for name in ("md5", "sha1", "sha256", "blake2b", "blake2s"):
            digest = hashlib.new(name, source).digest()
            texts.append(digest.hex())
            raw.append(digest)
    return texts, raw


@dataclass
class Finding:
    sink: str
    canary: str
    encoding: str


@dataclass
class Scanner:
    canaries: list[Canary]
    _needles: list[tuple[str, str, str, bytes | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for c in self.canaries:
            texts, raws = encodings(c.addr)
            for t in texts:
                self._needles.append((c.ip, t, t.lower(), None))
            for r in raws:
                self._needles.append((c.ip, r.hex(), "", r))

    def scan(self, sink: str, data: bytes) -> list[Finding]:
        lower = data.decode("utf-8", "replace").lower()
        found = []
        for ip, label, needle, raw in self._needles:
            if raw is not None:
                if raw in data:
                    found.append(Finding(sink, ip, label))
            elif needle in lower:
                # A fast substring test first; numbers and hex only count as whole tokens.
                pat = rf"(?<![0-9a-z]){re.escape(needle)}(?![0-9a-z])"
                if re.search(pat, lower):
                    found.append(Finding(sink, ip, label))
        return found


# ---- sinks -----------------------------------------------------------------------------


Sink = Callable[[], dict[str, bytes]]


def file_sink(root: Path, name: str) -> Sink:
    def read() -> dict[str, bytes]:
        out = {}
        if root.exists():
            for p in sorted(root.rglob("*")):
                # The compiled site map is the operator's map (whose zones here are the
                # canaries' /32s), not client data: run_scenario proves it holds only that.
                if p.is_file() and p.name != mapcache.FILE_NAME:
                    out[f"{name}:{p.relative_to(root)}"] = p.read_bytes()
        return out

    return read


def metrics_sink(url: str) -> Sink:
    def read() -> dict[str, bytes]:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return {"metrics": resp.read()}

    return read


@contextmanager
def mqtt_capture(port: int) -> Iterator[Callable[[], dict[str, bytes]]]:
    """Subscribe to every topic of the broker; yield a reader of what was published."""
    import paho.mqtt.client as paho

    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="canary-scan")

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with lock:
            got.append((msg.topic, bytes(msg.payload)))

    def on_connect(c: Any, *_: Any) -> None:
        c.subscribe("#", qos=1)

    client.on_message = on_message
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()

    def read() -> dict[str, bytes]:
        with lock:
            items = list(got)
        # What the daemon publishes: not the askers' own queries, and not the replies to
        # the asker (which may say where the asker is); everything else is scanned.
        kept = [
            t.encode() + b"\n" + p
            for t, p in items
            if not t.startswith("canary-reply/") and not t.endswith("/query")
        ]
        return {"mqtt: every topic": b"\n".join(kept)} if kept else {}

    try:
        yield read
    finally:
        client.loop_stop()
        client.disconnect()


def mqtt_available() -> bool:
    return importlib.util.find_spec("nearestd.adapters.mqtt") is not None


# ---- the scenario ----------------------------------------------------------------------


def read_frame(s: socket.socket) -> dict[str, Any]:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        assert chunk, "connection closed"
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk, "connection closed"
        body += chunk
    return decode_reply(body)


def drive(d: DaemonProcess, canaries: list[Canary]) -> None:
    """Make every canary ask, through every path, and prove each was processed."""
    host, _, port = tcp_url(d.config)[6:].rpartition(":")
    trusted = socket.create_connection((host, int(port)), timeout=10)
    for i, c in enumerate(canaries):
        nearest = {"v": 1, "id": i, "op": "nearest", "kind": "printer"}
        if c.addr.version == 4:
            s = socket.socket()
            s.bind((c.ip, 0))
            s.settimeout(10)
            s.connect((host, int(port)))
            extra = 6 if i % 10 == 0 else 0  # over the burst: rate-limited replies too
            s.sendall(
                encode_frame(nearest)
                + encode_frame({"v": 1, "id": i, "op": "locate"})
                + encode_frame({"v": 1, "id": i, "op": "devices", "kind": "scanner"})
                + struct.pack(">I", 2)
                + b"\x81\xc1"  # malformed
                + encode_frame({"v": 1, "id": i, "op": "nearest", "kind": "fax"})
                + b"".join(encode_frame({"v": 1, "id": i, "op": "ping"}) for _ in range(extra))
            )
            first = read_frame(s)
            where = read_frame(s)
            for _ in range(3 + extra):
                read_frame(s)
            s.close()
        else:
            trusted.sendall(
                encode_frame({**nearest, "client_ip": c.ip})
                + encode_frame({"v": 1, "id": i, "op": "locate", "client_ip": c.ip.upper()})
            )
            first = read_frame(trusted)
            where = read_frame(trusted)
        # Positive control: the address reached the resolver and placed the client.
        assert first["ok"] and first["where"]["zone"] == c.zone, (c.ip, first)
        assert first["devices"][0]["id"] == c.printer, (c.ip, first)
        assert where["where"]["zone"] == c.zone
    trusted.close()
    # The location log holds them; subject access works for a sample, through nearestctl.
    for c in canaries[::40]:
        out = subprocess.run(
            [*CTL, str(d.admin), "--json", "privacy", "export", c.ip],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert {e["zone"] for e in json.loads(out)["entries"]} == {c.zone}
        subprocess.run(
            [*CTL, str(d.admin), "privacy", "erase", c.ip],
            capture_output=True,
            timeout=30,
            check=True,
        )


def run_scenario(tmp_path: Path, canaries: list[Canary], leak: str = "") -> list[Finding]:
    """Run the daemon, drive the canaries, stop it, and scan every sink; return findings."""
    map_path = tmp_path / "canary.geojson"
    map_path.write_text(json.dumps(site_map(canaries)))
    metrics_port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "daemon": {"rate": 1.0, "burst": 8},
        "privacy": {"log_ip": "truncated", "spike_per_minute": 1},
        "logging": {"level": "debug"},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    broker = None
    if mqtt_available():
        if shutil.which("mosquitto") is None:
            skip_or_fail("the MQTT adapter exists but mosquitto is not installed")
        from mosquitto import Mosquitto

        broker = Mosquitto(tmp_path / "broker")
        broker.start()
        sections["mqtt"] = {"url": f"mqtt://127.0.0.1:{broker.port}", "instance": "canary"}
    cfg = write_config(tmp_path / "d", sections, maps=[str(map_path)], subnets=[])
    state = tmp_path / "d" / "state"
    paths = [str(LEAKY), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    env["NEAREST_TEST_LEAK"] = leak
    sinks: list[Sink] = [
        file_sink(state, "state_dir"),
        metrics_sink(f"http://127.0.0.1:{metrics_port}/metrics"),
    ]
    with contextlib_mqtt(broker) as mqtt_read:
        d = DaemonProcess(cfg, env=env).wait_ready()
        try:
            if mqtt_read is not None:  # the daemon is on the broker before anyone asks
                deadline = time.monotonic() + 15
                while b"/status/" not in b"".join(mqtt_read().values()):
                    assert time.monotonic() < deadline, "the daemon never published its status"
                    time.sleep(0.05)
            drive(d, canaries)
            if mqtt_read is not None:
                ask_over_mqtt(broker.port, canaries)  # type: ignore[union-attr]
            time.sleep(0.6)  # a tick: snapshots, purges
            blobs: dict[str, bytes] = {}
            for sink in sinks:
                blobs.update(sink())
            with Client(f"unix://{d.admin}") as c:
                st = c.request({"op": "stats"})["stats"]
            blobs["stats"] = json.dumps(st).encode()
        finally:
            code = d.stop()
        assert code == 0, d.logs()[-2000:]
        blobs.update(file_sink(state, "state_dir-after-stop")())
        _cache_holds_only_the_map(cfg, state / mapcache.FILE_NAME, tmp_path / "rebuilt")
        blobs["daemon stdout+stderr"] = d.log_path.read_bytes()
        if mqtt_read is not None:
            blobs.update(mqtt_read())
    if broker is not None:
        broker.stop()
    # The scan must have had something to look at in each sink.
    # Every canary made the daemon log about it (a spike warning with its /24).
    assert blobs["daemon stdout+stderr"].count(b"request rate spiked") >= len(canaries)
    assert b"nearest_" in blobs["metrics"]
    assert b"level=debug" in blobs["daemon stdout+stderr"]
    if broker is not None:
        assert b"/status/" in blobs.get("mqtt: every topic", b""), "no daemon MQTT message seen"
    scanner = Scanner(canaries)
    findings: list[Finding] = []
    for sink, data in blobs.items():
        findings += scanner.scan(sink, data)
    return findings


def _cache_holds_only_the_map(cfg: Path, cached: Path, scratch: Path) -> None:
    """The daemon's compiled map is byte for byte what the map files alone compile to."""
    assert cached.exists(), "the daemon wrote no compiled site map"
    world = load_world(cfg)
    key = _cache_key(world.config)
    assert key is not None
    mapcache.write(scratch / mapcache.FILE_NAME, key, world.sitemap)
    assert (scratch / mapcache.FILE_NAME).read_bytes() == cached.read_bytes()


@contextmanager
def contextlib_mqtt(broker: Any) -> Iterator[Callable[[], dict[str, bytes]] | None]:
    if broker is None:
        yield None
        return
    with mqtt_capture(broker.port) as read:
        yield read


def ask_over_mqtt(port: int, canaries: list[Canary]) -> None:
    """Ask as every IPv6 canary over MQTT (3.1.1 style reply_to), wait for the replies."""
    import paho.mqtt.client as paho

    replies: dict[str, bytes] = {}
    done = threading.Event()
    ipv6 = [c for c in canaries if c.addr.version == 6]
    if not ipv6:
        return
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="canary-asker")

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        replies[msg.topic] = bytes(msg.payload)
        if len(replies) >= len(ipv6):
            done.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("canary-reply/#", qos=1)
    client.loop_start()
    try:
        time.sleep(0.2)
        for i, c in enumerate(ipv6):
            req = {"v": 1, "id": i, "op": "nearest", "kind": "printer", "client_ip": c.ip}
            req["reply_to"] = f"canary-reply/{i}"
            client.publish("nearest/v1/query", json.dumps(req), qos=1)
        assert done.wait(20), f"{len(replies)} of {len(ipv6)} MQTT replies"
    finally:
        client.loop_stop()
        client.disconnect()
    for i, c in enumerate(ipv6):
        reply = json.loads(replies[f"canary-reply/{i}"])
        assert reply["ok"] and reply["where"]["zone"] == c.zone, reply


def describe(findings: list[Finding]) -> str:
    return "\n".join(f"{f.sink}: {f.canary} as {f.encoding}" for f in findings[:20])


def test_no_canary_address_reaches_any_output(tmp_path: Path) -> None:
    canaries = make_canaries(random.Random(), 300, 100)
    findings = run_scenario(tmp_path, canaries)
    assert not findings, describe(findings)


def test_scanner_finds_every_encoding() -> None:
    canaries = make_canaries(random.Random(7), 3, 2)
    scanner = Scanner(canaries)
    for c in canaries:
        texts, raws = encodings(c.addr)
        for t in texts:
            assert scanner.scan("x", f"ts=1 value={t} end".encode()), t
        for r in raws:
            assert scanner.scan("x", b"\x00" + r + b"\x00"), r.hex()
    assert not scanner.scan("x", b"ts=2026-11-27T09:48:01Z level=info prefix=127.1.2.0/24")


@pytest.mark.parametrize("leak", ["stderr", "log-field", "unkeyed-hash", "state-file"])
def test_negative_control_a_leaking_build_fails_the_scan(tmp_path: Path, leak: str) -> None:
    canaries = make_canaries(random.Random(), 25, 0)
    findings = run_scenario(tmp_path, canaries, leak=leak)
    leaked = {f.canary for f in findings}
    assert leaked == {c.ip for c in canaries}, f"{leak}: scan missed {len(canaries) - len(leaked)}"


def test_a_logger_leak_is_caught_by_the_scrubbing_backstop(tmp_path: Path) -> None:
    canaries = make_canaries(random.Random(), 25, 0)
    findings = run_scenario(tmp_path, canaries, leak="log-message")
    assert not findings, describe(findings)
    logs = (tmp_path / "d" / "nearestd.log").read_text()
    assert "logger=nearestd.leak" in logs and "peer 127." in logs  # it ran, scrubbed to /24
