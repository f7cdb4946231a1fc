"""The device table: devices in, placements decided, the spatial index kept in step.

Placement follows the contract's order: a static device's own position; a site-map
pin (uuid, instance name, host, then ip); the device's reported geo position; its
DNS-SD ``note``, then its IPP ``printer-location``, matched against zone names and
aliases; the zone whose subnets hold one of the device's addresses; else unlocated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from itertools import islice

from nearestd.core.index import Entry, SpatialIndex, caps_mask
from nearestd.core.model import (
    Device,
    DeviceState,
    Placement,
    PlacementMethod,
    Zone,
    compile_constructor,
)
from nearestd.core.quarantine import QUARANTINE_MAX, Quarantined, find_pin, quarantine_reason
from nearestd.core.sitemap import SiteMap

# The source of devices learned from other daemons over MQTT (core/federation.py).
FEDERATED = "mqtt"


@dataclass(frozen=True, slots=True)
class Record:
    """A device, its placement and when it was last heard of."""

    device: Device
    placement: Placement | None
    last_seen: float


@dataclass(frozen=True, slots=True)
class Carried:
    """What a table built for a new site map takes over from the table in use.

    Taken on the event loop (references only, nothing copied deeply) and read in a
    worker thread, which never touches the table in use.
    """

    records: tuple[Record, ...]
    held: tuple[Quarantined, ...]
    # The devices the old site map declared: they come back from the new map as declared.
    old_static: Mapping[str, Placement]
    quarantined_total: int
    quarantine_dropped: int


def place(device: Device, sitemap: SiteMap, static: Placement | None = None) -> Placement | None:
    """Decide where a device is, by the contract's rules in order."""
    if static is not None:
        return static
    if device.origin_placement is not None:
        return place_federated(device.origin_placement, sitemap)
    pin = find_pin(device, sitemap)
    if pin is not None:
        return pin.placement
    if device.geo is not None:
        geo = _place_geo(device.geo, sitemap, (device.note, device.location_text))
        if geo is not None:
            return geo
    for text, method in (
        (device.note, PlacementMethod.NOTE),
        (device.location_text, PlacementMethod.LOCATION),
    ):
        zone = sitemap.zone_for_text(text)
        if zone is not None:
            return sitemap.placement_in_zone(zone, method)
    for addr in device.addresses:
        try:
            zone = sitemap.zone_for_ip(addr.split("%", 1)[0])
        except ValueError:
            continue
        if zone is not None:
            return sitemap.placement_in_zone(zone, PlacementMethod.SUBNET)
    return None


def _place_geo(
    geo: tuple[float, float], sitemap: SiteMap, texts: tuple[str | None, ...] = ()
) -> Placement | None:
    """Place a device at a reported lat/lon when it falls inside a zone.

    Floors share a footprint, and a geo: URI has no floor: of the zones covering the
    point, the one the device's note or printer-location names wins, else the lowest
    floor at or above ground, else the highest below it.
    """
    import shapely

    lat, lon = geo
    covering: list[tuple[Zone, float, float]] = []
    for zone in sitemap.zones.values():
        x, y = sitemap.projections[zone.site].forward(lon, lat)
        if zone.polygon.covers(shapely.points(x, y)):
            covering.append((zone, x, y))
    if not covering:
        return None
    named = {z.id for z in map(sitemap.zone_for_text, texts) if z is not None}
    zone, x, y = min(
        covering,
        key=lambda c: (c[0].id not in named, c[0].level < 0, abs(c[0].level), c[0].id),
    )
    return Placement(
        zone.site, zone.building, zone.level, zone.id, x, y, lon, lat, PlacementMethod.GEO
    )


def restriction_of(device: Device, placement: Placement | None, sitemap: SiteMap) -> int:
    """Return the visibility bits a client must hold to see a device (0: public)."""
    policy = sitemap.visibility
    if not policy.active:
        return 0
    own = policy.device_restrict.get(device.id, 0) if device.source == "static" else 0
    if device.source != "static":
        pin = find_pin(device, sitemap)
        own = pin.restrict if pin is not None else 0
    return policy.restriction(placement.zone if placement else None, own)


def place_federated(
    where: tuple[str, str, int, str | None, float, float], sitemap: SiteMap
) -> Placement | None:
    """Place a federated device where its origin placed it, if this map knows the site."""
    site, building, level, zone, lon, lat = where
    proj = sitemap.projections.get(site)
    if proj is None:
        return None
    x, y = proj.forward(lon, lat)
    return Placement(site, building, level, zone, x, y, lon, lat, PlacementMethod.FEDERATED)


def entry_for(device: Device, placement: Placement, restrict: int = 0) -> Entry:
    """Return the index entry of a placed device."""
    caps = device.capabilities
    return _new_entry(
        device.id,
        str(device.kind),
        placement.site,
        placement.building,
        placement.level,
        placement.x,
        placement.y,
        caps_mask(caps.color, caps.duplex, caps.adf, caps.secure),
        caps.paper_rank,
        device.available,
        restrict,
        tie_rank(device, placement),
    )


_new_entry = compile_constructor(Entry, *(f.name for f in fields(Entry)))
_new_record = compile_constructor(Record, "device", "placement", "last_seen")


_IDLE = DeviceState.IDLE


def tie_rank(device: Device, placement: Placement) -> int:
    """Return a device's tie-break rank at equal cost: trust first, then state.

    A static device or one placed by a site-map pin ranks before one that placed
    itself by what it announced (note, location, subnet, geo) or came from another
    instance, whatever their states; within each, idle before busy before unavailable.
    """
    trusted = device.source == "static" or placement.method is PlacementMethod.PIN
    return (0 if trusted else 3) + state_rank(device)


def state_rank(device: Device) -> int:
    """Return the tie-break rank of a device's state: idle first, unavailable last."""
    if not device.available:
        return 2
    return 0 if device.state is _IDLE else 1


def reach_of(device: Device) -> tuple[object, ...]:
    """Return what decides how a device is polled (``state.poll_target`` reads only these)."""
    return (
        device.kind,
        device.source,
        device.uri,
        device.endpoints,
        device.addresses,
        device.is_queue,
    )


class DeviceTable:
    """Every known device with its placement; the index holds the answerable ones."""

    def __init__(
        self,
        sitemap: SiteMap,
        carried: Carried | None = None,
        declared: Callable[[Device], Device] | None = None,
    ) -> None:
        """Build the table of a site map's static devices, plus what ``carried`` brings.

        ``declared`` adjusts each static device before it is indexed (the live state a
        poll found, laid over it again after a reload).
        """
        self.sitemap = sitemap
        self.index = SpatialIndex(sitemap.projections)
        # Bumped by every change; ``rank_generation`` only by those that can change an
        # answer's devices or order (the index entry: place, kind, capabilities,
        # availability, visibility, tie-break), so a supply level or a state reason leaves
        # cached answers valid.
        self.generation = 0
        # Bumped only by changes to this daemon's own devices (not federated ones): what
        # the poller, the published inventory and the snapshot follow, so a burst of
        # foreign records does not make each of them pass over the whole table again.
        self.local_generation = 0
        # Bumped only when one of this daemon's own devices comes, goes or changes how it is
        # reached (URI, endpoints, addresses, kind, source): what the poller's target list
        # follows, so a poll result (a new state or supply level) does not make it pass over
        # the whole table again.
        self.reach_generation = 0
        self.rank_generation = 0
        # Per site, the same count: a client who may only be answered from its own site
        # keeps its cached answers while devices of other sites come and go.
        self.rank_by_site: dict[str, int] = {}
        self.rank_epoch = 0
        # Rogue claims of pinned identities, by (device id, addresses); bounded, oldest out.
        self.quarantine: dict[tuple[str, tuple[str, ...]], Quarantined] = {}
        self.quarantined_total = 0
        self.quarantine_dropped = 0
        statics = sitemap.static_devices
        self._static: dict[str, Placement] = {d.id: place for d, place in statics}
        new_record = _new_record
        records: dict[str, Record] = (
            {d.id: new_record(d, place, 0.0) for d, place in statics}
            if declared is None
            else {d.id: new_record(declared(d), place, 0.0) for d, place in statics}
        )
        if carried is not None:
            self._carry(carried, records)
        self._records = records
        # Ids of the records whose device is not declared by a site map (source other than
        # 'static'), in insertion order: upkeep that only concerns them need not scan all.
        # They are the carried ones, which _carry adds after the site map's.
        self._dynamic: dict[str, None] = dict.fromkeys(islice(records, len(statics), None))
        restricted = sitemap.visibility.active
        self.index.bulk_load(
            [
                entry_for(
                    r.device,
                    r.placement,
                    restriction_of(r.device, r.placement, sitemap) if restricted else 0,
                )
                for r in records.values()
                if r.placement is not None and not r.device.is_queue
            ]
        )

    def _carry(self, carried: Carried, records: dict[str, Record]) -> None:
        """Place the old table's other devices and quarantine again by the new map's pins."""
        sitemap = self.sitemap
        self.quarantined_total = carried.quarantined_total
        self.quarantine_dropped = carried.quarantine_dropped
        for rec in carried.records:
            if rec.device.id in carried.old_static or rec.device.id in records:
                continue
            reason = quarantine_reason(rec.device, sitemap)
            if reason is not None:
                self.quarantine[(rec.device.id, rec.device.addresses)] = Quarantined(
                    rec.device, reason, rec.last_seen, rec.last_seen
                )
                continue
            records[rec.device.id] = Record(rec.device, place(rec.device, sitemap), rec.last_seen)
        for q in carried.held:
            reason = quarantine_reason(q.device, sitemap)
            if reason is not None:
                self.quarantine[(q.device.id, q.device.addresses)] = replace(q, reason=reason)
            elif q.device.id not in records:
                records[q.device.id] = Record(q.device, place(q.device, sitemap), q.last_seen)

    def carried(self) -> Carried:
        """Return what a table for a new site map takes over from this one (cheap)."""
        records = self._records
        return Carried(
            tuple(records[device_id] for device_id in self._dynamic),
            tuple(self.quarantine.values()),
            self._static,
            self.quarantined_total,
            self.quarantine_dropped,
        )

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records.values())

    def get(self, device_id: str) -> Record | None:
        """Return a device's record."""
        return self._records.get(device_id)

    def records(self) -> Iterable[Record]:
        """Yield every record."""
        return self._records.values()

    def dynamic_records(self) -> list[Record]:
        """Return the records of devices not declared by a site map (source not 'static')."""
        records = self._records
        return [records[device_id] for device_id in self._dynamic]

    def _note_source(self, device: Device) -> None:
        if device.source != "static":
            self._dynamic[device.id] = None
        else:
            self._dynamic.pop(device.id, None)

    def upsert(self, device: Device, now: float) -> str:
        """Add or update a device; return 'added', 'updated', 'unchanged' or 'quarantined'.

        'quarantined' is returned once, when a rogue claim is first seen; the device
        already known under that id (if any) is left as it was.
        """
        old = self._records.get(device.id)
        static = self._static.get(device.id)
        if old is not None and old.device == device:
            self._records[device.id] = replace(old, last_seen=now)
            return "unchanged"
        if static is None:
            reason = quarantine_reason(device, self.sitemap)
            if reason is not None:
                return self._quarantine(device, reason, now)
        placement = place(device, self.sitemap, static)
        self._records[device.id] = Record(device, placement, now)
        self._note_source(device)
        self._reindex(device, placement)
        self.generation += 1
        if device.source != FEDERATED or (old is not None and old.device.source != FEDERATED):
            self.local_generation += 1
            if old is None or reach_of(old.device) != reach_of(device):
                self.reach_generation += 1
        return "added" if old is None else "updated"

    def _quarantine(self, device: Device, reason: str, now: float) -> str:
        key = (device.id, device.addresses)
        held = self.quarantine.get(key)
        if held is not None:
            self.quarantine[key] = Quarantined(device, reason, held.first_seen, now)
            return "unchanged"
        if len(self.quarantine) >= QUARANTINE_MAX:
            del self.quarantine[next(iter(self.quarantine))]
            self.quarantine_dropped += 1
        self.quarantine[key] = Quarantined(device, reason, now, now)
        self.quarantined_total += 1
        return "quarantined"

    def touch(self, device_id: str, now: float) -> None:
        """Note that a device was heard from."""
        rec = self._records.get(device_id)
        if rec is not None:
            self._records[device_id] = replace(rec, last_seen=now)

    def remove(self, device_id: str) -> bool:
        """Remove a device; static devices stay. Return whether anything changed."""
        held = [k for k in self.quarantine if k[0] == device_id]
        for k in held:
            del self.quarantine[k]
        if device_id in self._static or device_id not in self._records:
            return bool(held)
        if self._records.pop(device_id).device.source != FEDERATED:
            self.local_generation += 1
            self.reach_generation += 1
        self._dynamic.pop(device_id, None)
        before = self.index.get(device_id)
        if before is not None:
            self.index.remove(device_id)
            self._ranked(before.site)
        self.generation += 1
        return True

    def expire(self, now: float, expire_after: float, sources: Iterable[str]) -> list[str]:
        """Remove devices of the given sources not heard of for ``expire_after`` seconds."""
        wanted = set(sources)
        gone = [
            r.device.id
            for r in self._records.values()
            if r.device.source in wanted
            and r.device.id not in self._static
            and now - r.last_seen >= expire_after
        ]
        for device_id in gone:
            self.remove(device_id)
        for key, held in list(self.quarantine.items()):
            if held.device.source in wanted and now - held.last_seen >= expire_after:
                del self.quarantine[key]
        return gone

    def set_sitemap(self, sitemap: SiteMap) -> None:
        """Replace the site map: static devices follow it, others are placed again."""
        fresh = DeviceTable(sitemap, self.carried())
        fresh.continue_from(self)
        fresh.rank_generation = self.rank_generation + 1
        fresh.rank_epoch = self.rank_epoch + 1
        vars(self).update(vars(fresh))

    def continue_from(self, old: DeviceTable) -> None:
        """Take over ``old``'s change counters, one step on: this table replaces it.

        The poller, the published inventory, the snapshot and the DNS-SD cache compare
        these counters with the last they saw; a new table counting from zero could
        match one of those by chance and its changes would go unnoticed.
        """
        self.generation = old.generation + 1
        self.local_generation = old.local_generation + 1
        self.reach_generation = old.reach_generation + 1

    def _reindex(self, device: Device, placement: Placement | None) -> None:
        before = self.index.get(device.id)
        if placement is None or device.is_queue:
            if before is not None:
                self.index.remove(device.id)
                self._ranked(before.site)
            return
        entry = entry_for(device, placement, restriction_of(device, placement, self.sitemap))
        if entry != before:
            self.index.upsert(entry)
            self._ranked(entry.site)
            if before is not None and before.site != entry.site:
                self._ranked(before.site)

    def _ranked(self, site: str) -> None:
        """Note a change that can alter the answers of clients of ``site`` (and of all sites)."""
        self.rank_generation += 1
        self.rank_by_site[site] = self.rank_by_site.get(site, 0) + 1

    def rank_version(self, site: str | None) -> tuple[int, int]:
        """Return what a cached answer for a client of ``site`` (None: any site) is valid for."""
        if site is None:
            return (self.rank_epoch, self.rank_generation)
        return (self.rank_epoch, self.rank_by_site.get(site, 0))
