"""One simulated site for the many-sites bench: publishes its devices as a daemon would.

Speaks the inventory protocol (docs/sites.md): retained ``online`` on ``P/status/<site>``
(``offline`` as the will), one retained JSON record per device on
``P/devices/<site>/<id>``, a heartbeat on ``P/alive/<site>``, and one state change per
device per ``--period`` seconds, spread evenly. On ``bench/burst`` it republishes every
record with a new make and model (the bench's burst of foreign records).

Usage: python -m bench.site_publisher --port N --site S --devices 100 --lon X --lat Y
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

PREFIX = "nearest/v1"


def record(site: str, i: int, lon: float, lat: float, state: str, model: str) -> bytes:
    """Return the retained record of device i of a site (the daemons' own layout)."""
    obj = {
        "v": 1,
        "id": f"{site}-d{i:03d}",
        "origin": site,
        "kind": "printer",
        "name": f"{site} printer {i}",
        "uri": f"ipp://10.200.{i // 250}.{i % 250 + 1}:631/ipp/print",
        "make_model": model,
        "capabilities": {"color": i % 2 == 0, "duplex": True},
        "state": state,
        "accepting_jobs": True,
        "stale": False,
        "is_queue": False,
        "source": "mdns",
        "placement": {
            "site": site,
            "building": "main",
            "level": 0,
            "zone": f"{site}-z",
            "lon": round(lon + (i % 10) * 0.00001, 7),
            "lat": round(lat + (i // 10) * 0.00001, 7),
            "method": "subnet",
        },
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--site", required=True)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--period", type=float, default=60.0)
    ap.add_argument("--lon", type=float, required=True)
    ap.add_argument("--lat", type=float, required=True)
    ap.add_argument("--burst", action="store_true", help="republish everything on bench/burst")
    a = ap.parse_args()
    site, n = a.site, a.devices
    status = f"{PREFIX}/status/{site}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{site}")
    client.will_set(status, b"offline", qos=1, retain=True)
    states = ["idle"] * n
    model = ["Bench Printer"]
    burst = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == "bench/burst":
            burst.set()

    client.on_message = on_message
    client.connect("127.0.0.1", a.port, keepalive=30)
    client.loop_start()
    if a.burst:
        client.subscribe("bench/burst", qos=1)
    for i in range(n):
        client.publish(
            f"{PREFIX}/devices/{site}/{site}-d{i:03d}",
            record(site, i, a.lon, a.lat, states[i], model[0]),
            qos=1,
            retain=True,
        )
    client.publish(status, b"online", qos=1, retain=True).wait_for_publish(30)
    print("ready", flush=True)
    step = a.period / n
    nxt = time.monotonic()
    beat = 0.0
    i = 0
    try:
        while True:
            nxt += step
            time.sleep(max(0.0, nxt - time.monotonic()))
            now = time.monotonic()
            if now >= beat:
                beat = now + 5.0
                client.publish(f"{PREFIX}/alive/{site}", b"5", qos=0)
            if burst.is_set():
                burst.clear()
                model[0] = f"Bench Printer {time.time():.3f}"
                for j in range(n):
                    client.publish(
                        f"{PREFIX}/devices/{site}/{site}-d{j:03d}",
                        record(site, j, a.lon, a.lat, states[j], model[0]),
                        qos=1,
                        retain=True,
                    )
            states[i] = "processing" if states[i] == "idle" else "idle"
            client.publish(
                f"{PREFIX}/devices/{site}/{site}-d{i:03d}",
                record(site, i, a.lon, a.lat, states[i], model[0]),
                qos=1,
                retain=True,
            )
            i = (i + 1) % n
    except KeyboardInterrupt:
        pass
    finally:
        client.publish(status, b"offline", qos=1, retain=True)
        client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
