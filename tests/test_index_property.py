"""The spatial index answers exactly what brute force answers, on random sites."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nearest_wire import PAPER_CLASSES, Need
from nearestd.core import index as index_module
from nearestd.core.devices import DeviceTable
from nearestd.core.model import Capabilities, Device, DeviceKind, DeviceState
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import build_sitemap

DEG = 0.00001  # about 1.1 m of latitude


def _rect(lon: float, lat: float, w: float, h: float) -> list[list[float]]:
    return [[lon, lat], [lon + w, lat], [lon + w, lat + h], [lon, lat + h], [lon, lat]]


def _tri(lon: float, lat: float, w: float, h: float) -> list[list[float]]:
    return [[lon, lat], [lon + w, lat], [lon, lat + h], [lon, lat]]


@st.composite
def worlds(draw: Any) -> dict[str, Any]:
    n_sites = draw(st.integers(1, 2))
    features: list[dict[str, Any]] = []
    zone_ids: list[str] = []
    floors: list[tuple[str, str, int, float, float]] = []
    for s in range(n_sites):
        base_lon = 4.0 + s * 0.02
        base_lat = 52.0 + s * 0.01
        for b in range(draw(st.integers(1, 3))):
            for level in range(draw(st.integers(1, 3))):
                floors.append((f"s{s}", f"b{b}", level, base_lon + b * 80 * DEG, base_lat))
                for z in range(draw(st.integers(1, 3))):
                    zid = f"s{s}b{b}l{level}z{z}"
                    lon = base_lon + b * 80 * DEG + z * 20 * DEG
                    w = draw(st.integers(2, 15)) * DEG
                    h = draw(st.integers(2, 15)) * DEG
                    shape = draw(st.sampled_from([_rect, _rect, _tri]))
                    features.append(
                        {
                            "type": "Feature",
                            "geometry": {
                                "type": "Polygon",
                                "coordinates": [shape(lon, base_lat, w, h)],
                            },
                            "properties": {
                                "feature_type": "zone",
                                "id": zid,
                                "site": f"s{s}",
                                "building": f"b{b}",
                                "level": level,
                                "name": zid,
                                "subnets": [f"10.{s}.{len(zone_ids)}.0/24"],
                            },
                        }
                    )
                    zone_ids.append(zid)
    devices = []
    n_dev = draw(st.integers(0, 120))
    # A few positions shared by many devices: exact ties in cost and centroid distance.
    spots = draw(
        st.lists(st.tuples(st.integers(-5, 70), st.integers(-5, 20)), min_size=1, max_size=6)
    )
    spots += [(z * 20 + 1, 1) for z in range(3)]  # inside zones: cost 0 plus penalty
    for i in range(n_dev):
        site, building, level, lon0, lat0 = draw(st.sampled_from(floors))
        # Integer grid positions make exact ties (equal cost and centroid distance) likely.
        if draw(st.booleans()):
            gx, gy = draw(st.sampled_from(spots))
        else:
            gx, gy = draw(st.integers(-5, 70)), draw(st.integers(-5, 20))
        dx, dy = gx * DEG, gy * DEG
        kind = draw(st.sampled_from(["printer", "scanner"]))
        caps = {
            "color": draw(st.booleans()),
            "duplex": draw(st.booleans()),
            "adf": draw(st.booleans()),
            "secure": draw(st.booleans()),
        }
        paper = draw(st.sampled_from([None, *PAPER_CLASSES]))
        if paper is not None:
            caps["paper_max"] = paper
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [lon0 + dx, lat0 + dy]},
                "properties": {
                    "feature_type": "device",
                    "static": True,
                    "id": f"d{i:03d}",
                    "name": f"D{i}",
                    "kind": kind,
                    "uri": f"ipp://10.9.0.{i}/ipp/print",
                    "site": site,
                    "building": building,
                    "level": level,
                    "capabilities": caps,
                },
            }
        )
        devices.append(f"d{i:03d}")
    return {"type": "FeatureCollection", "features": features, "_zones": zone_ids}


needs = st.builds(
    Need,
    color=st.booleans(),
    duplex=st.booleans(),
    adf=st.booleans(),
    secure=st.booleans(),
    paper=st.sampled_from([None, *PAPER_CLASSES[1:]]),
    any_state=st.booleans(),
)
rankings = st.builds(
    Ranking,
    floor_penalty_m=st.sampled_from([0.0, 20.0, 3.5]),
    building_penalty_m=st.sampled_from([0.0, 0.0, 100.0, 7.25]),
    allow_other_sites=st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=worlds(),
    need=needs,
    k=st.one_of(st.integers(1, 3), st.integers(1, 20)),
    ranking=rankings,
    kind=st.sampled_from(["printer", "scanner"]),
    data=st.data(),
)
def test_index_equals_brute_force(
    world: dict[str, Any], need: Need, k: int, ranking: Ranking, kind: str, data: Any
) -> None:
    # Every floor is searched one way: Python lists, numpy arrays, rtrees, or as tuned.
    tiny, large = data.draw(
        st.sampled_from(
            [
                (10**6, 10**6),
                (0, 10**6),
                (0, 0),
                (index_module.TINY_GROUP, index_module.LARGE_GROUP),
            ]
        )
    )
    saved = (index_module.TINY_GROUP, index_module.LARGE_GROUP)
    index_module.TINY_GROUP, index_module.LARGE_GROUP = tiny, large
    try:
        _check_index_equals_brute_force(world, need, k, ranking, kind, data)
    finally:
        index_module.TINY_GROUP, index_module.LARGE_GROUP = saved


def _check_index_equals_brute_force(
    world: dict[str, Any], need: Need, k: int, ranking: Ranking, kind: str, data: Any
) -> None:
    zones = world.pop("_zones")
    sm = build_sitemap([("random.geojson", world)])
    table = DeviceTable(sm)
    index = table.index
    for zid in zones[:1]:  # builds the arrays, so the changes below update them in place
        index.nearest(sm.zones[zid], kind, need, k, ranking)
    # A third of the devices leave and come back stopped under a new id: this exercises
    # the index's incremental remove and insert, which the public API keeps for
    # discovered devices (static ones cannot be removed). Others change state or gain
    # visibility rules in place, as a poll or a reload does.
    for rec in list(table.records()):
        change = data.draw(st.sampled_from(["keep", "keep", "stop", "state", "restrict"]))
        if change == "stop":
            table._records.pop(rec.device.id)
            table._static.pop(rec.device.id)
            index.remove(rec.device.id)
            table.upsert(
                replace(rec.device, id=rec.device.id + "x", state=DeviceState.STOPPED), 1.0
            )
        elif change in ("state", "restrict"):
            entry = index.get(rec.device.id)
            assert entry is not None
            if change == "state":
                entry = replace(entry, available=not entry.available, state_rank=2)
            else:
                entry = replace(entry, restrict=data.draw(st.sampled_from([1, 2, 3, 1 << 70])))
            index.upsert(entry)
    visible = data.draw(st.sampled_from([-1, 0, 1, 2, (1 << 70) | 1]))
    for zid in zones:
        zone = sm.zones[zid]
        got = index.nearest(zone, kind, need, k, ranking, visible)
        want = index.brute_force(zone, kind, need, k, ranking, visible)
        assert got == want, (zid, need, k, ranking, visible)


def test_dynamic_devices_follow_upserts_and_removals() -> None:
    world = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_rect(4.0, 52.0, 10 * DEG, 10 * DEG)],
                },
                "properties": {
                    "feature_type": "zone",
                    "id": "z",
                    "site": "s",
                    "building": "b",
                    "level": 0,
                    "name": "Z",
                    "subnets": ["10.0.0.0/24"],
                },
            },
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_rect(4.001, 52.0, 10 * DEG, 10 * DEG)],
                },
                "properties": {
                    "feature_type": "zone",
                    "id": "far",
                    "site": "s",
                    "building": "b",
                    "level": 0,
                    "name": "Far",
                    "subnets": ["10.0.1.0/24"],
                },
            },
        ],
    }
    sm = build_sitemap([("w.geojson", world)])
    table = DeviceTable(sm)
    zone = sm.zones["z"]
    near = Device(
        "near",
        DeviceKind.PRINTER,
        "Near",
        "ipp://10.0.0.5/",
        source="mdns",
        addresses=("10.0.0.5",),
        capabilities=Capabilities(color=True),
    )
    far = Device(
        "far", DeviceKind.PRINTER, "Far", "ipp://10.0.1.5/", source="mdns", addresses=("10.0.1.5",)
    )
    assert table.upsert(far, 1.0) == "added"
    assert table.upsert(near, 1.0) == "added"
    r = Ranking()
    assert [h.device_id for h in table.index.nearest(zone, "printer", Need(), 2, r)] == [
        "near",
        "far",
    ]
    assert [h.device_id for h in table.index.nearest(zone, "printer", Need(color=True), 2, r)] == [
        "near"
    ]

    assert table.upsert(replace(near, state=DeviceState.STOPPED), 2.0) == "updated"
    assert [h.device_id for h in table.index.nearest(zone, "printer", Need(), 2, r)] == ["far"]
    assert [
        h.device_id for h in table.index.nearest(zone, "printer", Need(any_state=True), 2, r)
    ] == ["near", "far"]
    assert table.remove("far")
    assert table.index.nearest(zone, "printer", Need(), 2, r) == []
    assert table.expire(100.0, 10.0, ["mdns"]) == ["near"]
    assert len(table) == 0
