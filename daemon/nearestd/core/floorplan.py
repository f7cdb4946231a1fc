"""One floor drawn as SVG from the site map's own geometry, with every device on it.

Coordinates are the site's local projection (metres east and north, see
``core.sitemap.Projection``); SVG's y axis points down, so north is drawn up by
flipping y. A building's floors share one frame (the box of all its zones), so
switching floors keeps every wall where it was. Each device is marked by a shape
*and* a colour per state, so the legend does not rely on colour alone.

Device names, zone names and every value a device reports are attacker-controlled
(mDNS TXT, IPP attributes): everything put in the markup goes through ``text`` or
``attr``, which escape it and drop characters XML cannot carry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from shapely.geometry.base import BaseGeometry

from nearestd.core.census import shown_state
from nearestd.core.devices import Record
from nearestd.core.index import Hit
from nearestd.core.model import Device, Placement, Zone
from nearestd.core.quarantine import Quarantined
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import SiteMap

SVG_NS = "http://www.w3.org/2000/svg"
# Characters XML 1.0 cannot carry at all (even escaped): C0 controls but tab, LF and CR,
# surrogates, U+FFFE and U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class Look:
    """How one state is drawn: colour, shape and the word the legend gives it."""

    state: str
    colour: str
    shape: str
    label: str


# Shapes differ per state, colours too (the palette stays apart under the common colour
# blindnesses: blue, orange, vermilion, black, purple, grey); hollow means "not known now".
LOOKS: dict[str, Look] = {
    look.state: look
    for look in (
        Look("idle", "#0072b2", "circle", "idle: ready"),
        Look("processing", "#009e73", "diamond", "processing: printing or scanning"),
        Look("stopped", "#d55e00", "square", "stopped: needs someone"),
        Look("unreachable", "#000000", "cross", "unreachable: does not answer"),
        Look("stale", "#e69f00", "ring", "stale: discovery lost it"),
        Look("unknown", "#777777", "triangle", "unknown: not polled"),
        Look("quarantined", "#cc79a7", "octagon", "quarantined: claims another's identity"),
    )
}
STATES = tuple(LOOKS)


def text(value: object) -> str:
    """Return a value as XML/HTML character data: escaped, unrepresentable characters replaced."""
    s = _NOT_XML.sub("\ufffd", str(value))
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def attr(value: object) -> str:
    """Return a value for a double- or single-quoted XML/HTML attribute."""
    return text(value).replace('"', "&quot;").replace("'", "&#39;")


def display_state(device: Device) -> str:
    """Return the state a device is drawn in: the census's one rule (stopped first, then stale)."""
    return shown_state(device)


@dataclass(frozen=True, slots=True)
class Mark:
    """A device drawn on a floor: where, in which state, and under which key."""

    key: str
    device: Device
    x: float
    y: float
    state: str
    quarantined: bool = False


@dataclass(frozen=True, slots=True)
class Frame:
    """The box of a building in its site's frame, and the sizes drawn in it."""

    minx: float
    miny: float
    maxx: float
    maxy: float

    @property
    def unit(self) -> float:
        """Return the size of a device mark, in metres: about 1/70 of the longer side."""
        return max(self.maxx - self.minx, self.maxy - self.miny, 1.0) / 70.0

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Return SVG user coordinates of a site-frame point (north up)."""
        return (round(x - self.minx, 2), round(self.maxy - y, 2))

    def view_box(self, margin: float) -> str:
        """Return the viewBox attribute's value."""
        w = self.maxx - self.minx + 2 * margin
        h = self.maxy - self.miny + 2 * margin
        return f"{-margin:.2f} {-margin:.2f} {w:.2f} {h:.2f}"


@dataclass(frozen=True, slots=True)
class Atlas:
    """Every floor of a site map: levels per building, zones per floor, each building's frame.

    Built in one pass over the zones, once per site map: a 10,000-zone map would
    otherwise be walked several times for every page.
    """

    levels: dict[tuple[str, str], list[int]]
    zones: dict[tuple[str, str, int], list[Zone]]
    frames: dict[tuple[str, str], Frame]

    @classmethod
    def of(cls, sitemap: SiteMap) -> Atlas:
        """Return the atlas of a site map."""
        zones: dict[tuple[str, str, int], list[Zone]] = {}
        boxes: dict[tuple[str, str], list[float]] = {}
        for z in sitemap.zones.values():
            zones.setdefault((z.site, z.building, z.level), []).append(z)
            b = z.polygon.bounds
            box = boxes.setdefault((z.site, z.building), [b[0], b[1], b[2], b[3]])
            box[:] = [min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3])]
        levels: dict[tuple[str, str], list[int]] = {}
        for site, building, level in sorted(zones):
            levels.setdefault((site, building), []).append(level)
        for floor in zones.values():
            floor.sort(key=lambda z: z.id)
        frames = {key: Frame(*box) for key, box in boxes.items()}
        return cls(levels, zones, frames)

    def floor_zones(self, site: str, building: str, level: int) -> list[Zone]:
        """Return the zones of one floor, by id (empty: no such floor)."""
        return self.zones.get((site, building, level), [])

    def frame(self, site: str, building: str) -> Frame:
        """Return the box of all zones of a building, every floor."""
        return self.frames.get((site, building), Frame(0.0, 0.0, 1.0, 1.0))


def on_floor(p: Placement | None, site: str, building: str, level: int) -> bool:
    """Return whether a placement is on the given floor."""
    return p is not None and p.site == site and p.building == building and p.level == level


def floor_marks(
    records: Iterable[Record],
    quarantined: Iterable[Quarantined],
    sitemap: SiteMap,
    site: str,
    building: str,
    level: int,
) -> list[Mark]:
    """Return the marks of one floor: placed devices, then quarantined ones where they announce."""
    marks = [
        Mark(f"d:{r.device.id}", r.device, r.placement.x, r.placement.y, display_state(r.device))
        for r in records
        if r.placement is not None and on_floor(r.placement, site, building, level)
    ]
    marks.sort(key=lambda m: m.key)
    n = 0
    for held in quarantined:
        zone = quarantine_zone(held.device, sitemap)
        if zone is not None and (zone.site, zone.building, zone.level) == (site, building, level):
            x, y = zone.representative
            marks.append(Mark(f"q:{n}:{held.device.id}", held.device, x, y, "quarantined", True))
            n += 1
    return marks


def quarantine_zone(device: Device, sitemap: SiteMap) -> Zone | None:
    """Return the zone a quarantined device announces from (its addresses' subnets), if any."""
    for addr in device.addresses:
        try:
            zone = sitemap.zone_for_ip(addr.split("%", 1)[0])
        except ValueError:
            continue
        if zone is not None:
            return zone
    return None


def _path(geom: BaseGeometry, frame: Frame) -> str:
    parts = []
    for poly in getattr(geom, "geoms", [geom]):
        for ring in (poly.exterior, *poly.interiors):
            pts = [frame.point(x, y) for x, y in ring.coords[:-1]]
            parts.append("M" + "L".join(f"{x:g} {y:g}" for x, y in pts) + "Z")
    return "".join(parts)


def shape(look: Look, x: float, y: float, r: float) -> str:
    """Return the SVG element drawing one state's symbol centred on (x, y)."""
    c = look.colour
    r2 = round(r, 2)
    if look.shape == "circle":
        return f'<circle cx="{x:g}" cy="{y:g}" r="{r2:g}" fill="{c}" stroke="#fff" stroke-width="{r2 / 4:g}"/>'
    if look.shape == "ring":
        return (
            f'<circle cx="{x:g}" cy="{y:g}" r="{r2:g}" fill="#fff" stroke="{c}" '
            f'stroke-width="{r2 / 2.5:g}" stroke-dasharray="{r2 / 2:g}"/>'
        )
    if look.shape == "square":
        s = round(r * 1.7, 2)
        return (
            f'<rect x="{x - s / 2:g}" y="{y - s / 2:g}" width="{s:g}" height="{s:g}" '
            f'fill="{c}" stroke="#fff" stroke-width="{r2 / 4:g}"/>'
        )
    if look.shape == "cross":
        a = round(r * 0.9, 2)
        return (
            f'<path d="M{x - a:g} {y - a:g}L{x + a:g} {y + a:g}M{x - a:g} {y + a:g}L{x + a:g} {y - a:g}" '
            f'stroke="{c}" stroke-width="{r2 / 2:g}" stroke-linecap="round"/>'
        )
    pts = _polygon(look.shape, x, y, r)
    return f'<polygon points="{pts}" fill="{c}" stroke="#fff" stroke-width="{r2 / 4:g}"/>'


_UNIT_POLYGONS = {
    "diamond": ((0.0, -1.3), (1.3, 0.0), (0.0, 1.3), (-1.3, 0.0)),
    "triangle": ((0.0, -1.25), (1.15, 0.85), (-1.15, 0.85)),
    "octagon": tuple(
        (round(c, 3), round(s, 3))
        for c, s in (
            (1.2, 0.5),
            (0.5, 1.2),
            (-0.5, 1.2),
            (-1.2, 0.5),
            (-1.2, -0.5),
            (-0.5, -1.2),
            (0.5, -1.2),
            (1.2, -0.5),
        )
    ),
}


def _polygon(kind: str, x: float, y: float, r: float) -> str:
    return " ".join(f"{x + dx * r:.2f},{y + dy * r:.2f}" for dx, dy in _UNIT_POLYGONS[kind])


def mark_svg(
    mark: Mark, frame: Frame, link: Callable[[str], str] | None = None, selected: bool = False
) -> str:
    """Return one device's element: ``data-device`` (or ``data-quarantined``), state, title."""
    x, y = frame.point(mark.x, mark.y)
    look = LOOKS[mark.state]
    d = mark.device
    ident = "data-quarantined" if mark.quarantined else "data-device"
    title = f"{d.name} ({d.kind}, {look.state})"
    if d.state_reasons:
        title += ": " + ", ".join(d.state_reasons)
    body = f"<title>{text(title)}</title>{shape(look, x, y, frame.unit)}"
    if selected:
        u = frame.unit
        body += (
            f'<circle cx="{x:g}" cy="{y:g}" r="{2.2 * u:.2f}" fill="none" stroke="#b8860b" '
            f'stroke-width="{u / 3:.2f}" class="selected"/>'
        )
    chosen = ' data-selected="true"' if selected else ""
    common = (
        f'{ident}="{attr(d.id)}" data-key="{attr(mark.key)}" data-state="{look.state}" '
        f'class="dev st-{look.state}"{chosen}'
    )
    if link is not None and not mark.quarantined:
        return f'<a href="{attr(link(d.id))}" {common}>{body}</a>'
    return f"<g {common}>{body}</g>"


def zone_svg(zone: Zone, frame: Frame, here: bool = False) -> str:
    """Return one zone's element: its outline and its name, ``data-zone`` set to its id."""
    minx, _, maxx, maxy = zone.polygon.bounds
    # The name along the zone's top edge, clear of the devices placed at its middle.
    cx, cy = frame.point((minx + maxx) / 2, maxy)
    u = frame.unit
    fill = "#fff3b0" if here else "#f4f4f4"
    stroke = "#b8860b" if here else "#9a9a9a"
    extra = ' data-here="true"' if here else ""
    return (
        f'<g class="zone{" here" if here else ""}" data-zone="{attr(zone.id)}"{extra}>'
        f"<title>{text(zone.name)} ({text(zone.id)})</title>"
        f'<path d="{_path(zone.polygon, frame)}" fill="{fill}" stroke="{stroke}" '
        f'stroke-width="{u / (2.5 if here else 6):.2f}" fill-rule="evenodd"/>'
        f'<text x="{cx:g}" y="{cy + 1.8 * u:g}" font-size="{u * 1.1:.2f}" text-anchor="middle" '
        f'fill="#333" font-family="sans-serif">{text(zone.name)}</text></g>'
    )


def floor_svg(
    atlas: Atlas,
    site: str,
    building: str,
    level: int,
    marks: Sequence[Mark],
    here: str | None = None,
    link: Callable[[str], str] | None = None,
    standalone: bool = True,
    selected: str | None = None,
) -> str:
    """Return the SVG of one floor: zones, device marks and a legend of shapes and words."""
    frame = atlas.frame(site, building)
    u = frame.unit
    zones = atlas.floor_zones(site, building, level)
    head = f' xmlns="{SVG_NS}"' if standalone else ""
    title = f"{site} / {building} / level {level}"
    out = [
        f'<svg{head} viewBox="{frame.view_box(3 * u)}" role="img" class="floor" '
        f'data-site="{attr(site)}" data-building="{attr(building)}" data-level="{level}" '
        f'preserveAspectRatio="xMidYMid meet">',
        f"<title>{text(title)}</title>",
        '<g class="zones">',
        *(zone_svg(z, frame, z.id == here) for z in zones),
        '</g><g class="devices" id="devices">',
        *(mark_svg(m, frame, link, m.device.id == selected and not m.quarantined) for m in marks),
        "</g></svg>",
    ]
    return "".join(out)


def legend_svg() -> str:
    """Return the legend: each state's symbol beside its word (no colour needed to read it)."""
    rows = []
    for i, look in enumerate(LOOKS.values()):
        y = 14 + i * 22
        rows.append(
            f'<g data-legend="{look.state}">{shape(look, 12.0, float(y), 6.0)}'
            f'<text x="26" y="{y + 4}" font-size="12" font-family="sans-serif">'
            f"{text(look.label)}</text></g>"
        )
    height = 14 + len(LOOKS) * 22
    return (
        f'<svg xmlns="{SVG_NS}" viewBox="0 0 280 {height}" width="280" height="{height}" '
        f'class="legend" role="img"><title>Legend</title>{"".join(rows)}</svg>'
    )


def cost_parts(
    hit: Hit, placement: Placement, zone: Zone, ranking: Ranking
) -> tuple[float, float, float]:
    """Split a ranked answer's cost into (distance, floor penalty, building penalty).

    The index ranks by ``planar distance + floor penalty + building penalty`` (see
    ``core.index``); the hit carries the cost and the distance, the penalties follow
    from where the device is and where the client is.
    """
    floor = abs(placement.level - zone.level) * ranking.floor_penalty_m
    other = placement.site != zone.site or placement.building != zone.building
    building = ranking.building_penalty_m if other else 0.0
    return (hit.planar_distance, floor, building)
