"""Identity and fair shares in the discovery core: UUID binding, per-source and table caps,
and the tie-break that never favours a discovered device over a static or pinned one."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from nearest_wire import Need
from nearestd.core.devices import DeviceTable, tie_rank
from nearestd.core.discovery import Merger, Parsed, ServiceRecord
from nearestd.core.model import Device, DeviceKind, DeviceState, Placement, PlacementMethod
from nearestd.core.quarantine import quarantine_reason
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import build_sitemap
from support import DEMO_MAP

UUID = "6f1c3c1e-0000-4000-8000-0000000000aa"


def rec(
    type_: str,
    name: str,
    host: str,
    addresses: tuple[str, ...],
    txt: dict[str, str] | None = None,
) -> ServiceRecord:
    strings = tuple(f"{k}={v}".encode() for k, v in (txt or {}).items())
    return ServiceRecord(
        f"{type_}.local.", f"{name}.{type_}.local.", host, 631, addresses, strings, interface="eth0"
    )


def by_name(m: Merger) -> dict[str, Device]:
    return {d.name: d for d in m.devices()}


# ---- a UUID is bound to the host that showed it -----------------------------------------------


def test_another_host_claiming_a_uuid_is_a_conflict_never_merged() -> None:
    m = Merger()
    m.upsert(rec("_ipp._tcp", "Real", "real.local", ("10.0.0.5",), {"UUID": UUID}), 0.0)
    [real] = m.devices()
    m.upsert(rec("_ipps._tcp", "Real", "evil.local", ("10.0.0.66",), {"UUID": UUID}), 1.0)
    devices = {d.id: d for d in m.devices()}
    assert devices[real.id] == real  # untouched: still the real host's URI and endpoints
    assert real.uri == "ipp://10.0.0.5:631/"
    [rogue] = [d for d in devices.values() if d.id != real.id]
    assert "10.0.0.66" in rogue.uri and not rogue.id.endswith(UUID)
    reason = quarantine_reason(rogue, build_sitemap([]))
    assert reason is not None and reason.startswith(f"claims the uuid {UUID} held by")
    assert "real.local" in reason and "10.0.0.66" in reason
    assert m.refused_by["uuid-conflict"] == 1
    # The table quarantines it: never answered, listed with the reason.
    table = DeviceTable(build_sitemap([]))
    assert table.upsert(real, 0.0) == "added"
    assert table.upsert(rogue, 1.0) == "quarantined"
    assert table.get(rogue.id) is None and table.get(real.id) is not None


@pytest.mark.parametrize(
    ("host", "addresses"),
    [
        ("real.local", ("2001:db8::5",)),  # the same mDNS host name: its IPv6 side
        ("real.local", ("10.0.0.9",)),  # the same host after a DHCP change
        ("other-name.local", ("10.0.0.5", "2001:db8::5")),  # a shared address
    ],
)
def test_the_same_host_may_show_the_uuid_again(host: str, addresses: tuple[str, ...]) -> None:
    m = Merger()
    m.upsert(rec("_ipp._tcp", "Real", "real.local", ("10.0.0.5",), {"UUID": UUID}), 0.0)
    m.upsert(rec("_ipps._tcp", "Real", host, addresses, {"UUID": UUID}), 1.0)
    [d] = m.devices()
    assert d.capabilities.secure and not m.refused_by


def test_once_the_holder_is_gone_the_uuid_is_free() -> None:
    m = Merger()
    m.upsert(rec("_ipp._tcp", "Real", "real.local", ("10.0.0.5",), {"UUID": UUID}), 0.0)
    claim = rec("_ipps._tcp", "New", "new.local", ("10.0.0.7",), {"UUID": UUID})
    m.upsert(claim, 1.0)
    assert len(m.devices()) == 2
    m.remove("eth0", "_ipp._tcp.local.", "Real._ipp._tcp.local.")
    m.upsert(claim, 2.0)  # its next announcement
    [d] = m.devices()
    assert d.id.endswith(UUID) and "conflict" not in dict(d.extra)


# ---- caps: per source, and a full table that keeps known and pinned devices ---------------------


def test_one_source_gets_at_most_its_share() -> None:
    m = Merger(max_devices=100, max_per_source=3)
    for i in range(10):
        m.upsert(rec("_ipp._tcp", f"Flood {i}", f"f{i}.local", ("10.0.0.66",)), 0.0)
    assert len(m.devices()) == 3 and m.refused_by["source-cap"] == 7
    m.upsert(rec("_ipp._tcp", "Real", "real.local", ("10.0.0.5",)), 1.0)
    assert "Real" in by_name(m)
    # A flood device leaving frees its share.
    m.remove("eth0", "_ipp._tcp.local.", "Flood 0._ipp._tcp.local.")
    m.upsert(rec("_ipp._tcp", "Flood 9", "f9.local", ("10.0.0.66",)), 2.0)
    assert "Flood 9" in by_name(m)


def test_a_full_table_keeps_room_for_known_and_pinned_devices() -> None:
    pinned_names = {"Pinned New"}

    def pinned(p: Parsed) -> bool:
        return p.record.instance in pinned_names

    m = Merger(max_devices=4, max_per_source=2, pinned=pinned)
    m.upsert(rec("_ipp._tcp", "Known", "known.local", ("10.0.0.5",)), 0.0)
    m.remove("eth0", "_ipp._tcp.local.", "Known._ipp._tcp.local.")  # it restarts
    for i in range(20):  # a flood from many addresses fills the table
        m.upsert(rec("_ipp._tcp", f"Flood {i}", f"f{i}.local", (f"10.0.1.{i // 2}",)), 1.0)
    assert len(m.devices()) == 4
    m.upsert(rec("_ipp._tcp", "Stranger", "s.local", ("10.0.0.8",)), 2.0)
    assert "Stranger" not in by_name(m) and m.refused_by["table-full"] >= 1
    m.upsert(rec("_ipp._tcp", "Known", "known.local", ("10.0.0.5",)), 3.0)
    m.upsert(rec("_ipp._tcp", "Pinned New", "p.local", ("10.0.0.9",)), 3.0)
    names = set(by_name(m))
    assert {"Known", "Pinned New"} <= names
    assert sum(n.startswith("Flood") for n in names) == 4  # none evicted


# ---- ties: a discovered device never wins over a static or pinned one at equal cost ------------


PLACE = Placement("s", "b", 0, "z", 0.0, 0.0, 0.0, 0.0, PlacementMethod.NOTE)


@pytest.mark.parametrize(
    ("a", "a_place", "b", "b_place"),
    [
        ("static-unknown", PlacementMethod.STATIC, "mdns-idle", PlacementMethod.NOTE),
        ("mdns-unknown", PlacementMethod.PIN, "mdns-idle", PlacementMethod.SUBNET),
        ("static-processing", PlacementMethod.STATIC, "mdns-idle", PlacementMethod.GEO),
        ("static-idle", PlacementMethod.STATIC, "static-processing", PlacementMethod.STATIC),
        ("mdns-idle", PlacementMethod.SUBNET, "mdns-unknown", PlacementMethod.NOTE),
        ("static-stopped", PlacementMethod.STATIC, "mdns-processing", PlacementMethod.NOTE),
    ],
)
def test_tie_rank_order(a: str, a_place: PlacementMethod, b: str, b_place: PlacementMethod) -> None:
    def dev(spec: str) -> Device:
        source, state = spec.split("-")
        return Device("x", DeviceKind.PRINTER, "x", "ipp://10.0.0.1/", source=source,
                      state=DeviceState(state))  # fmt: skip

    ra = tie_rank(dev(a), replace(PLACE, method=a_place))
    rb = tie_rank(dev(b), replace(PLACE, method=b_place))
    assert ra < rb


def test_a_rogue_with_a_note_does_not_win_the_tie_against_a_static_printer() -> None:
    doc: dict[str, Any] = json.loads(DEMO_MAP.read_text())
    table = DeviceTable(build_sitemap([("campus.geojson", doc)]))
    static = next(r for r in table.records() if r.device.kind == DeviceKind.PRINTER and r.placement)
    assert static.placement is not None and static.placement.zone is not None
    zone = table.sitemap.zones[static.placement.zone]
    rogue = Device(
        "0-rogue",  # sorts first by id, the last tie-break
        DeviceKind.PRINTER,
        "Rogue",
        "ipp://10.9.9.9/",
        source="mdns",
        state=DeviceState.IDLE,  # idle, while the static printer's state is unknown
        note=zone.name,
        addresses=("10.9.9.9",),
    )
    assert table.upsert(rogue, 0.0) == "added"
    hits = table.index.nearest(zone, "printer", Need(), 20, Ranking())
    ids = [h.device_id for h in hits]
    costs = {h.device_id: h.cost for h in hits}
    assert costs[rogue.id] == costs[static.device.id] == 0.0
    assert ids.index(static.device.id) < ids.index(rogue.id)
    assert hits == table.index.brute_force(zone, "printer", Need(), 20, Ranking())


def test_the_local_generation_follows_this_daemons_own_devices_only() -> None:
    table = DeviceTable(build_sitemap([]))

    def dev(device_id: str, source: str) -> Device:
        return Device(device_id, DeviceKind.PRINTER, device_id, "ipp://10.0.0.1/", source=source)

    steps = [  # (change, does it bump local_generation)
        (lambda: table.upsert(dev("f1", "mqtt"), 1.0), False),  # a foreign device arrives
        (lambda: table.upsert(dev("m1", "mdns"), 1.0), True),  # one found here
        (lambda: table.upsert(replace(dev("f1", "mqtt"), name="F"), 2.0), False),
        (lambda: table.remove("f1"), False),  # a foreign device leaves
        (lambda: table.upsert(dev("m1", "mqtt"), 3.0), True),  # a local one shadowed away
        (lambda: table.remove("m1"), False),  # now foreign: its leaving is not ours
        (lambda: table.set_sitemap(build_sitemap([])), True),
    ]
    for change, bumps in steps:
        generation, local = table.generation, table.local_generation
        change()
        assert table.generation > generation
        assert (table.local_generation > local) is bumps


def test_the_reach_generation_moves_only_when_how_a_device_is_polled_can_change() -> None:
    table = DeviceTable(build_sitemap([]))
    m1 = Device("m1", DeviceKind.PRINTER, "M1", "ipp://10.0.0.1/", source="mdns")
    steps = [  # (change, does it bump reach_generation: the poller walks the table again)
        (lambda: table.upsert(m1, 1.0), True),  # a device arrives
        (lambda: table.upsert(replace(m1, state=DeviceState.PROCESSING), 2.0), False),
        (lambda: table.upsert(replace(m1, state_reasons=("toner-low",)), 2.0), False),
        (lambda: table.upsert(replace(m1, accepting_jobs=False), 2.0), False),
        (lambda: table.upsert(replace(m1, name="Renamed"), 2.0), False),
        (lambda: table.upsert(replace(m1, addresses=("10.0.0.2",)), 3.0), True),
        (lambda: table.upsert(replace(m1, uri="ipps://10.0.0.1/"), 3.0), True),
        (lambda: table.upsert(Device("f1", DeviceKind.PRINTER, "F", "ipp://10.0.0.9/", source="mqtt"), 3.0), False),
        (lambda: table.remove("f1"), False),  # foreign devices are never polled here
        (lambda: table.remove("m1"), True),
        (lambda: table.set_sitemap(build_sitemap([])), True),
    ]
    for i, (change, bumps) in enumerate(steps):
        reach = table.reach_generation
        change()
        assert (table.reach_generation > reach) is bumps, f"step {i}"
