"""The floor drawing and the pages: parsed back with an XML parser, hostile text stays text."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

import pytest

from nearest_wire import Need
from nearest_wire.schema import MapRequest
from nearestd.config import load_config
from nearestd.core.devices import DeviceTable
from nearestd.core.floorplan import (
    LOOKS,
    STATES,
    Atlas,
    cost_parts,
    floor_marks,
    floor_svg,
    legend_svg,
)
from nearestd.core.model import Device, DeviceKind, DeviceState, Supply
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import SiteMap
from nearestd.core.webpages import Answer, floor_page, index_page, lists_page, locate_page
from nearestd.loader import load_world
from nearestd.service import ADMIN_PEER, Service
from support import CONFIG_DIR

NS = {"s": "http://www.w3.org/2000/svg"}
HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "</svg><script>alert(1)</script>",
    "\"' onload='alert(1)",
    "a & b ]]> <!-- c",
    "ctl\x00\x01\x1b[31m\ufffe end",
]


@pytest.fixture(scope="module")
def sitemap() -> SiteMap:
    return load_world(CONFIG_DIR / "example.toml").sitemap


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _ids(root: ET.Element, attr: str) -> list[str]:
    return [e.attrib[attr] for e in root.iter() if attr in e.attrib]


def _device(name: str, zone_name: str, **kw: Any) -> Device:
    return Device(
        id=kw.pop("id", f"mdns-printer-{abs(hash(name)) % 10**8}"),
        kind=DeviceKind.PRINTER,
        name=name,
        uri="ipp://198.51.100.7:631/ipp/print",
        source="mdns",
        location_text=zone_name,
        **kw,
    )


def test_every_floor_draws_exactly_its_zones_and_devices(sitemap: SiteMap) -> None:
    table = DeviceTable(sitemap)
    atlas = Atlas.of(sitemap)
    seen_devices = set()
    assert sum(len(levels) for levels in atlas.levels.values()) == 5
    for (site, building), levels in atlas.levels.items():
        for level in levels:
            marks = floor_marks(table.records(), [], sitemap, site, building, level)
            root = _parse(floor_svg(atlas, site, building, level, marks))
            zones = {
                z.id
                for z in sitemap.zones.values()
                if (z.site, z.building, z.level) == (site, building, level)
            }
            assert set(_ids(root, "data-zone")) == zones
            assert len(_ids(root, "data-zone")) == len(zones)
            expected = {
                d.id
                for d, p in sitemap.static_devices
                if (p.site, p.building, p.level) == (site, building, level)
            }
            assert sorted(_ids(root, "data-device")) == sorted(expected)
            seen_devices |= expected
            # Each zone's name is drawn, inside the zone's element.
            for g in root.iter("{http://www.w3.org/2000/svg}g"):
                if "data-zone" in g.attrib:
                    name = sitemap.zones[g.attrib["data-zone"]].name
                    assert g.find("s:text", NS) is not None
                    assert g.find("s:text", NS).text == name  # type: ignore[union-attr]
    assert seen_devices == {d.id for d, _ in sitemap.static_devices}


def test_devices_are_drawn_inside_their_zone(sitemap: SiteMap) -> None:
    # The drawing uses the site frame: a device's mark lies within its zone's outline's box.
    table = DeviceTable(sitemap)
    rec = table.get("prn-n0-lobby")
    assert rec is not None and rec.placement is not None
    frame = Atlas.of(sitemap).frame("hq", "north")
    x, y = frame.point(rec.placement.x, rec.placement.y)
    minx, miny, maxx, maxy = sitemap.zones["n0-lobby"].polygon.bounds
    x0, y0 = frame.point(minx, maxy)
    x1, y1 = frame.point(maxx, miny)
    assert x0 <= x <= x1 and y0 <= y <= y1


# state of the device, stale flag -> drawn state, SVG element of its symbol
STATE_CASES = [
    (DeviceState.IDLE, False, "idle", "circle"),
    (DeviceState.PROCESSING, False, "processing", "polygon"),
    (DeviceState.STOPPED, False, "stopped", "rect"),
    (DeviceState.UNREACHABLE, False, "unreachable", "path"),
    (DeviceState.UNKNOWN, True, "stale", "circle"),
    (DeviceState.IDLE, True, "stale", "circle"),
    (DeviceState.STOPPED, True, "stopped", "rect"),
    (DeviceState.UNKNOWN, False, "unknown", "polygon"),
]


@pytest.mark.parametrize(("state", "stale", "drawn", "element"), STATE_CASES)
def test_state_sets_shape_and_colour(
    sitemap: SiteMap, state: DeviceState, stale: bool, drawn: str, element: str
) -> None:
    table = DeviceTable(sitemap)
    dev = _device("Canteen printer", "Canteen", state=state, stale=stale, id="p1")
    assert table.upsert(dev, 0.0) == "added"
    marks = floor_marks(table.records(), [], sitemap, "hq", "south", 0)
    root = _parse(floor_svg(Atlas.of(sitemap), "hq", "south", 0, marks))
    el = next(e for e in root.iter() if e.attrib.get("data-device") == "p1")
    assert el.attrib["data-state"] == drawn
    symbol = [c for c in el if not c.tag.endswith("title")]
    assert [c.tag.split("}")[1] for c in symbol] == [element]
    colour = symbol[0].attrib.get("fill") if drawn not in ("unreachable", "stale") else None
    colour = colour or symbol[0].attrib["stroke"]
    assert colour == LOOKS[drawn].colour


def test_each_state_has_its_own_shape_colour_and_word() -> None:
    shapes = [look.shape for look in LOOKS.values()]
    colours = [look.colour for look in LOOKS.values()]
    assert len(set(shapes)) == len(shapes) == len(STATES)
    assert len(set(colours)) == len(colours)
    legend = _parse(legend_svg())
    rows = {g.attrib["data-legend"]: g for g in legend.iter() if "data-legend" in g.attrib}
    assert list(rows) == list(STATES)
    for state, g in rows.items():
        label = g.find("s:text", NS)
        assert label is not None and label.text is not None and label.text.startswith(state)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_stay_text(sitemap: SiteMap, name: str) -> None:
    table = DeviceTable(sitemap)
    dev = _device(
        name,
        "Canteen",
        id=f"id-{name}",
        make_model=name,
        state=DeviceState.STOPPED,
        state_reasons=(name,),
        supplies=(Supply(name, "toner", 40),),
    )
    table.upsert(dev, 0.0)
    marks = floor_marks(table.records(), [], sitemap, "hq", "south", 0)
    root = _parse(floor_svg(Atlas.of(sitemap), "hq", "south", 0, marks))
    el = next(e for e in root.iter() if e.attrib.get("data-device", "").startswith("id-"))
    clean = "".join("\ufffd" if ord(c) < 32 or c == "\ufffe" else c for c in name)
    assert el.attrib["data-device"] == f"id-{clean}"
    title = el.find("s:title", NS)
    assert title is not None and title.text is not None and title.text.startswith(clean)
    assert not any(e.tag.endswith(("script", "img")) for e in root.iter())
    # The pages too: the floor with the panel open, and the lists.
    rec = table.get(dev.id)
    html = floor_page(Atlas.of(sitemap), "hq", "south", 0, marks, rec, dev.id, "v")
    html += lists_page([replace(rec, placement=None)] if rec else [], [], "v")  # type: ignore[arg-type]
    assert (
        "<img" not in html
        and "<script>" not in html
        and "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")
    )
    assert "&lt;img src=x onerror=alert(1)&gt;" in html or "<img" not in name
    # Supply levels are bars (<meter>, no inline style under the page's CSP).
    assert '<meter min="0" max="100" low="15" high="40" optimum="100" value="40">' in html


# client zone, device id -> (floor levels apart x floor penalty, building penalty)
COST_CASES = [
    ("n0-lobby", "prn-n0-lobby", 0.0, 0.0),
    ("n0-lobby", "prn-n2-west", 40.0, 0.0),
    ("s0-canteen", "prn-n1-east", 20.0, 100.0),
    ("s1-lab", "prn-s1-studio", 0.0, 0.0),
]


@pytest.mark.parametrize(("zone", "device", "floor", "building"), COST_CASES)
def test_cost_parts_add_up_to_the_ranked_cost(
    sitemap: SiteMap, zone: str, device: str, floor: float, building: float
) -> None:
    table = DeviceTable(sitemap)
    z = sitemap.zones[zone]
    hits = table.index.nearest(z, "printer", Need(), 20, Ranking())
    hit = next(h for h in hits if h.device_id == device)
    rec = table.get(device)
    assert rec is not None and rec.placement is not None
    dist, f, b = cost_parts(hit, rec.placement, z, Ranking())
    assert (f, b) == (floor, building)
    assert dist == pytest.approx(hit.planar_distance)
    assert dist + f + b == pytest.approx(hit.cost, abs=1e-6)


def _service() -> Service:
    world = load_world(CONFIG_DIR / "example.toml")
    return Service(world.config, world.sitemap, time.time(), lambda: bytes(32))


@pytest.mark.parametrize("ip", ["10.20.50.7", "10.20.23.9", "127.0.0.1", "10.20.32.4"])
def test_explain_is_nearest_and_logs_admin_locate(ip: str) -> None:
    svc = _service()
    now = time.time()
    reply = svc.handle(
        {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "k": 5, "client_ip": ip},
        ADMIN_PEER,
        now,
    )
    zone, answers = svc.explain(ip, "printer", 5, now)
    assert zone.id == reply["where"]["zone"]
    assert [r.device.id for r, _ in answers] == [d["id"] for d in reply["devices"]]
    for (_, hit), d in zip(answers, reply["devices"], strict=True):
        assert round(hit.cost, 2) == d["distance_m"]
    entries = svc.log.export(ip)
    assert [e["op"] for e in entries] == ["admin.nearest", "admin.locate"]
    assert entries[1]["devices"] == [r.device.id for r, _ in answers]


def test_map_op_draws_the_floor_and_refuses_an_unknown_one() -> None:
    svc = _service()
    ok = svc.handle(
        {"v": 1, "id": 1, "op": "map", "site": "hq", "building": "north", "level": 1},
        ADMIN_PEER,
        0.0,
    )
    root = _parse(ok["svg"])
    assert set(_ids(root, "data-zone")) == {
        "n1-west",
        "n1-east",
        "n1-hr",
        "n1-finance",
        "n1-meeting",
    }
    bad = svc.handle(
        {"v": 1, "id": 2, "op": "map", "site": "hq", "building": "north", "level": 9},
        ADMIN_PEER,
        0.0,
    )
    assert bad["error"]["code"] == "unknown-location"
    assert "no zone of the site maps is on that floor" in bad["error"]["message"]
    for req, msg in [
        ({"site": "hq", "building": "north"}, "level: expected an integer"),
        ({"site": "hq", "level": 1}, "building: missing"),
        ({"site": 3, "building": "n", "level": 1}, "site: expected a non-empty string"),
    ]:
        r = svc.handle({"v": 1, "id": 3, "op": "map", **req}, ADMIN_PEER, 0.0)
        assert r["error"]["code"] == "bad-request" and r["error"]["message"].startswith(msg)
    public = svc.handle(
        {"v": 1, "id": 4, "op": "map", "site": "hq", "building": "north", "level": 1},
        replace(ADMIN_PEER, admin=False),
        0.0,
    )
    assert public["error"]["code"] == "forbidden"
    assert MapRequest(1, "hq", "north", 1).op == "map"


def test_pages_parse_and_carry_no_inline_script_or_style(sitemap: SiteMap) -> None:
    table = DeviceTable(sitemap)
    marks = floor_marks(table.records(), [], sitemap, "hq", "north", 0)
    rec = table.get("prn-n0-lobby")
    z = sitemap.zones["n0-lobby"]
    hits = table.index.nearest(z, "printer", Need(), 3, Ranking())
    answers = []
    for h in hits:
        r = table.get(h.device_id)
        assert r is not None and r.placement is not None
        answers.append(Answer(r, *cost_parts(h, r.placement, z, Ranking())))
    atlas = Atlas.of(sitemap)
    pages = [
        index_page(atlas, table.records(), [], "v"),
        floor_page(atlas, "hq", "north", 0, marks, rec, "prn-n0-lobby", "v"),
        lists_page(table.records(), [], "v"),
        locate_page(atlas, "127.0.0.1", "printer", 3, z, answers, marks, None, "v"),
    ]
    for html in pages:
        assert "style=" not in html and "<style" not in html
        assert "<script>" not in html and "javascript:" not in html
        assert html.count("<script") == 1 and 'src="/static/live.js"' in html
        assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "https://" not in html
    assert [a.record.device.id for a in answers] == [h.device_id for h in hits]
    assert pages[3].count("data-answer=") == len(answers)
    assert 'data-here="true"' in pages[3]


def test_example_config_is_what_the_tests_load() -> None:
    assert load_config(CONFIG_DIR / "example.toml").web is not None


def test_quarantined_devices_are_listed_and_drawn_where_they_announce(sitemap: SiteMap) -> None:
    from nearestd.core.quarantine import Quarantined

    rogue = _device(HOSTILE[0], "Canteen", id="prn-n0-lobby", addresses=("10.20.51.9",))
    held = Quarantined(rogue, "claims pin 'name' from outside its subnets", 1.0e9, 1.0e9)
    table = DeviceTable(sitemap)
    marks = floor_marks(table.records(), [held], sitemap, "hq", "south", 0)
    root = _parse(floor_svg(Atlas.of(sitemap), "hq", "south", 0, marks))
    (q,) = [e for e in root.iter() if "data-quarantined" in e.attrib]
    assert q.attrib["data-quarantined"] == "prn-n0-lobby"
    assert q.attrib["data-state"] == "quarantined"
    # Never counted as a device placed there: the real prn-n0-lobby is in the north building.
    assert "prn-n0-lobby" not in _ids(root, "data-device")
    html = lists_page(table.records(), [held], "v")
    assert 'data-quarantined="prn-n0-lobby"' in html
    assert "claims pin &#39;name&#39;" in html or "claims pin 'name'" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "2001-09-09 01:46:40" in html


def test_the_unlocated_list_is_capped(sitemap: SiteMap) -> None:
    from nearestd.core.webpages import LIST_MAX, lists

    table = DeviceTable(sitemap)
    for i in range(LIST_MAX + 7):
        table.upsert(_device(f"Lost {i}", "nowhere at all", id=f"lost-{i:04d}"), 0.0)
    unlocated, _ = lists(table.records(), [])
    assert unlocated.count("<tr data-device=") == LIST_MAX
    assert f"Unlocated ({LIST_MAX + 7})" in unlocated
    assert "and 7 more" in unlocated


def test_the_chosen_device_is_ringed(sitemap: SiteMap) -> None:
    table = DeviceTable(sitemap)
    marks = floor_marks(table.records(), [], sitemap, "hq", "north", 1)
    root = _parse(floor_svg(Atlas.of(sitemap), "hq", "north", 1, marks, selected="prn-n1-hr"))
    chosen = [e.attrib["data-device"] for e in root.iter() if "data-selected" in e.attrib]
    assert chosen == ["prn-n1-hr"]
    assert sum(1 for e in root.iter() if e.attrib.get("class") == "selected") == 1
