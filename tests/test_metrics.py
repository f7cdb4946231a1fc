"""The Prometheus page: parsed by prometheus-client's parser, checked by promtool, no unbounded labels."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nearest_client import Client, ServerError
from nearestd.adapters.metrics import (
    Snapshot,
    SnapshotCollector,
    extra_families,
    label_value,
)
from nearestd.app import Daemon
from nearestd.loader import load_world
from support import DaemonProcess, free_port, require_tools, tcp_url, write_config

CONTRACT_FAMILIES = {
    "nearest_queries": "counter",
    "nearest_query_duration_seconds": "histogram",
    "nearest_devices": "gauge",
    "nearest_devices_unlocated": "gauge",
    "nearest_site_devices": "gauge",
    "nearest_location_log_entries": "gauge",
    "nearest_location_log_purged": "counter",
    "nearest_config_reloads": "counter",
    "nearest_config_last_reload_success_timestamp_seconds": "gauge",
    "nearest_config_last_reload_successful": "gauge",
    "nearest_build_info": "gauge",
    "nearest_discovery_enabled": "gauge",
    "nearest_mqtt_enabled": "gauge",
}


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return str(r.read().decode())


def families(page: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(page)}


def looks_unbounded(value: str) -> bool:
    """A label value that is an address, a URI or a device id."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    return "://" in value or "/" in value or re.fullmatch(r"[0-9a-f]{16,}", value) is not None


def bound_address(d: DaemonProcess) -> str:
    """Return the metrics address the daemon logged (port 0 in the config: no port races)."""
    m = re.search(r"listen=http://([^/\s]+)/metrics", d.logs())
    assert m, d.logs()
    return m.group(1)


@pytest.fixture
def metrics_daemon(tmp_path: Path) -> Any:
    cfg = write_config(tmp_path, sections={"metrics": {"listen": "127.0.0.1:0"}})
    d = DaemonProcess(cfg).wait_ready()
    try:
        yield d, bound_address(d)
    finally:
        d.stop()


def test_metrics_page_has_the_contract_families_and_passes_promtool(
    metrics_daemon: tuple[DaemonProcess, str],
) -> None:
    daemon, address = metrics_daemon
    with Client(tcp_url(daemon.config)) as c:
        for _ in range(20):
            c.nearest("printer", k=2)
        c.nearest("scanner", client_ip="10.20.23.7")
        with pytest.raises(ServerError):
            c.request({"op": "nearest", "kind": "fax"})
        with pytest.raises(ServerError):
            c.request({"op": "reload"})  # admin op on a query socket
    with Client(f"unix://{daemon.admin}") as c:
        c.request({"op": "stats"})
    page = scrape(address)
    fams = families(page)
    for name, kind in CONTRACT_FAMILIES.items():
        assert name in fams, f"{name} missing from the page"
        assert fams[name].type == kind, name
    queries = {
        (s.labels["interface"], s.labels["op"], s.labels["result"]): s.value
        for s in fams["nearest_queries"].samples
        if s.name == "nearest_queries_total"
    }
    assert queries[("tcp", "nearest", "ok")] == 21
    assert queries[("tcp", "nearest", "bad-request")] == 1
    assert queries[("tcp", "reload", "forbidden")] == 1
    assert queries[("admin", "stats", "ok")] == 1
    hist = {
        (s.labels["interface"], s.labels.get("le")): s.value
        for s in fams["nearest_query_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert hist[("tcp", "+Inf")] == 23
    # Sub-millisecond answers: most requests land below 1 ms, in buckets finer than it.
    assert hist[("tcp", "0.001")] >= 20
    assert len([le for (i, le) in hist if i == "tcp" and le != "+Inf" and float(le) < 0.001]) >= 4
    devices = {
        (s.labels["kind"], s.labels["state"]): s.value for s in fams["nearest_devices"].samples
    }
    assert sum(devices.values()) == 17
    site = {
        (s.labels["site"], s.labels["kind"]): s.value for s in fams["nearest_site_devices"].samples
    }
    assert site == {("hq", "printer"): 13, ("hq", "scanner"): 4}
    assert fams["nearest_location_log_entries"].samples[0].value == 21
    build = fams["nearest_build_info"].samples[0]
    assert build.value == 1 and build.labels["version"]
    for fam in fams.values():
        for sample in fam.samples:
            for key, value in sample.labels.items():
                assert not looks_unbounded(value), f"{sample.name} {key}={value!r}"
    assert "10.20.23" not in page and "127.0.0.1" not in page
    assert not [n for n in fams if n.startswith("nearest_operations")]
    require_tools("promtool")
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=page.encode(), capture_output=True, timeout=30
    )
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert not r.stdout.strip() and not r.stderr.strip(), (r.stdout + r.stderr).decode()


def test_metrics_listen_on_the_configured_loopback_address_only(
    metrics_daemon: tuple[DaemonProcess, str],
) -> None:
    daemon, address = metrics_daemon
    port = int(address.rsplit(":", 1)[1])
    scrape(address)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(2)
        s.connect(("127.0.0.2", port))
    assert f"http://{address}/metrics" in daemon.logs()


def test_a_taken_metrics_port_is_reported_and_fatal(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, sections={"metrics": {"listen": f"127.0.0.1:{port}"}})
        d = DaemonProcess(cfg)
        assert d.proc.wait(15) == 1
        d.stop()
    assert "cannot listen" in d.logs()


def test_extra_sections_map_to_named_families_and_bounded_labels() -> None:
    fams = {
        f.name: f
        for f in extra_families(
            "discovery",
            {
                "running": True,
                "error": "boom",
                "services": 3,
                "events": {"added": 4, "goodbye": 1, "10.0.0.1": 9, "fe80::1": 2},
                "txt_problems": {},
                "future_counter_total": 5,
                "future_gauge": 2.5,
                "by_interface": {"eth0": {"sent": 1, "queue": 2}},
                "nonsense": [1, 2],
            },
        )
    }
    assert fams["nearest_discovery_browser_running"].samples == (((), 1.0),)
    assert "nearest_discovery_error" not in fams
    assert fams["nearest_discovery_browser_failed"].samples == (((), 1.0),)
    events = fams["nearest_discovery_events"]
    assert events.kind == "counter" and events.labels == ("event",)
    assert dict((lv[0], v) for lv, v in events.samples) == {"added": 4, "goodbye": 1, "other": 11}
    assert fams["nearest_discovery_future_counter"].kind == "counter"
    assert fams["nearest_discovery_future_gauge"].kind == "gauge"
    assert fams["nearest_discovery_sent"].labels == ("interface",)
    assert fams["nearest_discovery_sent"].kind == "counter"
    assert fams["nearest_discovery_queue"].kind == "gauge"
    mqtt = {f.name: f for f in extra_families("mqtt", {"connected": False, "reconnects": 2})}
    assert mqtt["nearest_mqtt_connected"].samples == (((), 0.0),)
    assert mqtt["nearest_mqtt_reconnects"].kind == "counter"
    assert extra_families("mqtt", None) == []
    poller = {
        f.name: f
        for f in extra_families(
            "poller",
            {
                "polls_total": 4,
                "poll_errors_total": {"timeout": 1, "refused": 0},
                "supply_levels": {"mdns-printer-abc": {"black": 40}},
            },
        )
    }
    assert set(poller) == {"nearest_poller_polls", "nearest_poller_errors"}
    assert poller["nearest_poller_errors"].labels == ("error",)
    assert extra_families("bad section!", {"x": 1})[0].name == "nearest_bad_section_x"
    odd = extra_families("odd", {"by_1x": {"a": 1}, "quantile": {"b": 2}})
    assert [f.labels for f in odd] == [("type",), ("type",)]


def test_a_family_prometheus_refuses_is_skipped_not_fatal() -> None:
    from nearestd.adapters.metrics import Family

    good = Family("nearest_fine", "gauge", "fine", (), (((), 1.0),))
    bad = Family("nearest_bad", "histogram", "not histogram data", ("interface",), ((("x",), 1.0),))
    loop = asyncio.new_event_loop()
    try:
        # A loop that never runs: the collector serves its last snapshot.
        collector = SnapshotCollector(lambda: Snapshot(time.time(), ()), loop, timeout=0.01)
        collector._last = Snapshot(time.time(), (bad, good))
        names = [m.name for m in collector.collect()]
    finally:
        loop.close()
    assert "nearest_fine" in names and "nearest_bad" not in names


@pytest.mark.parametrize(
    "value",
    [
        "10.1.2.3",
        "::1",
        "fe80::1%eth0",
        "ipp://printer/ipp",
        "a" * 60,
        "",
        "1abc",
        "deadbeefcafe0123",
        "p-3f5e2c1a7b1d4c8e",
    ],
)
def test_label_values_that_could_carry_addresses_are_folded(value: str) -> None:
    assert label_value(value) == "other"


@pytest.mark.parametrize("value", ["hq", "hq.amsterdam", "north-campus", "tcp", "bad-request"])
def test_names_stay_label_values(value: str) -> None:
    assert label_value(value) == value


def test_a_stuck_loop_serves_the_last_snapshot() -> None:
    built = Snapshot(123.0, ())
    stuck = asyncio.new_event_loop()  # never run: call_soon_threadsafe callbacks never fire
    try:
        collector = SnapshotCollector(lambda: built, stuck, timeout=0.05)
        names = [m.name for m in collector.collect()]
        assert collector.fallbacks == 1
        assert "nearest_metrics_snapshot_age_seconds" in names
    finally:
        stuck.close()


class Figures:
    """A component that only has figures (or fails to give them)."""

    def __init__(self, name: str, figures: dict[str, Any] | None) -> None:
        self.name = name
        self.figures = figures

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def reconfigure(self, cfg: Any) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        if self.figures is None:
            raise RuntimeError("no figures")
        return self.figures


async def test_in_process_exporter_reads_snapshots_built_on_the_loop(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, sections={"metrics": {"listen": f"[::1]:{port}"}})
    daemon = Daemon(load_world(cfg), str(cfg))
    mqtt = Figures("mqtt", {"connected": True, "reconnects": 3})
    daemon.components += [mqtt, Figures("broken", None)]
    try:
        await daemon.start()
    except OSError as exc:
        await daemon.stop()
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        assert daemon.metrics.address == f"[::1]:{port}"
        page = await asyncio.to_thread(scrape, f"[::1]:{port}")
        fams = families(page)
        assert fams["nearest_mqtt_connected"].samples[0].value == 1
        assert fams["nearest_mqtt_reconnects"].samples[0].value == 3
        assert fams["nearest_metrics_snapshot_fallbacks"].samples[0].value == 0
        assert not any(name.startswith("nearest_broken") for name in fams)
        daemon.components.remove(mqtt)
        fams = families(await asyncio.to_thread(scrape, f"[::1]:{port}"))
        assert "nearest_mqtt_connected" not in fams
    finally:
        await daemon.stop()


def test_metrics_with_discovery_running_pass_promtool(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        sections={
            "metrics": {"listen": "127.0.0.1:0"},
            "discovery": {"enabled": True, "interfaces": ["127.0.0.1"]},
        },
    )
    d = DaemonProcess(cfg).wait_ready()
    try:
        page = scrape(bound_address(d))
    finally:
        d.stop()
    fams = families(page)
    assert fams["nearest_discovery_enabled"].samples[0].value == 1
    assert fams["nearest_discovery_browser_running"].samples[0].value == 1
    assert fams["nearest_discovery_browser_failed"].samples[0].value == 0
    for fam in fams.values():
        for sample in fam.samples:
            assert not any(looks_unbounded(v) for v in sample.labels.values()), sample
    require_tools("promtool")
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=page.encode(), capture_output=True, timeout=30
    )
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()
