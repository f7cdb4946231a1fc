"""The site-map builder's fast paths decide and word everything as the full checks do.

A static device whose values all have their expected types skips the key-by-key checks,
and a repeated ``capabilities`` object is recognised by its items and their types;
placement of a device on a known floor skips the checks that word problems; devices,
placements and index entries are built by ``compile_constructor``. Each is compared here
with the plain definition on the same inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core.index import Entry
from nearestd.core.model import (
    Capabilities,
    Device,
    DeviceKind,
    DeviceState,
    Placement,
    PlacementMethod,
    Supply,
    compile_constructor,
)
from nearestd.core.sitemap import SiteMapError, _Builder, build_sitemap

ODD: list[Any] = [None, True, False, 0, 1, 1.0, -3, "", " ", "x", [], ["a"], {}, {"a": 1}]
TEXT = st.sampled_from(["p1", "Printer One", "ipp://h/ipp/print", "\tx ", *ODD])
URI = st.sampled_from(
    ["ipp://h/ipp/print", "ipps://h:631/", "socket://10.0.0.9", "ftp://x", "ipp", ":", *ODD]
)
KIND = st.sampled_from(["printer", "scanner", "fax", "Printer", *ODD])
CAP_VALUE = st.sampled_from(
    [True, False, 1, 0, 1.0, "yes", None, "legal-A4", "A4", "<legal-A4", [], {"x": True}]
)
CAPS = st.one_of(
    st.dictionaries(
        st.sampled_from(["color", "duplex", "paper_max", "adf", "secure", "staple", "Color"]),
        CAP_VALUE,
        max_size=4,
    ),
    st.sampled_from([None, [], "color", True, {"color": True}, {"color": 1}, {"color": 1.0}]),
)
ABSENT = object()


def _props(draw: Any) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for key, strategy in (
        ("id", TEXT),
        ("name", TEXT),
        ("uri", URI),
        ("kind", KIND),
        ("make_model", TEXT),
        ("poll", st.sampled_from([True, False, 1, 0, "yes", None])),
        ("capabilities", CAPS),
    ):
        value = draw(st.one_of(st.just(ABSENT), strategy))
        if value is not ABSENT:
            props[key] = value
    return props


@st.composite
def static_props(draw: Any) -> dict[str, Any]:
    """Properties of a static device, mostly valid, each value sometimes of another type."""
    props = _props(draw)
    base = {"id": "p1", "name": "P", "uri": "ipp://h/ipp/print", "kind": "printer"}
    # Most draws keep the required keys valid, so the capability checks are reached too.
    if draw(st.booleans()):
        props = {**base, **{k: v for k, v in props.items() if k not in base}}
    return props


def _static(builder: _Builder, where: str, props: dict[str, Any]) -> Any:
    """Decide a static device as ``_Builder._device`` does: the fast path, else the checks."""
    return builder._static_fast(props) or builder._static_checked("m.geojson", where, props)


def _seeded() -> _Builder:
    """Return a builder that has already seen valid capability objects (its repr cache)."""
    builder = _Builder()
    for caps in ({"color": True}, {"color": True, "paper_max": "legal-A4"}, {}, {"duplex": False}):
        props = {"id": "s", "name": "S", "uri": "ipp://s/", "kind": "printer", "capabilities": caps}
        assert _static(builder, "w", props) is not None
    builder.problems.clear()
    return builder


def _decide(builder: _Builder, props: dict[str, Any], checked: bool) -> tuple[Any, list[str]]:
    builder.problems.clear()
    where = "feature 'p1'"
    device = builder._static_checked("m.geojson", where, props) if checked else _static(builder, where, props)
    return device, [str(p) for p in builder.problems]


@settings(max_examples=600, deadline=None)
@given(static_props())
def test_the_fast_path_agrees_with_the_full_checks(props: dict[str, Any]) -> None:
    fast, full = _seeded(), _Builder()
    expected = _decide(full, props, checked=True)
    assert _decide(fast, props, checked=False) == expected
    # A second time, with whatever the first call remembered.
    assert _decide(fast, props, checked=False) == expected


@pytest.mark.parametrize(
    "caps",
    [{"color": 1}, {"color": 1.0}, {"duplex": 0}, {"paper_max": "A4"}, {"color": "true"}, None],
)
def test_a_remembered_capability_set_does_not_admit_a_lookalike(caps: Any) -> None:
    # {"color": 1} == {"color": True} in Python: a cache keyed by the dict's items would
    # accept it because {"color": True} was seen first.
    builder = _seeded()
    props = {"id": "p", "name": "P", "uri": "ipp://p/", "kind": "printer", "capabilities": caps}
    device, problems = _decide(builder, props, checked=False)
    assert device is None
    assert problems and "properties.capabilities" in problems[0]


def test_absent_and_empty_capabilities_are_no_capabilities() -> None:
    builder = _Builder()
    base = {"id": "p", "name": "P", "uri": "ipp://p/", "kind": "scanner"}
    for props in (base, {**base, "capabilities": {}}):
        device = _static(builder, "w", props)
        assert device is not None and device.capabilities == Capabilities()
        assert device.kind is DeviceKind.SCANNER


def _sample(cls: type[Any], seed: int) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        n = seed * 31 + i
        if "PlacementMethod" in kind:
            values[f.name] = list(PlacementMethod)[n % len(PlacementMethod)]
        elif "DeviceKind" in kind:
            values[f.name] = list(DeviceKind)[n % 2]
        elif "DeviceState" in kind:
            values[f.name] = list(DeviceState)[n % len(DeviceState)]
        elif "Capabilities" in kind:
            values[f.name] = Capabilities(color=bool(n % 2), paper_max="legal-A4")
        elif "Supply" in kind:
            values[f.name] = (Supply("Black", "toner", n % 100),)
        elif kind.startswith("tuple"):
            values[f.name] = (f"t{n}",)
        elif kind.startswith("bool"):
            values[f.name] = bool(n % 2)
        elif kind.startswith("float"):
            values[f.name] = n / 7
        elif kind.startswith("int"):
            values[f.name] = n
        else:
            values[f.name] = f"v{n}"
    return values


@pytest.mark.parametrize("cls", [Device, Placement, Entry])
@pytest.mark.parametrize("seed", range(4))
def test_a_compiled_constructor_builds_what_the_class_builds(cls: type[Any], seed: int) -> None:
    values = _sample(cls, seed)
    names = [f.name for f in dataclasses.fields(cls)]
    every = compile_constructor(cls, *names)(*(values[n] for n in names))
    plain = cls(**values)
    assert every == plain and hash(every) == hash(plain) and repr(every) == repr(plain)
    assert type(every) is cls
    # Only some fields given: the others take their defaults, as in the class.
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    some = compile_constructor(cls, *required)(*(values[n] for n in required))
    assert some == cls(**{n: values[n] for n in required})
    with pytest.raises(dataclasses.FrozenInstanceError):
        some.__setattr__(names[0], "changed")


def test_a_compiled_constructor_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="unknown or repeated"):
        compile_constructor(Placement, "site", "nope")
    with pytest.raises(ValueError, match="unknown or repeated"):
        compile_constructor(Placement, "site", "site")
    with pytest.raises(TypeError, match="no default"):
        compile_constructor(Placement, "site")

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self) -> None:
            if self.x < 0:
                raise ValueError("negative")

    with pytest.raises(TypeError, match="__post_init__"):
        compile_constructor(Checked, "x")


def _zone(zid: str, level: int) -> dict[str, Any]:
    ring = [[4.0, 52.0], [4.001, 52.0], [4.001, 52.001], [4.0, 52.001], [4.0, 52.0]]
    props = {"feature_type": "zone", "id": zid, "site": "s", "building": "b", "level": level}
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {**props, "name": zid},
    }


PLACES = st.fixed_dictionaries(
    {
        "site": st.sampled_from(["s", "t", None, 1, ["s"]]),
        "building": st.sampled_from(["b", "c", None, 0, {"b": 1}]),
        "level": st.sampled_from([0, 1, 2, True, 1.0, "1", None, [0]]),
    }
)


@settings(max_examples=120, deadline=None)
@given(PLACES)
def test_a_static_device_is_placed_or_refused_as_a_pin_would_be(place: dict[str, Any]) -> None:
    # Pins go through the full placement checks only; a static device takes the fast path
    # on a known floor. Both must place alike and word the same problem.
    base = {"feature_type": "device", **place}
    static = {**base, "static": True, "id": "p1", "name": "P", "uri": "ipp://p/", "kind": "printer"}
    pin = {**base, "match": {"name": "P"}}
    results = []
    for props in (static, pin):
        feature = {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [4.0005, 52.0005]},
            "properties": props,
        }
        doc = {"type": "FeatureCollection", "features": [_zone("z0", 0), _zone("z1", 1), feature]}
        try:
            sm = build_sitemap([("m.geojson", doc)])
        except SiteMapError as exc:
            results.append(str(exc).replace("feature #2", "feature 'p1'"))
            continue
        placed = sm.static_devices[0][1] if sm.static_devices else sm.pins[0].placement
        results.append(dataclasses.replace(placed, method=PlacementMethod.STATIC))
    assert results[0] == results[1]


BOX_CASES = [
    ("box", "POLYGON ((0 0, 2 0, 2 1, 0 1, 0 0))", True),
    ("box drawn clockwise", "POLYGON ((0 0, 0 1, 2 1, 2 0, 0 0))", True),
    ("box with a vertex mid-edge", "POLYGON ((0 0, 1 0, 2 0, 2 1, 0 1, 0 0))", False),
    ("L shape", "POLYGON ((0 0, 2 0, 2 1, 1 1, 1 2, 0 2, 0 0))", False),
    ("rotated square", "POLYGON ((1 0, 2 1, 1 2, 0 1, 1 0))", False),
    ("box with a hole", "POLYGON ((0 0, 4 0, 4 4, 0 4, 0 0), (1 1, 2 1, 2 2, 1 2, 1 1))", False),
    ("two boxes", "MULTIPOLYGON (((0 0, 1 0, 1 1, 0 1, 0 0)), ((2 0, 3 0, 3 1, 2 1, 2 0)))", False),
    ("tiny box", "POLYGON ((4 52, 4.0001 52, 4.0001 52.0001, 4 52.0001, 4 52))", True),
]


def test_boxes_are_told_from_other_polygons_all_at_once() -> None:
    import numpy as np
    import shapely

    from nearestd.core.sitemap import _are_boxes

    for order in (BOX_CASES, BOX_CASES[::-1], [c for c in BOX_CASES if not c[2]], []):
        polygons = np.array([shapely.from_wkt(wkt) for _, wkt, _ in order], dtype=object)
        bounds = shapely.bounds(polygons).reshape(-1, 4)
        got = _are_boxes(polygons, bounds).tolist()
        assert got == [box for _, _, box in order], [name for name, _, _ in order]
