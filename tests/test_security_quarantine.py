"""Rogue devices claiming a pinned identity from outside the pin's networks are quarantined."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from nearest_wire import Need
from nearestd.config import parse_config
from nearestd.core.devices import DeviceTable
from nearestd.core.model import Device, DeviceKind
from nearestd.core.quarantine import QUARANTINE_MAX, quarantine_reason
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import build_sitemap
from nearestd.service import ADMIN_PEER, Peer, Service
from support import DEMO_MAP

NAME = "Finance LaserJet"  # pinned by name to n1-finance (10.20.23.0/24, 2001:db8:20:23::/64)
UUID = "3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11"  # pinned by uuid to s1-east (10.20.61.0/24)


def doc(**pin_extra: Any) -> dict[str, Any]:
    d = json.loads(DEMO_MAP.read_text())
    for f in d["features"]:
        if f["properties"].get("match") == {"name": NAME}:
            f["properties"].update(pin_extra)
    return d  # type: ignore[no-any-return]


def printer(dev_id: str, addresses: tuple[str, ...], **kw: Any) -> Device:
    return Device(
        id=dev_id,
        kind=DeviceKind.PRINTER,
        name=kw.pop("name", NAME),
        uri=f"ipp://{addresses[0] if addresses else 'x.local'}:631/ipp/print",
        source="mdns",
        instance=kw.pop("instance", NAME),
        addresses=addresses,
        **kw,
    )


def answers(table: DeviceTable, zone: str) -> list[str]:
    sm = table.sitemap
    hits = table.index.nearest(sm.zones[zone], "printer", Need(), 20, Ranking())
    return [h.device_id for h in hits]


def test_claim_from_the_pinned_zone_is_accepted_and_placed_by_the_pin() -> None:
    table = DeviceTable(build_sitemap([("m", doc())]))
    assert table.upsert(printer("real", ("10.20.23.40", "fe80::1")), 1.0) == "added"
    rec = table.get("real")
    assert rec is not None and rec.placement is not None and rec.placement.zone == "n1-finance"
    assert "real" in answers(table, "n1-finance")
    assert not table.quarantine


def test_claim_of_name_or_uuid_from_elsewhere_is_quarantined_and_never_answered() -> None:
    table = DeviceTable(build_sitemap([("m", doc())]))
    assert table.upsert(printer("real", ("10.20.23.40",)), 1.0) == "added"
    gen = table.generation
    # Same id as the real one (ids derive from the UUID or name): the real record stays.
    assert table.upsert(printer("real", ("10.66.0.5",)), 2.0) == "quarantined"
    assert table.upsert(printer("rogue2", ("198.51.100.7",)), 2.0) == "quarantined"
    by_uuid = printer("rogue3", ("10.20.23.41",), instance="Other", name="Other", uuid=UUID)
    assert table.upsert(by_uuid, 2.0) == "quarantined"  # uuid pinned to s1-east
    assert table.upsert(printer("rogue4", ("fe80::66",)), 2.0) == "quarantined"  # link-local only
    assert table.upsert(printer("rogue5", ()), 2.0) == "quarantined"  # no address at all
    mixed = printer("rogue6", ("10.20.23.42", "10.66.0.6"))  # one address outside
    assert table.upsert(mixed, 2.0) == "quarantined"
    assert table.generation == gen, "a quarantined claim must not touch the index"
    assert table.get("real") is not None and table.get("real").device.addresses == ("10.20.23.40",)  # type: ignore[union-attr]
    for zone in ("n1-finance", "s1-east", "n0-lobby"):
        assert not {"rogue2", "rogue3", "rogue4", "rogue5", "rogue6"} & set(answers(table, zone))
    reasons = {q.device.id: q.reason for q in table.quarantine.values()}
    assert "claims the name of the device pinned by feature #" in reasons["rogue2"]
    assert "from 198.51.100.7, outside 10.20.23.0/24, 2001:db8:20:23::/64" in reasons["rogue2"]
    assert "claims the uuid" in reasons["rogue3"]
    # Repeats are not new quarantines; the count and the table stay bounded.
    assert table.upsert(printer("rogue2", ("198.51.100.7",)), 3.0) == "unchanged"
    assert table.quarantined_total == 6


def test_pin_subnets_override_the_zone() -> None:
    sm = build_sitemap([("m", doc(subnets=["198.18.0.0/15"]))])
    assert quarantine_reason(printer("a", ("198.18.1.10",)), sm) is None
    assert quarantine_reason(printer("b", ("10.20.23.40",)), sm) is not None


def test_unpinned_and_static_devices_are_never_quarantined() -> None:
    sm = build_sitemap([("m", doc())])
    assert quarantine_reason(printer("a", ("10.66.0.1",), instance="Some Other"), sm) is None
    assert quarantine_reason(replace(printer("b", ("10.66.0.1",)), source="static"), sm) is None


def test_quarantine_is_bounded_and_expires() -> None:
    table = DeviceTable(build_sitemap([("m", doc())]))
    for i in range(QUARANTINE_MAX + 100):
        table.upsert(printer(f"r{i}", (f"10.66.{i >> 8}.{i & 255}",)), float(i))
    assert len(table.quarantine) == QUARANTINE_MAX
    assert table.quarantine_dropped == 100
    table.expire(10_000.0, 60.0, ["mdns"])
    assert not table.quarantine


def test_reload_re_evaluates_quarantine_both_ways() -> None:
    table = DeviceTable(build_sitemap([("m", doc())]))
    table.upsert(printer("lab", ("198.18.1.10",)), 1.0)
    assert table.get("lab") is None and len(table.quarantine) == 1
    table.set_sitemap(build_sitemap([("m", doc(subnets=["198.18.0.0/15"]))]))
    assert table.get("lab") is not None and not table.quarantine
    assert "lab" in answers(table, "n1-finance")
    table.set_sitemap(build_sitemap([("m", doc())]))
    assert table.get("lab") is None and len(table.quarantine) == 1
    assert "lab" not in answers(table, "n1-finance")


def test_service_lists_quarantined_devices_for_operators_and_counts_them() -> None:
    cfg = parse_config("[metrics]\nlisten = ''\n", "t.toml")
    svc = Service(cfg, build_sitemap([("m", doc())]), 0.0, lambda: b"k" * 32)
    assert svc.upsert_device(printer("rogue", ("10.66.0.5",)), 1.0) == "quarantined"
    admin = svc.handle({"v": 1, "id": 1, "op": "devices"}, ADMIN_PEER, 1.0)["devices"]
    (q,) = [d for d in admin if d.get("quarantined")]
    assert q["id"] == "rogue" and "outside 10.20.23.0/24" in q["quarantined"]
    assert q["located"] is False
    public = svc.handle({"v": 1, "id": 1, "op": "devices"}, Peer("unix", None, True), 1.0)
    assert all("quarantined" not in d for d in public["devices"])
    sec = svc.stats_view(1.0)["security"]
    assert sec["devices_quarantined"] == 1 and sec["devices_quarantined_total"] == 1
