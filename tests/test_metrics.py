"""Metrics families: named in one list, read from one snapshot, bounded labels, one rule for stale.

The page of a real daemon that has done everything is in test_metrics_scrape.py; these
tests read the families of a real Service in-process, through prometheus-client's own
registry, encoder and parser.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nearest_client import Client, ServerError
from nearestd.adapters.metrics import (
    FAMILIES,
    Family,
    Readings,
    SnapshotCollector,
    label_value,
    readings,
)
from nearestd.adapters.snapshot import restored
from nearestd.adapters.systemd import status_line
from nearestd.app import Daemon
from nearestd.core.model import Device, DeviceKind, DeviceState, Supply
from nearestd.loader import load_world
from nearestd.service import ADMIN_PEER, Service
from support import DaemonProcess, free_port, require_tools, tcp_url, wait_for, write_config

NOW = 1_000_000.0


def service(tmp_path: Path) -> Service:
    world = load_world(str(write_config(tmp_path)))
    return Service(world.config, world.sitemap, NOW, lambda: b"k" * 32)


def page_of(r: Readings, defs: tuple[Family, ...] = FAMILIES) -> dict[str, Any]:
    """Render readings with prometheus-client and parse the text back."""

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            from nearestd.adapters.metrics import families

            yield from families(r, defs)

    reg = CollectorRegistry()
    reg.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: Mapping[str, Any], name: str) -> dict[tuple[str, ...], float]:
    """Return a family's samples keyed by label values, in the order FAMILIES gives them."""
    order = next(f.labels for f in FAMILIES if f.name in (name, f"{name}_total"))
    return {
        tuple(s.labels[k] for k in order): s.value
        for s in fams[name].samples
        if not s.name.endswith("_created")
    }


def looks_unbounded(value: str) -> bool:
    """A label value that is an address, a URI or a device id."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    return "://" in value or "/" in value or re.fullmatch(r"[0-9a-f]{16,}", value) is not None


def test_family_names_are_unique_typed_and_prometheus_shaped() -> None:
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    for fam in FAMILIES:
        assert re.fullmatch(r"nearest_[a-z0-9_]+", fam.name), fam.name
        assert fam.type in ("counter", "gauge", "histogram"), fam.name
        assert fam.name.endswith("_total") == (fam.type == "counter"), fam.name
        assert fam.help.endswith(".") and "_total" not in fam.help, fam.name


def test_the_three_mqtt_families_carry_their_intended_names(tmp_path: Path) -> None:
    svc = service(tmp_path)
    mqtt = {"unanswerable": 5, "records_cleared": 8, "federation_conflicts": 2, "connected": True}
    fams = page_of(readings(svc, {"mqtt": mqtt}, NOW))
    assert fams["nearest_mqtt_requests_unanswerable"].type == "counter"
    assert samples(fams, "nearest_mqtt_requests_unanswerable") == {(): 5.0}
    assert fams["nearest_mqtt_requests_unanswerable"].documentation == (
        "Requests that could not be answered (no usable response topic)."
    )
    assert samples(fams, "nearest_mqtt_device_records_cleared") == {(): 8.0}
    assert samples(fams, "nearest_mqtt_federation_conflicts") == {(): 2.0}
    assert samples(fams, "nearest_mqtt_connected") == {(): 1.0}
    assert not [n for n in fams if n.startswith("nearest_mqtt_") and n.endswith("_total")]


def test_families_of_an_absent_section_are_left_out(tmp_path: Path) -> None:
    fams = page_of(readings(service(tmp_path), {}, NOW))
    assert "nearest_mqtt_enabled" in fams and "nearest_mqtt_connected" not in fams
    assert not [n for n in fams if n.startswith(("nearest_poller_", "nearest_discovery_browser"))]


def test_labels_are_folded_and_bounded(tmp_path: Path) -> None:
    events = {"added": 4, "goodbye": 1, "10.0.0.1": 9, "fe80::1": 2}
    events |= {f"ev{i}": 1 for i in range(100)}
    discovery = {"running": True, "error": "boom", "events": events, "txt_problems": {}}
    fams = page_of(readings(service(tmp_path), {"discovery": discovery}, NOW))
    got = samples(fams, "nearest_discovery_events")
    assert got[("added",)] == 4 and got[("goodbye",)] == 1
    assert len(got) <= 64 and got[("other",)] >= 11
    assert samples(fams, "nearest_discovery_browser_failed") == {(): 1.0}
    assert samples(fams, "nearest_discovery_txt_problems") == {}


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


def test_supply_levels_by_device_and_supply_never_with_an_address(tmp_path: Path) -> None:
    svc = service(tmp_path)
    toner = (Supply("Black Toner", "toner", 75), Supply("Waste", "wasteToner", None))
    for dev_id, supplies in (
        ("prn-lobby", toner),
        ("mdns-printer-3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11", (Supply("Cyan", "toner", 10),)),
        ("prn-10.0.0.5", (Supply("Black", "toner", 50),)),  # an id holding an address
    ):
        d = Device(
            dev_id, DeviceKind.PRINTER, dev_id, "ipp://x/ipp", source="mdns", supplies=supplies
        )
        svc.table.upsert(d, NOW)
        svc.live[dev_id] = None  # type: ignore[assignment]  # polled: the census counts them
    got = samples(page_of(readings(svc, {}, NOW)), "nearest_device_supply_level_percent")
    assert got == {
        # The name as the device reports it, as stats show it: no underscore substitution.
        ("prn-lobby", "Black Toner"): 75.0,
        ("mdns-printer-3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11", "Cyan"): 10.0,
    }


def test_wire_stats_status_and_metrics_agree_on_stale(tmp_path: Path) -> None:
    """A restored stopped printer reads stopped everywhere; a restored unknown one, stale."""
    svc = service(tmp_path)
    stopped = Device("mdns-stopped", DeviceKind.PRINTER, "S", "ipp://s/ipp", source="mdns")
    unknown = Device("mdns-unknown", DeviceKind.PRINTER, "U", "ipp://u/ipp", source="mdns")
    svc.table.upsert(restored(Device(**{**_fields(stopped), "state": DeviceState.STOPPED})), NOW)
    svc.table.upsert(restored(unknown), NOW)
    listing = svc.handle({"v": 1, "id": 1, "op": "devices"}, ADMIN_PEER, NOW)["devices"]
    wire = {d["id"]: (d["state"], d["stale"]) for d in listing}
    assert wire["mdns-stopped"] == ("stopped", True)
    assert wire["mdns-unknown"] == ("stale", True)
    stats = svc.stats_view(NOW)
    assert stats["devices_by_kind_state"]["printer/stopped"] == 1
    assert stats["devices_by_kind_state"]["printer/stale"] == 1
    assert stats["stale"] == 2
    fams = page_of(readings(svc, {}, NOW))
    devices = samples(fams, "nearest_devices")
    assert devices[("printer", "stopped")] == 1 and devices[("printer", "stale")] == 1
    # Each device is counted once, in the state the wire shows.
    on_wire: dict[tuple[str, str], int] = {}
    for d in listing:
        on_wire[(d["kind"], d["state"])] = on_wire.get((d["kind"], d["state"]), 0) + 1
    assert devices == on_wire
    assert samples(fams, "nearest_devices_stale")[("printer",)] == 2
    assert status_line(svc, NOW) == "serving 19 devices (2 unlocated, 2 stale) in 24 zones"


def _fields(d: Device) -> dict[str, Any]:
    return {f: getattr(d, f) for f in d.__dataclass_fields__}


def test_a_family_that_cannot_be_read_is_skipped_not_fatal(tmp_path: Path) -> None:
    good = Family("nearest_fine", "gauge", "Fine.", lambda r: [((), 1.0)])
    bad = Family("nearest_bad", "histogram", "Bad.", lambda r: [(("x",), 1.0)], ("interface",))
    fams = page_of(readings(service(tmp_path), {}, NOW), (bad, good))
    assert "nearest_fine" in fams and "nearest_bad" not in fams


def test_a_stuck_loop_serves_the_last_snapshot(tmp_path: Path) -> None:
    built = readings(service(tmp_path), {}, NOW)
    stuck = asyncio.new_event_loop()  # never run: call_soon_threadsafe callbacks never fire
    try:
        collector = SnapshotCollector(lambda: built, stuck, timeout=0.05)
        assert list(collector.collect()) == []  # nothing before a first snapshot
        collector._last = built
        fams = {m.name: m for m in collector.collect()}
        assert collector.fallbacks == 2
        assert fams["nearest_metrics_snapshot_fallbacks"].samples[0].value == 2
        assert fams["nearest_metrics_snapshot_age_seconds"].samples[0].value > 0
    finally:
        stuck.close()


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return str(r.read().decode())


def bound_address(d: DaemonProcess) -> str:
    """Return the metrics address the daemon logged (port 0 in the config: no port races)."""
    # Ready (the admin socket answers) comes before every component has started.
    m = wait_for(
        "the metrics address in the log",
        lambda: re.search(r"listen=http://([^/\s]+)/metrics", d.logs()),
        show=d.logs,
    )
    return str(m.group(1))


@pytest.fixture
def metrics_daemon(tmp_path: Path) -> Any:
    cfg = write_config(tmp_path, sections={"metrics": {"listen": "127.0.0.1:0"}})
    d = DaemonProcess(cfg).wait_ready()
    try:
        yield d, bound_address(d)
    finally:
        d.stop()


def test_queries_and_devices_on_the_page_of_a_daemon(
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
    fams = {f.name: f for f in text_string_to_metric_families(page)}
    queries = samples(fams, "nearest_queries")
    assert queries[("tcp", "nearest", "ok")] == 21
    assert queries[("tcp", "nearest", "bad-request")] == 1
    assert queries[("tcp", "reload", "forbidden")] == 1
    assert queries[("admin", "stats", "ok")] == 1
    counts = {
        s.labels["interface"]: s.value
        for s in fams["nearest_query_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts["tcp"] == 23
    assert sum(samples(fams, "nearest_devices").values()) == 17
    assert samples(fams, "nearest_site_devices") == {("hq", "printer"): 13, ("hq", "scanner"): 4}
    assert samples(fams, "nearest_location_log_entries") == {(): 21}
    for fam in fams.values():
        for sample in fam.samples:
            for key, value in sample.labels.items():
                assert not looks_unbounded(value), f"{sample.name} {key}={value!r}"
    assert "10.20.23" not in page and "127.0.0.1" not in page


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
    daemon = await asyncio.to_thread(lambda: Daemon(load_world(cfg), str(cfg)))
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
        fams = {f.name: f for f in text_string_to_metric_families(page)}
        assert samples(fams, "nearest_mqtt_connected") == {(): 1.0}
        assert samples(fams, "nearest_mqtt_reconnects") == {(): 3.0}
        assert samples(fams, "nearest_metrics_snapshot_fallbacks") == {(): 0.0}
        daemon.components.remove(mqtt)
        page = await asyncio.to_thread(scrape, f"[::1]:{port}")
        assert "# TYPE nearest_mqtt_connected " not in page
    finally:
        await daemon.stop()
    require_tools("promtool")
    r = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=page.encode(),
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()


def test_readings_are_frozen(tmp_path: Path) -> None:
    r = readings(service(tmp_path), {"mqtt": {"events": {"a": 1}}}, time.time())
    with pytest.raises(TypeError):
        r.sections["mqtt"]["x"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        r.sections["mqtt"]["events"]["b"] = 2  # type: ignore[index]


def _supply_samples(tmp_path: Path, names: list[str]) -> dict[tuple[str, ...], float]:
    svc = service(tmp_path)
    supplies = tuple(Supply(n, "toner", 10 + i) for i, n in enumerate(names))
    d = Device("prn-a", DeviceKind.PRINTER, "A", "ipp://x/ipp", source="mdns", supplies=supplies)
    svc.table.upsert(d, NOW)
    svc.live["prn-a"] = None  # type: ignore[assignment]  # polled: the census counts them
    return samples(page_of(readings(svc, {}, NOW)), "nearest_device_supply_level_percent")


def test_a_supply_keeps_the_name_the_device_reports_escaped_only_by_the_format(
    tmp_path: Path,
) -> None:
    names = ["Black Toner", 'Cyan "XL" cartridge', "Drum \\ unit", "Tóner negro", "Waste-Box 2"]
    got = _supply_samples(tmp_path, names)
    assert got == {("prn-a", n): float(10 + i) for i, n in enumerate(names)}


def test_a_supply_name_that_could_carry_an_address_or_a_hash_is_folded(tmp_path: Path) -> None:
    names = ["Toner 10.20.30.40", "fe80::1:2 toner", "Toner 0123456789abcdef", "a\nb", "x" * 65]
    assert set(_supply_samples(tmp_path, names)) == {("prn-a", "other")}
