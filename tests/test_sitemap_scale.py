"""The site-map builder's shortcuts give the same answers as the plain definitions.

Placing static devices uses a per-floor zone table with bounding boxes instead of
scanning every zone; the prefix count ignores nested prefixes' LPM hits.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core.sitemap import PrefixTable, _Floors, build_sitemap

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
