"""Query to answer: locate the client, rank the devices, build the wire views."""

from __future__ import annotations

import base64
import json

from nearest_wire import Capabilities, DeviceView, Inventory, Need, Supply, Where
from nearestd.core.census import shown_state
from nearestd.core.devices import DeviceTable, Record
from nearestd.core.index import Hit
from nearestd.core.model import Zone
from nearestd.core.ranking import Ranking


def where_of(zone: Zone) -> Where:
    """Return where the wire says a client in ``zone`` is."""
    return Where(zone.site, zone.building, zone.level, zone.id, zone.name)


def device_view(record: Record, hit: Hit | None = None) -> DeviceView:
    """Return a device as the wire protocol shows it."""
    d = record.device
    p = record.placement
    c = d.capabilities
    return DeviceView(
        d.id,
        d.name,
        str(d.kind),
        d.uri,
        d.make_model,
        p.site if p else None,
        p.building if p else None,
        p.level if p else None,
        p.zone if p else None,
        Capabilities(c.color, c.duplex, c.paper_max, c.adf, c.secure),
        shown_state(d),
        d.stale,
        d.state_reasons,
        d.accepting_jobs,
        tuple(Supply(s.name, s.type, s.level) for s in d.supplies) if d.supplies else (),
        round(hit.cost, 2) if hit is not None else None,
        d.origin,
    )


def inventory_view(
    record: Record,
    visible_to: tuple[str, ...] | None = None,
    quarantined: str | None = None,
    first_seen: float | None = None,
) -> DeviceView:
    """Return a device with everything an operator needs: placement, method, endpoints."""
    d = record.device
    p = record.placement
    inventory = Inventory(
        source=d.source,
        placed_by=str(p.method) if p else None,
        located=p is not None,
        position=(round(p.lon, 7), round(p.lat, 7)) if p else None,
        endpoints=tuple(e.uri for e in d.endpoints),
        is_queue=d.is_queue,
        last_seen=record.last_seen,
        visible_to=visible_to,
        quarantined=quarantined,
        first_seen=first_seen,
    )
    return device_view(record)._replace(inventory=inventory)


def rank(
    table: DeviceTable,
    zone: Zone,
    kind: str,
    need: Need,
    k: int,
    ranking: Ranking,
    visible: int = -1,
) -> tuple[DeviceView, ...]:
    """Return the k nearest devices' views for a client in ``zone`` who sees ``visible``."""
    return views_of(table, tuple(table.index.nearest(zone, kind, need, k, ranking, visible)))


def views_of(table: DeviceTable, hits: tuple[Hit, ...]) -> tuple[DeviceView, ...]:
    """Return the views of ranked hits as the table holds the devices now (state, supplies)."""
    out = []
    get = table.get
    for hit in hits:
        rec = get(hit.device_id)
        if rec is not None:
            out.append(device_view(rec, hit))
    return tuple(out)


# A devices page is ordered by this key: unlocated first (what an operator must fix), then
# site, kind and id; quarantined entries after a table device of the same id, by addresses.
PageKey = tuple[bool, str, str, str, int, str]


def page_key(record: Record, held_addresses: tuple[str, ...] | None = None) -> PageKey:
    """Return a record's place in the ``devices`` order (``held_addresses``: quarantined)."""
    p = record.placement
    d = record.device
    if held_addresses is not None:
        return (False, "", str(d.kind), d.id, 1, ",".join(held_addresses))
    return (p is not None, p.site if p else "", str(d.kind), d.id, 0, "")


def encode_cursor(key: PageKey) -> str:
    """Return the opaque cursor that continues a listing after ``key``."""
    raw = json.dumps(key, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> PageKey:
    """Return the key a cursor continues after, or raise ValueError."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        obj = json.loads(raw)
    except (ValueError, UnicodeError):
        raise ValueError("cursor: not a cursor from a devices reply") from None
    types = (bool, str, str, str, int, str)
    if (
        not isinstance(obj, list)
        or len(obj) != len(types)
        or not all(type(v) is t for v, t in zip(obj, types, strict=True))
    ):
        raise ValueError("cursor: not a cursor from a devices reply")
    return (obj[0], obj[1], obj[2], obj[3], obj[4], obj[5])
