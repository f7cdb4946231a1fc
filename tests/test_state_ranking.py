"""Live state in the ranking: idle before processing only on a tie; index equals brute force."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nearest_wire import Need
from nearestd.core.devices import DeviceTable, state_rank
from nearestd.core.model import Device, DeviceKind, DeviceState
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import build_sitemap
from test_index_property import needs, rankings, worlds

STATES = [
    DeviceState.IDLE,
    DeviceState.PROCESSING,
    DeviceState.UNKNOWN,
    DeviceState.STOPPED,
    DeviceState.UNREACHABLE,
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=worlds(),
    need=needs,
    k=st.integers(1, 12),
    ranking=rankings,
    kind=st.sampled_from(["printer", "scanner"]),
    data=st.data(),
)
def test_index_with_live_states_equals_brute_force(
    world: dict[str, Any], need: Need, k: int, ranking: Ranking, kind: str, data: Any
) -> None:
    zones = world.pop("_zones")
    table = DeviceTable(build_sitemap([("random.geojson", world)]))
    for rec in list(table.records()):
        state = data.draw(st.sampled_from(STATES))
        accepting = data.draw(st.booleans()) if state != DeviceState.UNREACHABLE else True
        table.upsert(replace(rec.device, state=state, accepting_jobs=accepting), 2.0)
    for zid in zones:
        zone = table.sitemap.zones[zid]
        got = table.index.nearest(zone, kind, need, k, ranking)
        assert got == table.index.brute_force(zone, kind, need, k, ranking), zid
        for a, b in itertools.pairwise(got):
            ra = table.index.get(a.device_id).state_rank  # type: ignore[union-attr]
            rb = table.index.get(b.device_id).state_rank  # type: ignore[union-attr]
            assert a.cost < b.cost or (a.cost == b.cost and ra <= rb)
            if not need.any_state:
                assert ra < 2 and rb < 2


def _zone_world(devices: list[tuple[str, float]]) -> dict[str, Any]:
    d = 0.0001
    features: list[dict[str, Any]] = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [
                        [4.0, 52.0],
                        [4.0 + d, 52.0],
                        [4.0 + d, 52.0 + d],
                        [4.0, 52.0 + d],
                        [4.0, 52.0],
                    ]
                ],
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
        }
    ]
    for dev_id, lon in devices:
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [lon, 52.00005]},
                "properties": {
                    "feature_type": "device",
                    "static": True,
                    "id": dev_id,
                    "name": dev_id,
                    "kind": "printer",
                    "uri": "ipp://192.0.2.1/ipp/print",
                    "site": "s",
                    "building": "b",
                    "level": 0,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def test_idle_wins_a_tie_but_never_a_cheaper_device() -> None:
    # a and b are inside the zone (cost 0, a nearer the centroid); c is outside, 3 m away.
    world = _zone_world([("a", 4.00005), ("b", 4.00009), ("c", 4.000145)])
    table = DeviceTable(build_sitemap([("w.geojson", world)]))
    zone = table.sitemap.zones["z"]

    def answer() -> list[str]:
        return [h.device_id for h in table.index.nearest(zone, "printer", Need(), 3, Ranking())]

    def set_state(dev_id: str, state: DeviceState) -> None:
        rec = table.get(dev_id)
        assert rec is not None
        table.upsert(replace(rec.device, state=state), 1.0)

    assert answer() == ["a", "b", "c"]
    set_state("a", DeviceState.PROCESSING)
    set_state("b", DeviceState.IDLE)
    assert answer() == ["b", "a", "c"]  # tie at cost 0: idle first
    set_state("c", DeviceState.IDLE)
    set_state("a", DeviceState.IDLE)
    set_state("b", DeviceState.PROCESSING)
    assert answer() == ["a", "b", "c"]  # c is idle but costs more
    set_state("a", DeviceState.STOPPED)
    assert answer() == ["b", "c"]
    assert [
        h.device_id
        for h in table.index.nearest(zone, "printer", Need(any_state=True), 3, Ranking())
    ] == [
        "b",
        "a",
        "c",
    ]


def test_state_rank_values() -> None:
    dev = Device("x", DeviceKind.PRINTER, "X", "ipp://h/")
    assert state_rank(replace(dev, state=DeviceState.IDLE)) == 0
    assert state_rank(replace(dev, state=DeviceState.PROCESSING)) == 1
    assert state_rank(dev) == 1
    assert state_rank(replace(dev, state=DeviceState.IDLE, accepting_jobs=False)) == 2
    assert state_rank(replace(dev, state=DeviceState.UNREACHABLE)) == 2
