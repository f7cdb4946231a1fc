"""The site-map builder's shortcuts give the same answers as the plain definitions.

Placing static devices uses a per-floor zone table with bounding boxes instead of
scanning every zone; the prefix count ignores nested prefixes' LPM hits.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import random
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearest_wire import Need
from nearestd.core import index as index_module
from nearestd.core.devices import DeviceTable
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import PrefixTable, _Floors, build_sitemap
from support import ROOT

D = 0.0001


def _zone(zid: str, ring: list[list[float]], level: int = 0, building: str = "b") -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "feature_type": "zone",
            "id": zid,
            "site": "s",
            "building": building,
            "level": level,
            "name": zid,
        },
    }


def _rect(x0: int, y0: int, w: int, h: int) -> list[list[float]]:
    ax, ay, bx, by = 4.0 + x0 * D, 52.0 + y0 * D, 4.0 + (x0 + w) * D, 52.0 + (y0 + h) * D
    return [[ax, ay], [bx, ay], [bx, by], [ax, by], [ax, ay]]


def _ell(x0: int, y0: int) -> list[list[float]]:
    ax, ay = 4.0 + x0 * D, 52.0 + y0 * D
    bx, by = ax + 2 * D, ay + 2 * D
    mx, my = ax + D, ay + D
    return [[ax, ay], [bx, ay], [bx, my], [mx, my], [mx, by], [ax, by], [ax, ay]]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, 6),
            st.integers(0, 6),
            st.integers(1, 3),
            st.integers(1, 3),
            st.integers(0, 1),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 2**32),
)
def test_floor_table_equals_scanning_every_zone(
    shapes: list[tuple[bool, int, int, int, int, int]], seed: int
) -> None:
    # Overlapping rectangles and L shapes on two floors: the first zone in map order wins.
    features = [
        _zone(f"z{i}", _ell(x, y) if ell else _rect(x, y, w, h), level=level)
        for i, (ell, x, y, w, h, level) in enumerate(shapes)
    ]
    sm = build_sitemap([("m.geojson", {"type": "FeatureCollection", "features": features})])
    floors = _Floors(sm.zones.values())
    proj = sm.projections["s"]
    rng = random.Random(seed)
    # Grid points hit edges and corners exactly; random ones fall anywhere.
    points = [(4.0 + i * D / 2, 52.0 + j * D / 2) for i in range(0, 20) for j in range(0, 20)]
    points += [(4.0 + rng.uniform(-D, 10 * D), 52.0 + rng.uniform(-D, 10 * D)) for _ in range(50)]
    for lon, lat in points:
        x, y = proj.forward(lon, lat)
        for level in (0, 1, 2):
            assert floors.zone_containing("s", "b", level, x, y) == sm.zone_containing(
                "s", "b", level, x, y
            )


def test_static_devices_land_in_their_zone() -> None:
    features = [
        _zone("a", _rect(0, 0, 2, 2)),
        _zone("l", _ell(3, 0)),
        _zone("up", _rect(0, 0, 2, 2), level=1),
    ]
    for i, (lon, lat, level, _expect) in enumerate(
        [
            (4.0 + D, 52.0 + D, 0, "a"),
            (4.0 + 3.5 * D, 52.0 + 0.5 * D, 0, "l"),
            (4.0 + 4.5 * D, 52.0 + 1.5 * D, 0, None),  # the L's missing quarter
            (4.0 + D, 52.0 + D, 1, "up"),
        ]
    ):
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [lon, lat]},
                "properties": {
                    "feature_type": "device",
                    "static": True,
                    "id": f"d{i}",
                    "name": f"d{i}",
                    "kind": "printer",
                    "uri": "ipp://x/ipp/print",
                    "site": "s",
                    "building": "b",
                    "level": level,
                },
            }
        )
    sm = build_sitemap([("m.geojson", {"type": "FeatureCollection", "features": features})])
    got = {d.id: p.zone for d, p in sm.static_devices}
    assert got == {"d0": "a", "d1": "l", "d2": None, "d3": "up"}


def test_prefix_count_includes_nested_prefixes() -> None:
    table = PrefixTable()
    for cidr, zid in [
        ("10.0.0.0/24", "a"),
        ("10.0.0.16/28", "b"),
        ("10.0.0.16/28", "c"),
        ("2001:db8::/48", "a"),
        ("2001:db8::/64", "b"),
    ]:
        table.add(ipaddress.ip_network(cidr), zid)
    assert len(table) == 4
    assert table.lookup("10.0.0.17") == "c"
    assert table.lookup("10.0.0.1") == "a"


def _bench_gen() -> Any:
    # The benchmark's generator of large sites, loaded by path (bench/ is not a package
    # on the test path).
    spec = importlib.util.spec_from_file_location("bench_gen", ROOT / "bench" / "gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gen"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("settle_inside", "tiny_group", "large_group"),
    [
        (0.0, 0, 0),
        (1e9, 0, 0),
        (index_module.SETTLE_INSIDE, index_module.TINY_GROUP, index_module.LARGE_GROUP),
        (index_module.SETTLE_INSIDE, 10**6, 10**6),
        (index_module.SETTLE_INSIDE, 0, 10**6),
    ],
    ids=["rtrees-settle-always", "rtrees-settle-never", "as-tuned", "lists", "arrays"],
)
def test_index_equals_brute_force_on_a_dense_generated_campus(
    settle_inside: float, tiny_group: int, large_group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dense floors (many devices tie at distance 0 inside a zone) exercise the rtree's
    # first batch and its enlargement; L-shaped rooms the exact polygon distance. Every
    # floor is searched one way: rtrees (the box query that settles a floor tried always
    # or never), as tuned, Python lists only, numpy arrays only.
    monkeypatch.setattr(index_module, "SETTLE_INSIDE", settle_inside)
    monkeypatch.setattr(index_module, "TINY_GROUP", tiny_group)
    monkeypatch.setattr(index_module, "LARGE_GROUP", large_group)
    gen = _bench_gen()
    world = gen.generate(seed=3, sites=2, buildings=3, devices=4000, prefixes=1500)
    docs, rows = gen.documents(world)
    sm = build_sitemap(list(docs.items()), [("ipam.csv", gen.csv_text(rows))])
    assert len(sm.prefixes) == 1500
    table = DeviceTable(sm)
    rng = random.Random(5)
    zones = rng.sample(list(sm.zones.values()), 40)
    cases = [
        ("printer", Need(color=True), 1),
        ("printer", Need(duplex=True, paper="tabloid-A3"), 4),
        ("scanner", Need(adf=True), 1),
        ("printer", Need(), 20),
        # Few devices match: the first batch cannot hold the answer, the batch grows.
        ("printer", Need(color=True, duplex=True, secure=True, paper="tabloid-A3"), 3),
        ("scanner", Need(adf=True, color=True, secure=True), 5),
    ]
    for zone in zones:
        for kind, need, k in cases:
            for ranking in (Ranking(), Ranking(0.0, 0.0, True)):
                got = table.index.nearest(zone, kind, need, k, ranking)
                assert got == table.index.brute_force(zone, kind, need, k, ranking), (
                    zone.id,
                    kind,
                    need,
                    k,
                    ranking,
                )


def test_floors_move_between_lists_arrays_and_rtrees_as_devices_come_and_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small limits, so that upserts push floors from lists into arrays into rtrees, and
    # removals bring them back.
    monkeypatch.setattr(index_module, "TINY_GROUP", 2)
    monkeypatch.setattr(index_module, "LARGE_GROUP", 8)
    gen = _bench_gen()
    world = gen.generate(seed=9, sites=1, buildings=2, devices=600, prefixes=200)
    docs, rows = gen.documents(world)
    sm = build_sitemap(list(docs.items()), [("ipam.csv", gen.csv_text(rows))])
    table = DeviceTable(sm)
    index = table.index
    entries = list(index.entries())
    rng = random.Random(11)
    zones = list(sm.zones.values())
    ranking = Ranking()

    def check() -> None:
        for zone in rng.sample(zones, 8):
            for kind, need, k in (("printer", Need(color=True), 1), ("scanner", Need(), 3)):
                assert index.nearest(zone, kind, need, k, ranking) == index.brute_force(
                    zone, kind, need, k, ranking
                )

    rng.shuffle(entries)
    for i, entry in enumerate(entries):
        index.remove(entry.device_id)
        if i % 100 == 0:
            check()
    assert len(index) == 0
    check()
    for i, entry in enumerate(entries):
        index.upsert(entry)
        if i % 100 == 0:
            check()
    check()
