"""Unit tests of the operations pieces: snapshot codec, atomic write, histogram, sd_notify."""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from nearestd.adapters.snapshot import restored, write_atomically
from nearestd.adapters.systemd import Notifier, notify_address, watchdog_interval
from nearestd.core.histogram import LATENCY_BOUNDS, MAX_SERIES, Histogram, Latencies
from nearestd.core.inventory import (
    VERSION,
    InventoryError,
    Saved,
    decode_inventory,
    encode_inventory,
)
from nearestd.core.model import Capabilities, Device, DeviceKind, DeviceState, Endpoint


def sample_device(n: int = 1, **kw: object) -> Device:
    base = Device(
        id=f"mdns:printer-{n}",
        kind=DeviceKind.PRINTER,
        name=f"Ops Printer {n}",
        uri=f"ipp://printer-{n}.local:631/ipp/print",
        make_model="HP LaserJet",
        capabilities=Capabilities(color=True, duplex=True, paper_max="legal-A4", secure=True),
        source="mdns",
        state=DeviceState.IDLE,
        state_reasons=("none",),
        uuid=str(uuid.UUID(int=n)),
        instance=f"Ops Printer {n}",
        host=f"printer-{n}.local",
        addresses=("127.0.0.9", "::1"),
        note="Finance",
        geo=(52.37, 4.89),
        endpoints=(Endpoint("_ipps._tcp", f"ipps://printer-{n}.local:631/ipp/print", 631),),
        extra=(("adminurl", "http://printer.local/"), ("weird", object())),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_inventory_round_trip_keeps_every_device_field() -> None:
    devices = [
        sample_device(1),
        sample_device(2, kind=DeviceKind.SCANNER, geo=None),
        sample_device(3, origin="other-site", origin_placement=("hq", "north", 1, None, 4.9, 52.3)),
    ]
    data = encode_inventory([Saved(d, 1000.0 + i) for i, d in enumerate(devices)], 2000.0)
    back = decode_inventory(data)
    assert [s.device for s in back] == devices
    assert [s.last_seen for s in back] == [1000.0, 1001.0, 1002.0]
    # Non-scalar extras are not written; scalar ones are.
    assert back[0].device.extra == (("adminurl", "http://printer.local/"),)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=VERSION + 1), "snapshot version 2"),
        (lambda d: d.update(format="something-else"), "not a nearestd-inventory snapshot"),
        (lambda d: d.update(devices={}), "devices: expected a list"),
        (lambda d: d["devices"][0].update(last_seen="x"), "devices[0].last_seen"),
        (lambda d: d["devices"][0]["device"].update(kind="fax"), "devices[0].device.kind"),
        (lambda d: d["devices"][0]["device"].update(state="on fire"), "devices[0].device.state"),
        (lambda d: d["devices"][0]["device"].update(uri=7), "devices[0].device.uri"),
        (
            lambda d: d["devices"][0]["device"]["capabilities"].update(paper_max="A0"),
            "capabilities.paper_max",
        ),
        (lambda d: d["devices"][0]["device"]["endpoints"][0].update(port=-1), "endpoints[0].port"),
        (lambda d: d["devices"][0]["device"].update(addresses=["x"] * 65), "device.addresses"),
        (lambda d: d["devices"].append(d["devices"][0]), "duplicate id"),
        (
            lambda d: d["devices"][0]["device"].update(
                origin_placement=["hq", "n", "1", None, 0, 0]
            ),
            "device.origin_placement",
        ),
    ],
)
def test_inventory_rejects_bad_snapshots_naming_the_field(mutate: object, message: str) -> None:
    doc = json.loads(encode_inventory([Saved(sample_device(), 1.0)], 2.0))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(InventoryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_inventory(json.dumps(doc).encode())


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[]", b"null", b'{"format": 1}'])
def test_inventory_rejects_garbage(data: bytes) -> None:
    with pytest.raises(InventoryError):
        decode_inventory(data)


def test_restored_devices_are_stale_and_keep_only_unavailable_states() -> None:
    idle = restored(sample_device(state=DeviceState.IDLE))
    assert idle.stale and idle.state == DeviceState.UNKNOWN and idle.available
    stopped = restored(sample_device(state=DeviceState.STOPPED))
    assert stopped.stale and stopped.state == DeviceState.STOPPED and not stopped.available


def test_write_atomically_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state" / "inventory.json"
    write_atomically(target, b"one")
    write_atomically(target, b"two" * 1000)
    assert target.read_bytes() == b"two" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["inventory.json"]
    assert (target.stat().st_mode & 0o777) == 0o600


def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "inventory.json"
    write_atomically(target, b"old")
    # A directory where the temp file would go makes os.open fail mid-way.
    (tmp_path / f".inventory.json.{os.getpid()}.tmp").mkdir()
    with pytest.raises(OSError):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"


def test_histogram_counts_each_bucket_with_le_semantics() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 0.01, 5.0):
        h.observe(v)
    assert h.cumulative() == ((0.001, 2), (0.01, 4), (float("inf"), 5))
    assert h.count == 5
    assert h.total == pytest.approx(5.0135)
    with pytest.raises(ValueError):
        Histogram((0.1, 0.01))


def test_latencies_bound_the_number_of_series() -> None:
    lat = Latencies()
    assert lat.for_interface("tcp") is lat.for_interface("tcp")
    for i in range(MAX_SERIES * 2):
        lat.for_interface(f"if{i}")
    assert len(lat.by_interface) <= MAX_SERIES + 1
    assert LATENCY_BOUNDS[0] < 0.0001  # sub-millisecond answers land in distinct buckets


def test_notify_address_and_watchdog_parsing() -> None:
    assert notify_address("@nearestd/notify") == "\0nearestd/notify"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("vsock:2:1234") is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}, 42) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 42) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({}, 42) is None


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_speaks_the_datagram_protocol_to_a_real_socket(
    tmp_path: Path, abstract: bool
) -> None:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@nearest-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify")
    rx.bind("\0" + name[1:] if abstract else name)
    rx.settimeout(2)
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "500000"}
    try:
        n = Notifier.from_environment(env)
        assert env == {}, "the variables are unset so that children do not inherit them"
        assert n.enabled and n.watchdog == 0.25
        assert n.ready("serving 3 devices")
        assert n.notify("WATCHDOG=1")
        assert n.stopping()
        got = [rx.recv(4096).decode() for _ in range(3)]
    finally:
        rx.close()
    assert got[0].split("\n")[:2] == ["READY=1", "STATUS=serving 3 devices"]
    assert got[1] == "WATCHDOG=1"
    assert got[2].startswith("STOPPING=1\n")
    n.close()


def test_notifier_without_a_manager_is_silent_and_survives_a_missing_socket(
    tmp_path: Path,
) -> None:
    assert not Notifier.from_environment({}).notify("READY=1")
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert not gone.notify("READY=1")
    assert gone.failed == 1


def test_the_snapshot_codec_covers_every_device_field() -> None:
    """A field added to Device must be saved, or listed here as deliberately not saved."""
    from dataclasses import fields

    from nearestd.core.inventory import device_to_json

    not_saved = {"stale", "supplies"}  # stale is set on restore; supplies are live state
    written = set(device_to_json(sample_device()))
    assert {f.name for f in fields(Device)} - not_saved == written


def test_watchdog_pings_stop_while_the_event_loop_is_stuck(tmp_path: Path) -> None:
    import asyncio
    import time

    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "notify"))
    rx.setblocking(False)

    def drain() -> list[bytes]:
        got = []
        while True:
            try:
                got.append(rx.recv(4096))
            except BlockingIOError:
                return got

    n = Notifier(str(tmp_path / "notify"), watchdog=0.02)
    # The test's own loop: between two runs it is stuck (no task runs), as a blocked one is.
    loop = asyncio.new_event_loop()
    task = loop.create_task(n.keepalive(lambda: "status"))
    try:
        loop.run_until_complete(asyncio.sleep(0.3))
        assert drain().count(b"WATCHDOG=1") >= 5
        time.sleep(0.3)  # the loop is stuck: no ping is sent
        assert drain() == []
        loop.run_until_complete(asyncio.sleep(0.1))
        assert b"WATCHDOG=1" in drain()
    finally:
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        loop.close()
        rx.close()
        n.close()


async def test_concurrent_snapshot_writes_are_serialised(tmp_path: Path) -> None:
    import asyncio
    import time

    from nearestd.adapters.snapshot import FILE_NAME, InventorySnapshots
    from nearestd.loader import load_world
    from nearestd.service import Service
    from support import write_config

    def build() -> Service:
        world = load_world(write_config(tmp_path))
        service = Service(world.config, world.sitemap, time.time(), lambda: b"k" * 32)
        for i in range(200):
            service.upsert_device(sample_device(i), time.time())
        return service

    service = await asyncio.to_thread(build)  # loading the campus would block the loop
    snaps = InventorySnapshots(service)
    assert snaps.restore(time.time()) == 0
    for _ in range(5):
        assert all(await asyncio.gather(*(snaps.write() for _ in range(4))))
    assert snaps.writes_failed == 0 and snaps.writes_ok == 20
    saved = decode_inventory((tmp_path / "state" / FILE_NAME).read_bytes())
    assert len(saved) == 200
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [FILE_NAME]
