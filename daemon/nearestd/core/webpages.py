"""The operators' web pages as HTML text: sites, one floor, device lists, a lookup.

Pure: the web adapter gathers the records and the answers and passes them in. Every
value is escaped with ``floorplan.text``/``attr``; there is no inline script or
style (the pages are served under ``default-src 'self'``): colours are SVG
presentation attributes, bars are ``<meter>`` elements. Parts that change while a
page is open are "regions" (an element with ``data-region``); the adapter sends a
region's new markup over Server-Sent Events and ``live.js`` swaps it in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from nearestd.core.devices import Record
from nearestd.core.floorplan import (
    LOOKS,
    STATES,
    Atlas,
    Mark,
    attr,
    display_state,
    floor_svg,
    legend_svg,
    mark_svg,
    text,
)
from nearestd.core.model import Zone
from nearestd.core.quarantine import Quarantined

KINDS = ("printer", "scanner")
# Quarantined devices are never placed: the sites table counts them apart, below it.
PLACED_STATES = tuple(s for s in STATES if s != "quarantined")
# Rows of the unlocated list at most, so the page stays light; nearestctl devices lists all.
LIST_MAX = 500


@dataclass(frozen=True, slots=True)
class Answer:
    """One device a lookup would answer, with its cost split."""

    record: Record
    distance: float
    floor_penalty: float
    building_penalty: float

    @property
    def cost(self) -> float:
        """Return the whole cost the ranking used."""
        return self.distance + self.floor_penalty + self.building_penalty


def floor_url(site: str, building: str, level: int) -> str:
    """Return the bookmarkable address of a floor."""
    return f"/floors/{quote(site, safe='')}/{quote(building, safe='')}/{level}"


def device_link(site: str, building: str, level: int) -> Callable[[str], str]:
    """Return the function giving a device's panel address on a floor."""
    base = floor_url(site, building, level)
    return lambda device_id: f"{base}?device={quote(device_id, safe='')}#panel"


def page(title: str, body: str, events: str | None, version: str, form: str = "") -> str:
    """Return a whole page around ``body``: header, navigation and the lookup box."""
    live = f' data-events="{attr(events)}" data-version="{attr(version)}"' if events else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{text(title)} - nearestd</title>"
        '<link rel="stylesheet" href="/static/web.css">'
        '<script src="/static/live.js" defer></script></head>'
        f"<body{live}><header><nav>"
        '<a href="/">Sites</a> <a href="/devices">Unlocated and quarantined</a></nav>'
        f"{form or lookup_form()}"
        '<span id="live" class="live" data-live="off">live: off</span></header>'
        f"<main>{body}</main></body></html>"
    )


def lookup_form(ip: str = "", kind: str = "printer", k: int = 3) -> str:
    """Return the lookup box: an address, a kind and how many answers."""
    options = "".join(
        f'<option value="{v}"{" selected" if v == kind else ""}>{v}</option>' for v in KINDS
    )
    return (
        '<form class="lookup" action="/locate" method="get" role="search">'
        '<label>Address <input name="ip" id="lookup-ip" required maxlength="64" '
        f'placeholder="10.20.30.40" value="{attr(ip)}"></label> '
        f'<label>Kind <select name="kind" id="lookup-kind">{options}</select></label> '
        f'<label>Answers <input name="k" id="lookup-k" type="number" min="1" max="20" value="{k}">'
        '</label> <button type="submit" id="lookup-go">Look up</button></form>'
    )


def _counts_row(counts: Mapping[str, int]) -> str:
    cells = "".join(f'<td data-count="{s}">{counts.get(s, 0)}</td>' for s in PLACED_STATES)
    return f"{cells}<td>{sum(counts.values())}</td>"


def _counts_head() -> str:
    return "".join(f"<th>{text(s)}</th>" for s in PLACED_STATES) + "<th>all</th>"


def summary(atlas: Atlas, records: Iterable[Record], quarantined: Iterable[Quarantined]) -> str:
    """Return the sites table: each building's floors and devices counted by state."""
    by_floor: dict[tuple[str, str, int], Counter[str]] = {}
    unlocated = 0
    for r in records:
        p = r.placement
        if p is None:
            unlocated += 1
            continue
        by_floor.setdefault((p.site, p.building, p.level), Counter())[display_state(r.device)] += 1
    n_quarantined = sum(1 for _ in quarantined)
    rows = []
    for (site, building), levels in atlas.levels.items():
        total: Counter[str] = Counter()
        links = []
        for level in levels:
            c = by_floor.get((site, building, level), Counter())
            total.update(c)
            links.append(
                f'<a href="{attr(floor_url(site, building, level))}" data-floor="{level}">'
                f"level {level}</a> ({sum(c.values())})"
            )
        rows.append(
            f'<tr data-site="{attr(site)}" data-building="{attr(building)}">'
            f"<td>{text(site)}</td><td>{text(building)}</td><td>{', '.join(links)}</td>"
            f"{_counts_row(total)}</tr>"
        )
    return (
        '<section data-region="summary" id="summary"><table class="counts">'
        f"<thead><tr><th>site</th><th>building</th><th>floors (devices)</th>{_counts_head()}"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f'<p><a href="/devices">{unlocated} unlocated, {n_quarantined} quarantined</a></p>'
        "</section>"
    )


def index_page(
    atlas: Atlas,
    records: Iterable[Record],
    quarantined: Iterable[Quarantined],
    version: str,
) -> str:
    """Return ``/``: every site and building with counts by state."""
    body = "<h1>Sites and buildings</h1>" + summary(atlas, records, quarantined)
    return page("Sites", body, "/events/", version)


def floor_counts(marks: Sequence[Mark]) -> str:
    """Return the region counting a floor's devices by state."""
    c = Counter(m.state for m in marks)
    items = "".join(
        f'<li data-count="{s}">{text(LOOKS[s].label.split(":")[0])}: {c.get(s, 0)}</li>'
        for s in STATES
    )
    return f'<ul class="floor-counts" data-region="counts" id="counts">{items}</ul>'


def floor_nav(atlas: Atlas, site: str, building: str, level: int) -> str:
    """Return links to the other floors of the building."""
    levels = atlas.levels.get((site, building), [])
    links = []
    for lv in levels:
        if lv == level:
            links.append(f'<strong aria-current="page">level {lv}</strong>')
        else:
            links.append(f'<a href="{attr(floor_url(site, building, lv))}">level {lv}</a>')
    return f'<nav class="floors">{" ".join(links)}</nav>'


def panel(record: Record | None, device_id: str | None) -> str:
    """Return the device panel region (empty when no device is chosen)."""
    if device_id is None:
        return '<aside data-region="panel" id="panel" class="panel" hidden></aside>'
    if record is None:
        return (
            '<aside data-region="panel" id="panel" class="panel">'
            f"<p>No device {text(device_id)} is known now.</p></aside>"
        )
    d = record.device
    p = record.placement
    state = display_state(d)
    rows = [
        ("kind", text(d.kind)),
        ("make and model", text(d.make_model or "-")),
        ("URI", f"<code>{text(d.uri)}</code>"),
        (
            "endpoints",
            "<ul>" + "".join(f"<li><code>{text(e.uri)}</code></li>" for e in d.endpoints) + "</ul>"
            if d.endpoints
            else "-",
        ),
        ("state", f'<span data-state="{state}">{text(LOOKS[state].label)}</span>'),
        ("state reasons", text(", ".join(d.state_reasons) or "none")),
        ("accepting jobs", "yes" if d.accepting_jobs else "no"),
        ("source", text(d.source)),
    ]
    if p is None:
        rows.append(("placed", "unlocated: no rule places it"))
    else:
        where = f"{p.site} / {p.building} / level {p.level} / {p.zone or 'no zone'}"
        rows.append(("placed by", text(p.method)))
        rows.append(("where", text(where)))
        rows.append(("position", f"{p.lat:.7f}, {p.lon:.7f}"))
    if d.supplies:
        bars = []
        for s in d.supplies:
            level = "unknown" if s.level is None else f"{s.level}%"
            meter = (
                f'<meter min="0" max="100" low="15" high="40" optimum="100" value="{s.level}">'
                f"{text(level)}</meter>"
                if s.level is not None
                else ""
            )
            bars.append(
                f'<li data-supply="{attr(s.name)}">{text(s.name)} ({text(s.type)}) '
                f"{meter} {text(level)}</li>"
            )
        rows.append(("supplies", f'<ul class="supplies">{"".join(bars)}</ul>'))
    else:
        rows.append(("supplies", "none reported"))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f'<aside data-region="panel" id="panel" class="panel" data-panel="{attr(d.id)}">'
        f"<h2>{text(d.name)}</h2><p><code>{text(d.id)}</code></p>"
        f"<table>{table}</table></aside>"
    )


def floor_page(
    atlas: Atlas,
    site: str,
    building: str,
    level: int,
    marks: Sequence[Mark],
    selected: Record | None,
    device_id: str | None,
    version: str,
) -> str:
    """Return ``/floors/SITE/BUILDING/LEVEL``: the drawing, the counts, the legend, a panel."""
    link = device_link(site, building, level)
    svg = floor_svg(atlas, site, building, level, marks, link=link, selected=device_id)
    events = floor_url(site, building, level)
    if device_id is not None:
        events += f"?device={quote(device_id, safe='')}"
    body = (
        f"<h1>{text(site)} / {text(building)} / level {level}</h1>"
        f"{floor_nav(atlas, site, building, level)}"
        f'<div class="floor-view"><figure class="plan">{svg}</figure>'
        f'<div class="side">{floor_counts(marks)}{legend_svg()}'
        f"{panel(selected, device_id)}</div></div>"
    )
    return page(f"{site} / {building} / level {level}", body, "/events" + events, version)


def device_rows(records: Iterable[Record]) -> str:
    """Return table rows for the unlocated list."""
    rows = []
    for r in records:
        d = r.device
        rows.append(
            f'<tr data-device="{attr(d.id)}"><td><code>{text(d.id)}</code></td>'
            f"<td>{text(d.name)}</td><td>{text(d.kind)}</td><td>{text(display_state(d))}</td>"
            f"<td>{text(d.source)}</td><td>{text(', '.join(d.addresses) or '-')}</td>"
            f"<td>{text(d.note or d.location_text or '-')}</td></tr>"
        )
    return "".join(rows)


def lists(records: Iterable[Record], quarantined: Iterable[Quarantined]) -> tuple[str, str]:
    """Return the unlocated and the quarantined regions."""
    unlocated = sorted(
        (r for r in records if r.placement is None), key=lambda r: (r.device.kind, r.device.id)
    )
    head = (
        "<thead><tr><th>id</th><th>name</th><th>kind</th><th>state</th><th>source</th>"
        "<th>addresses</th><th>note or location</th></tr></thead>"
    )
    more = (
        f"<p>and {len(unlocated) - LIST_MAX} more: <code>nearestctl devices</code> lists all.</p>"
        if len(unlocated) > LIST_MAX
        else ""
    )
    u = (
        '<section data-region="unlocated" id="unlocated">'
        f"<h2>Unlocated ({len(unlocated)})</h2>"
        "<p>No rule places these: give them a pin, a note or location naming a zone, or "
        "an address in a zone's subnets.</p>"
        f'<table class="list">{head}<tbody>{device_rows(unlocated[:LIST_MAX])}</tbody></table>'
        f"{more}</section>"
    )
    held = sorted(quarantined, key=lambda q: (q.device.id, q.first_seen))
    qrows = "".join(
        f'<tr data-quarantined="{attr(q.device.id)}"><td><code>{text(q.device.id)}</code></td>'
        f"<td>{text(q.device.name)}</td><td>{text(q.device.kind)}</td>"
        f"<td>{text(', '.join(q.device.addresses) or '-')}</td><td>{text(q.reason)}</td>"
        f"<td>{text(_when(q.first_seen))}</td></tr>"
        for q in held
    )
    qs = (
        '<section data-region="quarantined" id="quarantined">'
        f"<h2>Quarantined ({len(held)})</h2>"
        "<p>These claim a pinned device's identity from the wrong place; never answered.</p>"
        '<table class="list"><thead><tr><th>id</th><th>name</th><th>kind</th><th>addresses</th>'
        f"<th>reason</th><th>first seen (UTC)</th></tr></thead><tbody>{qrows}</tbody></table>"
        "</section>"
    )
    return u, qs


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def lists_page(records: Iterable[Record], quarantined: Iterable[Quarantined], version: str) -> str:
    """Return ``/devices``: the unlocated and the quarantined devices."""
    u, q = lists(records, quarantined)
    return page(
        "Unlocated and quarantined",
        f"<h1>Devices to look at</h1>{u}{q}",
        "/events/devices",
        version,
    )


def locate_page(
    atlas: Atlas,
    ip: str,
    kind: str,
    k: int,
    zone: Zone | None,
    answers: Sequence[Answer],
    marks: Sequence[Mark],
    error: str | None,
    version: str,
) -> str:
    """Return ``/locate``: the address's zone highlighted on its floor, the answers in order."""
    form = lookup_form(ip, kind, k)
    if zone is None:
        body = f'<h1>Lookup</h1><p class="error" id="lookup-error">{text(error or "")}</p>'
        return page("Lookup", body, None, version, form)
    rows = []
    for i, a in enumerate(answers, 1):
        d = a.record.device
        p = a.record.placement
        where = f"{p.site} / {p.building} / level {p.level} / {p.zone or '-'}" if p else "-"
        href = device_link(p.site, p.building, p.level)(d.id) if p else "#"
        rows.append(
            f'<tr data-answer="{attr(d.id)}"><td>{i}</td>'
            f'<td><a href="{attr(href)}">{text(d.name)}</a></td>'
            f"<td>{text(display_state(d))}</td><td>{text(where)}</td>"
            f"<td>{a.distance:.1f}</td><td>{a.floor_penalty:.1f}</td>"
            f"<td>{a.building_penalty:.1f}</td><td>{a.cost:.1f}</td></tr>"
        )
    table = (
        '<table class="answers"><thead><tr><th>#</th><th>device</th><th>state</th>'
        "<th>where</th><th>distance m</th><th>floor penalty m</th><th>building penalty m</th>"
        f"<th>cost m</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>Nothing would be answered: no available device of this kind is reachable.</p>"
    )
    svg = floor_svg(
        atlas,
        zone.site,
        zone.building,
        zone.level,
        marks,
        here=zone.id,
        link=device_link(zone.site, zone.building, zone.level),
    )
    body = (
        f"<h1>Lookup: {text(ip)}</h1>"
        f'<p id="lookup-where" data-zone="{attr(zone.id)}">{text(ip)} is in '
        f"<strong>{text(zone.name)}</strong> ({text(zone.id)}), {text(zone.site)} / "
        f"{text(zone.building)} / level {zone.level}. A {text(kind)} query would be answered, "
        "in this order:</p>"
        f"{table}"
        f'<div class="floor-view"><figure class="plan">{svg}</figure>'
        f'<div class="side">{legend_svg()}</div></div>'
    )
    events = "/events" + floor_url(zone.site, zone.building, zone.level)
    return page(f"Lookup {ip}", body, events, version, form)


def floor_regions(
    marks: Sequence[Mark],
    atlas: Atlas,
    site: str,
    building: str,
    level: int,
    selected: Record | None,
    device_id: str | None,
) -> dict[str, str]:
    """Return a floor page's live parts: each mark by its key, the counts, the panel."""
    frame = atlas.frame(site, building)
    link = device_link(site, building, level)
    out = {
        f"svg:{m.key}": mark_svg(m, frame, link, m.device.id == device_id and not m.quarantined)
        for m in marks
    }
    out["html:counts"] = floor_counts(marks)
    if device_id is not None:
        out["html:panel"] = panel(selected, device_id)
    return out
