"""Site-map validation names the file and feature; longest-prefix match over IPv4 and IPv6."""

from __future__ import annotations

from typing import Any

import pytest

from nearestd.core.sitemap import SiteMapError, build_sitemap

D = 0.0001


def zone(
    zid: str,
    level: int = 0,
    building: str = "b",
    site: str = "s",
    subnets: list[str] | None = None,
    coords: list[list[float]] | None = None,
    lon: float = 4.0,
    **extra: Any,
) -> dict[str, Any]:
    ring = coords or [
        [lon, 52.0],
        [lon + D, 52.0],
        [lon + D, 52.0 + D],
        [lon, 52.0 + D],
        [lon, 52.0],
    ]
    props = {
        "feature_type": "zone",
        "id": zid,
        "site": site,
        "building": building,
        "level": level,
        "name": zid.upper(),
        "subnets": subnets or [],
        **extra,
    }
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props,
    }


def device(props: dict[str, Any], lon: float = 4.00005, lat: float = 52.00005) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
        "properties": {"feature_type": "device", **props},
    }


def fc(*features: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def problems(*docs: tuple[str, Any], csvs: tuple[tuple[str, str], ...] = ()) -> list[str]:
    with pytest.raises(SiteMapError) as ei:
        build_sitemap(list(docs), list(csvs))
    return [str(p) for p in ei.value.problems]


STATIC = {
    "static": True,
    "id": "p1",
    "name": "P1",
    "kind": "printer",
    "uri": "ipp://10.0.0.9/ipp/print",
    "site": "s",
    "building": "b",
    "level": 0,
}


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        (
            [
                zone(
                    "z",
                    coords=[
                        [4.0, 52.0],
                        [4.001, 52.001],
                        [4.001, 52.0],
                        [4.0, 52.001],
                        [4.0, 52.0],
                    ],
                )
            ],
            "m.geojson: feature 'z': geometry: invalid polygon (Self-intersection",
        ),
        (
            [zone("z", coords=[[4.0, 52.0], [4.001, 52.0], [4.001, 52.001], [4.0, 52.001]])],
            "m.geojson: feature 'z': geometry: each ring needs 4 or more positions and must be closed",
        ),
        (
            [zone("z", coords=[[200.0, 52.0], [200.001, 52.0], [200.001, 52.001], [200.0, 52.0]])],
            "m.geojson: feature 'z': geometry: longitude 200.0 outside WGS84 range -180..180",
        ),
        (
            [zone("z", coords=[[4.0, -91.0], [4.001, -91.0], [4.001, -90.5], [4.0, -91.0]])],
            "m.geojson: feature 'z': geometry: latitude -91.0 outside WGS84 range -90..90",
        ),
        (
            [zone("z"), zone("z", lon=4.01)],
            "m.geojson: feature 'z': properties.id: duplicate zone id 'z'",
        ),
        (
            [zone("a", subnets=["10.0.0.0/24"]), zone("b", lon=4.01, subnets=["10.0.0.0/24"])],
            "m.geojson: feature 'b': properties.subnets[0]: prefix 10.0.0.0/24 is given to zone 'b' and to zone 'a'",
        ),
        (
            [zone("a", subnets=["10.0.0.0/8", "10.0.0.1/24"])],
            "m.geojson: feature 'a': properties.subnets[1]: bad CIDR '10.0.0.1/24'",
        ),
        (
            [zone("a", subnets=["2001:db8::/129"])],
            "m.geojson: feature 'a': properties.subnets[0]: bad CIDR '2001:db8::/129'",
        ),
        (
            [zone("a", subnets=["10.0.0.0/8", 7])],
            "m.geojson: feature 'a': properties.subnets[1]: expected a CIDR string, got int",
        ),
        ([zone("a", level="1")], "m.geojson: feature 'a': properties.level: expected an integer"),
        (
            [zone("a", aliases=["Lobby"]), zone("b", lon=4.01, aliases=["lobby "])],
            "m.geojson: feature 'b': name or alias 'lobby ' also names zone 'a'",
        ),
        (
            [zone("a"), device({**STATIC, "level": 5})],
            "m.geojson: feature 'p1': properties.level: building 'b' has no level 5 (it has 0)",
        ),
        (
            [zone("a"), device({"match": {"name": "X"}, "site": "s", "building": "b", "level": 2})],
            "m.geojson: feature #1: properties.level: building 'b' has no level 2 (it has 0)",
        ),
        (
            [zone("a"), device({**STATIC, "building": "c"})],
            "m.geojson: feature 'p1': properties.building: site 's' has no building 'c'",
        ),
        (
            [zone("a"), device({**STATIC, "site": "t"})],
            "m.geojson: feature 'p1': properties.site: unknown site 't'",
        ),
        (
            [zone("a"), device({**STATIC, "kind": "fax"})],
            "m.geojson: feature 'p1': properties.kind: expected 'printer' or 'scanner'",
        ),
        (
            [zone("a"), device({**STATIC, "uri": "ftp://x"})],
            "m.geojson: feature 'p1': properties.uri: scheme must be one of",
        ),
        (
            [zone("a"), device({**STATIC, "capabilities": {"staple": True}})],
            "m.geojson: feature 'p1': properties.capabilities.staple: unknown capability",
        ),
        (
            [zone("a"), device({**STATIC, "capabilities": {"paper_max": "A4"}})],
            "m.geojson: feature 'p1': properties.capabilities.paper_max: expected one of",
        ),
        (
            [zone("a"), device({**STATIC, "capabilities": {"color": "yes"}})],
            "m.geojson: feature 'p1': properties.capabilities.color: expected true or false",
        ),
        (
            [zone("a"), device(STATIC), device(STATIC)],
            "m.geojson: feature 'p1': properties.id: duplicate device id 'p1'",
        ),
        (
            [zone("a"), device({"match": {"mac": "x"}, "site": "s", "building": "b", "level": 0})],
            "m.geojson: feature #1: properties.match.mac: expected one of uuid, name, host, ip",
        ),
        (
            [
                zone("a"),
                device({"match": {"ip": "10.0.0.999"}, "site": "s", "building": "b", "level": 0}),
            ],
            "m.geojson: feature #1: properties.match.ip: bad address or CIDR '10.0.0.999'",
        ),
        (
            [zone("a"), device(STATIC, lon=181.0)],
            "m.geojson: feature 'p1': geometry: longitude 181.0 outside WGS84 range",
        ),
        (
            [
                {
                    "type": "Feature",
                    "geometry": None,
                    "properties": {"feature_type": "room", "id": "r"},
                }
            ],
            "m.geojson: feature 'r': properties.feature_type: expected 'zone' or 'device', got 'room'",
        ),
    ],
)
def test_validation_names_file_and_feature(features: list[dict[str, Any]], expected: str) -> None:
    found = problems(("m.geojson", fc(*features)))
    assert any(p.startswith(expected) for p in found), found


def test_not_a_feature_collection() -> None:
    assert problems(("m.geojson", {"type": "Feature"})) == [
        "m.geojson: top level: expected a GeoJSON FeatureCollection"
    ]


def test_duplicate_zone_across_files_names_both() -> None:
    found = problems(("a.geojson", fc(zone("z"))), ("b.geojson", fc(zone("z", lon=4.01))))
    assert found == [
        "b.geojson: feature 'z': properties.id: duplicate zone id 'z' (also in a.geojson)"
    ]


@pytest.mark.parametrize(
    ("csv", "expected"),
    [
        ("cidr,zone\n", "ipam.csv: line 1: expected the header 'prefix,zone_id'"),
        (
            "prefix,zone_id\n10.9.0.0/16,nowhere\n",
            "ipam.csv: line 2: zone_id: unknown zone 'nowhere'",
        ),
        ("prefix,zone_id\n10.9.0.0/33,a\n", "ipam.csv: line 2: prefix: bad CIDR '10.9.0.0/33'"),
        (
            "prefix,zone_id\n10.0.0.0/24,b\n",
            "ipam.csv: line 2: prefix: prefix 10.0.0.0/24 is given to zone 'b' and to zone 'a'",
        ),
        (
            "prefix,zone_id\n10.9.0.0/16,a,extra\n",
            "ipam.csv: line 2: expected two fields: prefix,zone_id",
        ),
    ],
)
def test_ipam_csv_errors(csv: str, expected: str) -> None:
    doc = fc(zone("a", subnets=["10.0.0.0/24"]), zone("b", lon=4.01))
    found = problems(("m.geojson", doc), csvs=(("ipam.csv", csv),))
    assert any(p.startswith(expected) for p in found), found


def test_longest_prefix_match_ipv4_ipv6_and_mapped() -> None:
    doc = fc(
        zone("wide", subnets=["10.0.0.0/8", "2001:db8::/32"]),
        zone("narrow", lon=4.01, subnets=["10.1.0.0/16", "2001:db8:1::/48"]),
        zone("host", lon=4.02, subnets=["10.1.2.3/32"]),
    )
    sm = build_sitemap([("m.geojson", doc)], [("ipam.csv", "prefix,zone_id\n10.1.2.0/24,wide\n")])
    cases = {
        "10.9.9.9": "wide",
        "10.1.9.9": "narrow",
        "10.1.2.9": "wide",  # the /24 from the IPAM file beats the /16
        "10.1.2.3": "host",
        "::ffff:10.1.9.9": "narrow",
        "::FFFF:10.1.2.3": "host",
        "2001:db8:5::1": "wide",
        "2001:db8:1:2::1": "narrow",
        "192.0.2.1": None,
        "2001:db9::1": None,
    }
    for ip, want in cases.items():
        got = sm.zone_for_ip(ip)
        assert (got.id if got else None) == want, ip


def test_projection_gives_metres() -> None:
    # Two zones 0.001 degrees of longitude apart at latitude 52: about 68.5 m.
    sm = build_sitemap([("m.geojson", fc(zone("a"), zone("b", lon=4.001)))])
    ax, _ = sm.zones["a"].centroid
    bx, _ = sm.zones["b"].centroid
    assert 68.0 < bx - ax < 69.0
