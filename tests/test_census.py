"""The census of the device table: one pass, one definition of stale, taken at ``now``."""

from __future__ import annotations

import pytest

from nearestd.core.census import census, shown_state
from nearestd.core.devices import Record
from nearestd.core.model import Device, DeviceKind, DeviceState, Placement, PlacementMethod, Supply

P, S = DeviceKind.PRINTER, DeviceKind.SCANNER
U, ID, ST, UR = DeviceState.UNKNOWN, DeviceState.IDLE, DeviceState.STOPPED, DeviceState.UNREACHABLE


def placed(site: str) -> Placement:
    return Placement(site, "b", 0, "z", 0.0, 0.0, 0.0, 0.0, PlacementMethod.STATIC)


def rec(
    i: str,
    kind: DeviceKind = P,
    state: DeviceState = U,
    stale: bool = False,
    site: str | None = "hq",
    supplies: tuple[Supply, ...] = (),
) -> Record:
    device = Device(i, kind, i, f"ipp://{i}/ipp", state=state, stale=stale, supplies=supplies)
    return Record(device, placed(site) if site else None, 0.0)


@pytest.mark.parametrize(
    ("state", "stale", "shown"),
    [
        (U, False, "unknown"),
        (ID, False, "idle"),
        (U, True, "stale"),  # restored, nothing known since: stale
        (ST, True, "stopped"),  # restored stopped printer: still not answered, reads stopped
        (UR, True, "unreachable"),
        (ID, True, "stale"),  # a poll found it idle, but discovery has not confirmed it
    ],
)
def test_one_rule_for_the_shown_state(state: DeviceState, stale: bool, shown: str) -> None:
    d = Device("x", P, "x", "ipp://x/ipp", state=state, stale=stale)
    assert shown_state(d) == shown


CASES = [
    pytest.param([], {}, id="empty"),
    pytest.param(
        [rec("a"), rec("b", S), rec("c", state=ID)],
        {
            "total": 3,
            "by_kind_state": (
                (("printer", "idle"), 1),
                (("printer", "unknown"), 1),
                (("scanner", "unknown"), 1),
            ),
            "by_site_kind": ((("hq", "printer"), 2), (("hq", "scanner"), 1)),
        },
        id="kinds-and-states",
    ),
    pytest.param(
        [rec("a", stale=True), rec("b", state=ST, stale=True), rec("c", S, stale=True, site=None)],
        {
            "total": 3,
            "stale": 3,
            "stale_by_kind": (("printer", 2), ("scanner", 1)),
            "unlocated": 1,
            "unlocated_by_kind": (("scanner", 1),),
            "by_kind_state": (
                (("printer", "stale"), 1),
                (("printer", "stopped"), 1),
                (("scanner", "stale"), 1),
            ),
        },
        id="restored-stale",
    ),
    pytest.param(
        [rec("a", site="hq"), rec("b", site="lab"), rec("c", S, site="lab"), rec("d", site=None)],
        {
            "by_site_kind": (
                (("hq", "printer"), 1),
                (("lab", "printer"), 1),
                (("lab", "scanner"), 1),
            ),
            "unlocated": 1,
        },
        id="sites",
    ),
]


@pytest.mark.parametrize(("records", "expected"), CASES)
def test_census_counts(records: list[Record], expected: dict[str, object]) -> None:
    c = census(records, now=1234.5)
    assert c.taken == 1234.5
    assert c.total == expected.get("total", len(records))
    for key, want in expected.items():
        assert getattr(c, key) == want, key
    # Every count adds up to the total, whichever way it is cut.
    assert sum(n for _, n in c.by_kind_state) == c.total
    assert sum(n for _, n in c.by_site_kind) + c.unlocated == c.total


def test_only_polled_devices_count_as_polled_and_give_supplies() -> None:
    toner = (Supply("Black", "toner", 40), Supply("Waste", "waste", None))
    records = [
        rec("a", state=ID, supplies=toner),
        rec("b", state=UR),
        rec("c", state=ID, supplies=toner),  # not polled: its supplies are not a reading
    ]
    c = census(records, 0.0, polled={"a", "b"})
    assert c.polled == 2
    assert c.polled_by_state == (("idle", 1), ("unreachable", 1))
    assert c.supplies == (("a", "Black", 40),)
    assert c.in_state("unreachable") == 1 and c.in_state("idle") == 2


def test_supply_readings_are_capped() -> None:
    many = tuple(Supply(f"s{j}", "toner", j) for j in range(5))
    records = [rec(f"d{i}", supplies=many) for i in range(10)]
    c = census(records, 0.0, polled={r.device.id for r in records}, max_supplies=7)
    assert len(c.supplies) == 7


def test_status_line_reads_the_census() -> None:
    c = census([rec("a", stale=True), rec("b", site=None)], 0.0)
    assert c.status_line(24) == "serving 2 devices (1 unlocated, 1 stale) in 24 zones"
