"""Query to answer: locate the client, rank the devices, shape the reply maps."""

from __future__ import annotations

from typing import Any

from nearest_wire import Need
from nearestd.core.census import shown_state
from nearestd.core.devices import DeviceTable, Record
from nearestd.core.index import Hit, Ranking
from nearestd.core.model import Zone


def device_view(record: Record, hit: Hit | None = None) -> dict[str, Any]:
    """Return a device as the wire protocol shows it."""
    d = record.device
    p = record.placement
    out: dict[str, Any] = {
        "id": d.id,
        "name": d.name,
        "kind": str(d.kind),
        "uri": d.uri,
        "make_model": d.make_model,
        "site": p.site if p else None,
        "building": p.building if p else None,
        "level": p.level if p else None,
        "zone": p.zone if p else None,
        "capabilities": d.capabilities.to_wire(),
        "state": shown_state(d),
        "stale": d.stale,
    }
    if d.state_reasons:
        out["state_reasons"] = list(d.state_reasons)
    if not d.accepting_jobs:
        out["accepting_jobs"] = False
    if d.supplies:
        out["supplies"] = [s.to_wire() for s in d.supplies]
    if hit is not None:
        out["distance_m"] = round(hit.cost, 2)
    if d.origin:
        out["origin"] = d.origin
    return out


def inventory_view(record: Record) -> dict[str, Any]:
    """Return a device with everything an operator needs: placement, method, endpoints."""
    out = device_view(record)
    d = record.device
    p = record.placement
    out.update(
        {
            "source": d.source,
            "placed_by": str(p.method) if p else None,
            "located": p is not None,
            "position": {"lon": round(p.lon, 7), "lat": round(p.lat, 7)} if p else None,
            "endpoints": [e.uri for e in d.endpoints],
            "is_queue": d.is_queue,
            "last_seen": record.last_seen,
        }
    )
    return out


def rank(
    table: DeviceTable,
    zone: Zone,
    kind: str,
    need: Need,
    k: int,
    ranking: Ranking,
    visible: int = -1,
) -> list[dict[str, Any]]:
    """Return the k nearest devices' wire maps for a client in ``zone`` who sees ``visible``."""
    hits = table.index.nearest(zone, kind, need, k, ranking, visible)
    out = []
    for hit in hits:
        rec = table.get(hit.device_id)
        if rec is not None:
            out.append(device_view(rec, hit))
    return out
