"""The demo campus: hand-checked answers, and the index equal to brute force everywhere."""

from __future__ import annotations

import itertools

import pytest

from nearest_wire import PAPER_CLASSES, Need
from nearestd.core.devices import DeviceTable
from nearestd.core.ranking import Ranking
from nearestd.loader import load_world
from support import CONFIG_DIR


@pytest.fixture(scope="module")
def table() -> DeviceTable:
    return DeviceTable(load_world(CONFIG_DIR / "example.toml").sitemap)


# (client zone, kind, need, expected device ids in order, expected cost of the first, tolerance)
# Costs checked by hand from the demo map (config/sites/README.md): a device inside the
# client's zone costs 0; one straight above it two floors up costs 2 x 20 m.
CASES = [
    ("n0-lobby", "printer", Need(), ["prn-n0-lobby"], 0.0, 0.0),
    (
        "n0-lobby",
        "printer",
        Need(color=True, paper="tabloid-A3"),
        ["prn-n2-west", "prn-n1-east"],
        40.0,
        0.01,
    ),
    ("n0-lobby", "scanner", Need(), ["scn-n0-mailroom"], 9.0, 0.2),
    ("n0-lobby", "scanner", Need(adf=True), ["scn-n0-mailroom"], 9.0, 0.2),
    ("n1-finance", "printer", Need(color=True), ["prn-n1-east"], 16.1, 0.2),
    ("s0-canteen", "printer", Need(), ["prn-s0-corridor"], 2.2, 0.1),
    ("s0-print-shop", "printer", Need(paper="isoC-A2"), ["prn-s0-plotter"], 0.0, 0.0),
    ("s0-print-shop", "printer", Need(paper="isoC-A2", duplex=True), [], None, 0.0),
]


@pytest.mark.parametrize(("zone", "kind", "need", "ids", "cost", "tol"), CASES)
def test_hand_checked(
    table: DeviceTable,
    zone: str,
    kind: str,
    need: Need,
    ids: list[str],
    cost: float | None,
    tol: float,
) -> None:
    hits = table.index.nearest(table.sitemap.zones[zone], kind, need, len(ids) or 1, Ranking())
    assert [h.device_id for h in hits] == ids
    if cost is not None:
        assert abs(hits[0].cost - cost) <= tol


def test_other_building_pays_the_building_penalty(table: DeviceTable) -> None:
    # From the south building's ground floor, the nearest A3 colour printer is upstairs in
    # the south building, not in the north one 80 m away plus the 100 m penalty.
    zone = table.sitemap.zones["s0-entrance"]
    hits = table.index.nearest(zone, "printer", Need(color=True, paper="tabloid-A3"), 5, Ranking())
    buildings = [table.get(h.device_id).placement.building for h in hits]  # type: ignore[union-attr]
    first_north = buildings.index("north")
    assert all(b == "south" for b in buildings[:first_north])
    assert hits[first_north].cost >= 100.0


def test_index_equals_brute_force_for_every_zone_and_filter(table: DeviceTable) -> None:
    needs = [
        Need(color=c, duplex=d, adf=a, secure=s, paper=p)
        for c, d, a, s, p in itertools.product(
            [False, True], [False, True], [False, True], [False, True], [None, *PAPER_CLASSES[1:]]
        )
    ]
    rankings = [Ranking(), Ranking(0, 0), Ranking(5, 500)]
    n = 0
    for zone in table.sitemap.zones.values():
        for need, kind, ranking, k in itertools.product(
            needs, ["printer", "scanner"], rankings, [1, 3, 20]
        ):
            assert table.index.nearest(zone, kind, need, k, ranking) == table.index.brute_force(
                zone, kind, need, k, ranking
            )
            n += 1
    assert n == 24 * len(needs) * 2 * 3 * 3
