"""Operations with MQTT on: connection state in the metrics, `offline` published at SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mosquitto import Mosquitto
from support import DaemonProcess, free_port, require_tools, write_config

pytestmark = pytest.mark.realpeer
PREFIX = f"nearest-ops-{os.getpid()}/v1"  # each test run on its own topics


def mqtt_metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        page = r.read().decode()
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(page)
        for s in fam.samples
        if s.name.startswith("nearest_mqtt_")
    }


def wait_for(what: str, pred: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require_tools("mosquitto", "mosquitto_sub", "mosquitto_rr")
    b = Mosquitto(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.close()


def retained(broker: Mosquitto, topic: str) -> str:
    r = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-C", "1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return r.stdout.strip()


def test_mqtt_state_in_metrics_and_offline_within_5s_of_sigterm(
    tmp_path: Path, broker: Mosquitto
) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    instance = f"ops{os.getpid()}"
    cfg = write_config(
        tmp_path / "d",
        sections={
            "metrics": {"listen": metrics},
            "mqtt": {
                "url": f"mqtt://127.0.0.1:{broker.port}",
                "topic_prefix": PREFIX,
                "instance": instance,
            },
        },
    )
    d = DaemonProcess(cfg).wait_ready()
    try:
        wait_for("connected", lambda: mqtt_metrics(metrics).get("nearest_mqtt_connected") == 1)
        m = mqtt_metrics(metrics)
        assert m["nearest_mqtt_enabled"] == 1
        assert m["nearest_mqtt_reconnects_total"] == 0
        assert retained(broker, f"{PREFIX}/status/{instance}") == "online"
        require_tools("promtool")
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as r:
            page = r.read()
        check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
        # An MQTT query lands in the same latency histogram, labelled mqtt.
        rr = subprocess.run(
            [
                *("mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port)),
                *("-t", f"{PREFIX}/query", "-e", f"{PREFIX}-reply/{instance}"),
                *("-m", '{"v": 1, "id": 7, "op": "ping"}', "-W", "10"),
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert '"ok": true' in rr.stdout.replace('"ok":true', '"ok": true'), rr
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as r:
            fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        counts = {
            s.labels["interface"]: s.value
            for s in fams["nearest_query_duration_seconds"].samples
            if s.name.endswith("_count")
        }
        assert counts["mqtt"] >= 1
        broker.restart()
        wait_for(
            "reconnected",
            lambda: (
                (x := mqtt_metrics(metrics)).get("nearest_mqtt_connected") == 1
                and x.get("nearest_mqtt_reconnects_total", 0) >= 1
            ),
            timeout=20,
        )
        started = time.monotonic()
        d.signal(signal.SIGTERM)
        code = d.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        d.stop()
    assert code == 0 and elapsed < 5.0, elapsed
    assert retained(broker, f"{PREFIX}/status/{instance}") == "offline"
