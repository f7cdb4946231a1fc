"""The one stateful object: requests in, replies out; discovery events; ticks.

Everything here is synchronous and takes ``now``; adapters own the I/O and call in.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nearest_wire import (
    DevicesReply,
    DevicesRequest,
    EraseReply,
    ErrorCode,
    ErrorReply,
    ExportEntry,
    ExportReply,
    LocateReply,
    LocateRequest,
    MapReply,
    NearestReply,
    NearestRequest,
    PingReply,
    PingRequest,
    PrivacyRequest,
    ReloadReply,
    ReloadRequest,
    StatsReply,
    StatsRequest,
    Where,
    WireError,
    decode_payload,
    error_reply,
    parse_request,
)
from nearest_wire import Reply as WireReply
from nearest_wire.fast import fast_nearest
from nearest_wire.schema import ADMIN_OPS, MapRequest, Need, request_id
from nearestd import __version__
from nearestd.config import Config
from nearestd.core.census import Census, census
from nearestd.core.devices import Carried, DeviceTable, Record, restriction_of
from nearestd.core.floorplan import Atlas, floor_marks, floor_svg
from nearestd.core.histogram import Latencies
from nearestd.core.index import Hit
from nearestd.core.limits import RateLimiter, SpikeWatch
from nearestd.core.model import Device, DeviceKind, DeviceState, Zone
from nearestd.core.privacy import LocationLog
from nearestd.core.ranking import Ranking
from nearestd.core.resolve import (
    PageKey,
    decode_cursor,
    encode_cursor,
    inventory_view,
    page_key,
    views_of,
    where_of,
)
from nearestd.core.sitemap import SiteMap
from nearestd.core.state import Live, overlay
from nearestd.logs import client_label, set_ip_mode

LOCAL_HOST = "127.0.0.1"
LOG = logging.getLogger("nearestd.security")
# Query results that the security counters group, by what they say about the asker.
SECURITY_RESULTS = {
    "forbidden": "requests_refused",
    "rate-limited": "requests_rate_limited",
    "bad-request": "requests_malformed",
    "unsupported-version": "requests_malformed",
    "too-large": "requests_malformed",
}
CACHE_MAX = 8192
Reply = dict[str, Any]
# What a request gets: its reply, or (``reload``) the reply once the daemon has reloaded.
Answer = Reply | Awaitable[Reply]
# Figures of the daemon's edges by section name, read when ``stats`` is asked.
Sections = Callable[[], Mapping[str, Mapping[str, Any]]]
# Starts (or joins) a reload of config and site maps; resolves to the problems (none: switched).
Reload = Callable[[], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asking: the interface, its address (None on Unix sockets) and its rights."""

    interface: str
    ip: str | None
    trusted: bool
    allowed: bool = True
    admin: bool = False
    # The transport hides the asker (MQTT): requests must name client_ip or zone.
    anonymous: bool = False


UNIX_PEER = Peer("unix", None, trusted=True)
ADMIN_PEER = Peer("admin", None, trusted=True, admin=True)


@dataclass(slots=True)
class Stats:
    """Counters the metrics adapter and ``stats`` read."""

    queries: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    started: float = 0.0
    latency: Latencies = field(default_factory=Latencies)


@dataclass(frozen=True, slots=True)
class Carry:
    """What the service hands to a reload's worker thread: taken on the loop, cheaply."""

    table: Carried
    live: dict[str, Live]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A new config with its site map, device table and warmed index, ready to swap in."""

    cfg: Config
    sitemap: SiteMap
    table: DeviceTable
    ranking: Ranking
    carry: Carry


def prepare(cfg: Config, sitemap: SiteMap, carry: Carry) -> Prepared:
    """Build the table and neighbour lists of a new site map (thread-safe: reads ``carry`` only)."""
    live = carry.live

    def declared(device: Device) -> Device:
        found = live.get(device.id)
        return device if found is None else overlay(device, found)

    table = DeviceTable(sitemap, carry.table, declared)
    ranking = cfg.ranking
    table.index.warm(sitemap.zones.values(), tuple(DeviceKind), ranking)
    return Prepared(cfg, sitemap, table, ranking, carry)


class Service:
    """Answers requests from the device table and the site map."""

    def __init__(
        self,
        cfg: Config,
        sitemap: SiteMap,
        now: float,
        key_source: Callable[[], bytes],
        sections: Sections | None = None,
        reload: Reload | None = None,
    ) -> None:
        self.cfg = cfg
        self.sitemap = sitemap
        self.table = DeviceTable(sitemap)
        self.ranking = cfg.ranking
        self._key_source = key_source
        self.log = LocationLog(cfg.privacy.retention, cfg.privacy.max_entries, key_source(), now)
        # The inventory in `devices` order, for the generation of the table it was sorted at.
        self._order: tuple[DeviceTable, int, list[PageKey], list[str]] | None = None
        self.stats = Stats(started=now)
        self._cache: OrderedDict[
            tuple[str, str, Any, int, int], tuple[tuple[int, int], tuple[Hit, ...]]
        ] = OrderedDict()
        self._wheres: dict[str, Where] = {}
        self._sections = sections
        self._reload = reload
        # What the poller last found per device; laid over every update from discovery.
        self.live: dict[str, Live] = {}
        d = cfg.daemon
        self.limiter = RateLimiter(d.rate, d.burst, d.rate_clients)
        self.spikes = SpikeWatch(cfg.privacy.spike_per_minute)
        self._census: Census | None = None
        self._census_key = (-1, -1)
        # Neighbour lists are built per zone on its first query (well under a millisecond
        # each): building all of them here would delay start-up on large maps.

    def warm(self) -> None:
        """Prepare every zone's neighbour lists now (for benchmarks)."""
        self.table.index.warm(self.sitemap.zones.values(), tuple(DeviceKind), self.ranking)

    def warming(self) -> Iterator[None]:
        """Prepare every zone's neighbour lists a step at a time (see ``SpatialIndex.warming``)."""
        return self.table.index.warming(
            list(self.sitemap.zones.values()), tuple(DeviceKind), self.ranking
        )

    # ---- requests ----------------------------------------------------------------------
    def handle_payload(self, payload: bytes, peer: Peer, now: float) -> Answer:
        """Decode one frame payload and answer it (``reload``: an awaitable reply)."""
        req = fast_nearest(payload)
        if req is not None:
            # A valid nearest request, decoded by msgspec: what handle() does with it.
            try:
                if not peer.allowed:
                    raise WireError(
                        ErrorCode.FORBIDDEN, "this address may not query this daemon", req.id
                    )
                reply = self._nearest(req, peer, now)
            except WireError as exc:
                self._count(peer, "nearest", str(exc.code))
                return error_reply(exc.request_id, exc.code, exc.message)
            self._count(peer, "nearest", "ok")
            return reply.to_wire()
        try:
            obj = decode_payload(payload)
        except WireError as exc:
            self._count(peer, "invalid", str(exc.code))
            return error_reply(None, exc.code, exc.message)
        return self.handle(obj, peer, now)

    def handle(
        self, obj: dict[str, Any], peer: Peer, now: float, extra_keys: frozenset[str] = frozenset()
    ) -> Answer:
        """Answer one decoded request map; never raises for bad input (``reload``: awaitable)."""
        op = obj.get("op") if isinstance(obj.get("op"), str) else "invalid"
        op_label = op if op in _OPS else "invalid"
        try:
            if not peer.allowed:
                raise WireError(
                    ErrorCode.FORBIDDEN, "this address may not query this daemon", request_id(obj)
                )
            req = parse_request(obj, extra_keys=extra_keys)
            if req.op in ADMIN_OPS and not peer.admin:
                raise WireError(
                    ErrorCode.FORBIDDEN, f"op {req.op!r} is only served on the admin socket", req.id
                )
            reply = self._dispatch(req, peer, now)
        except WireError as exc:
            self._count(peer, op_label, str(exc.code))
            return error_reply(exc.request_id, exc.code, exc.message)
        self._count(peer, op_label, "ok")
        if isinstance(reply, Awaitable):
            return reply
        return reply.to_wire()

    def _count(self, peer: Peer, op: str, result: str) -> None:
        self.stats.queries[(peer.interface, op, result)] += 1

    def rate_limited_reply(self, payload: bytes, peer: Peer) -> dict[str, Any]:
        """Refuse one frame of a client over its rate, echoing the id when it has one."""
        rid: int | None = None
        op_label = "invalid"
        try:
            obj = decode_payload(payload)
        except WireError:
            pass
        else:
            rid = request_id(obj)
            op = obj.get("op")
            op_label = op if isinstance(op, str) and op in _OPS else "invalid"
        self._count(peer, op_label, str(ErrorCode.RATE_LIMITED))
        return error_reply(
            rid, ErrorCode.RATE_LIMITED, "too many requests from this address; slow down"
        )

    def _dispatch(
        self, req: Any, peer: Peer, now: float
    ) -> WireReply | ErrorReply | Awaitable[Reply]:
        if isinstance(req, NearestRequest):
            return self._nearest(req, peer, now)
        if isinstance(req, LocateRequest):
            ip, zone = self._locate(req.client_ip, req.zone, peer, req.id)
            self._remember(ip, zone, "admin.locate" if peer.admin else "locate", (), now)
            return LocateReply(req.id, self._where(zone))
        if isinstance(req, DevicesRequest):
            return self._devices(req, peer)
        if isinstance(req, PingRequest):
            return PingReply(req.id, __version__)
        if isinstance(req, ReloadRequest):
            if self._reload is None:
                raise WireError(ErrorCode.UNAVAILABLE, "reload is not wired in", req.id)
            # Asked now (the files are read after this request), answered when done.
            return self._reloaded(req.id, self._reload())
        if isinstance(req, StatsRequest):
            return StatsReply(req.id, self.stats_view(now))
        if isinstance(req, MapRequest):
            return MapReply(req.id, self.floor_drawing(req))
        if isinstance(req, PrivacyRequest):
            if req.op == "privacy.export":
                entries = self.log.export(req.ip)
                self.log.record_action("privacy.export", len(entries), now)
                # The action and its count only: whose entries they were is not logged.
                LOG.info("location log exported", extra={"op": req.op, "count": len(entries)})
                return ExportReply(req.id, tuple(ExportEntry(**e) for e in entries))
            n = self.log.erase(req.ip)
            self.log.record_action("privacy.erase", n, now)
            LOG.info("location log erased", extra={"op": req.op, "count": n})
            return EraseReply(req.id, n)
        raise WireError(ErrorCode.INTERNAL, "unhandled op", None)  # pragma: no cover

    def _where(self, zone: Zone) -> Where:
        where = self._wheres.get(zone.id)
        if where is None:
            where = self._wheres[zone.id] = where_of(zone)
        return where

    @staticmethod
    async def _reloaded(rid: int, reloading: Awaitable[list[str]]) -> Reply:
        problems = await reloading
        if problems:
            return ErrorReply(
                rid,
                ErrorCode.BAD_REQUEST,
                f"reload refused; still running the old configuration: {len(problems)} problem(s)",
                tuple(problems),
            ).to_wire()
        return ReloadReply(rid).to_wire()

    def _locate(
        self, client_ip: str | None, zone_id: str | None, peer: Peer, rid: int
    ) -> tuple[str | None, Zone]:
        if (client_ip is not None or zone_id is not None) and not peer.trusted:
            field_name = "client_ip" if client_ip is not None else "zone"
            raise WireError(
                ErrorCode.FORBIDDEN,
                f"{field_name}: only trusted peers may ask on behalf of another client",
                rid,
            )
        if zone_id is not None:
            zone = self.sitemap.zones.get(zone_id)
            if zone is None:
                raise WireError(ErrorCode.UNKNOWN_LOCATION, "zone: no such zone", rid)
            return client_ip, zone
        if client_ip is None and peer.anonymous:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"client_ip or zone: required over {peer.interface}, "
                "which does not reveal who asks",
                rid,
            )
        ip = client_ip if client_ip is not None else (peer.ip or LOCAL_HOST)
        found = self.sitemap.zone_for_ip(ip)
        if found is None:
            raise WireError(
                ErrorCode.UNKNOWN_LOCATION,
                "no zone's subnets contain this client's address",
                rid,
            )
        return ip, found

    def _nearest(self, req: NearestRequest, peer: Peer, now: float) -> NearestReply:
        ip, zone = self._locate(req.client_ip, req.zone, peer, req.id)
        policy = self.sitemap.visibility
        visible = policy.client_mask(zone.id, ip) if policy.active else -1
        key = (zone.id, req.kind, req.need, req.k, visible)
        cached = self._cache.get(key)
        table = self.table
        gen = table.rank_version(None if self.ranking.allow_other_sites else zone.site)
        # The cache keeps who is answered and in what order, valid while nothing that ranks
        # changes; the views are drawn per reply, so a new state or supply level shows at once.
        if cached is not None and cached[0] == gen:
            hits = cached[1]
        else:
            hits = tuple(
                table.index.nearest(zone, req.kind, req.need, req.k, self.ranking, visible)
            )
            if len(self._cache) >= CACHE_MAX:
                # Oldest out, one at a time: clearing 8,192 answers at once stalls the loop
                # for milliseconds, a spike in every client's latency. (An OrderedDict: a
                # plain dict finds its oldest key by skipping every deleted slot first.)
                self._cache.popitem(last=False)
            self._cache[key] = (gen, hits)
        devices = views_of(table, hits)
        # An operator's lookup is logged as such: the person's export shows someone looked.
        op = "admin.nearest" if peer.admin else "nearest"
        self._remember(ip, zone, op, tuple(d.id for d in devices), now)
        return NearestReply(req.id, self._where(zone), devices)

    def remember_lookup(
        self, ip: str, zone_id: str, op: str, devices: tuple[str, ...], now: float
    ) -> None:
        """Note a lookup another protocol answered (DNS-SD) in the location log."""
        zone = self.sitemap.zones.get(zone_id)
        if zone is not None:
            self._remember(ip, zone, op, devices, now)

    def _remember(
        self, ip: str | None, zone: Zone, op: str, devices: tuple[str, ...], now: float
    ) -> None:
        if ip is not None:
            pseudonym = self.log.record(ip, zone.id, op, devices, now)
            if self.spikes.note(pseudonym, now):
                LOG.warning(
                    "one client's request rate spiked",
                    extra={
                        "client": client_label(ip, self.cfg.privacy.log_ip),
                        "zone": zone.id,
                        "per_minute_over": self.spikes.threshold,
                    },
                )

    def floor_drawing(self, req: MapRequest) -> str:
        """Return one floor as a standalone SVG document, or refuse an unknown floor."""
        atlas = Atlas.of(self.sitemap)
        if not atlas.floor_zones(req.site, req.building, req.level):
            raise WireError(
                ErrorCode.UNKNOWN_LOCATION,
                "site, building, level: no zone of the site maps is on that floor",
                req.id,
            )
        marks = floor_marks(
            self.table.records(),
            self.table.quarantine.values(),
            self.sitemap,
            req.site,
            req.building,
            req.level,
        )
        return floor_svg(atlas, req.site, req.building, req.level, marks)

    def explain(
        self, client_ip: str, kind: str, k: int, now: float
    ) -> tuple[Zone, list[tuple[Record, Hit]]]:
        """Answer an operator's lookup: the zone and what ``nearest`` answers, with each hit.

        Ranked by the same index call as ``nearest`` (no need, the client's visibility),
        and logged like ``nearestctl locate``: a location-log entry of op ``admin.locate``.
        Raises WireError for an unplaceable address.
        """
        ip, zone = self._locate(client_ip, None, ADMIN_PEER, 0)
        policy = self.sitemap.visibility
        visible = policy.client_mask(zone.id, ip) if policy.active else -1
        hits = self.table.index.nearest(zone, kind, Need(), k, self.ranking, visible)
        out = [(rec, hit) for hit in hits if (rec := self.table.get(hit.device_id)) is not None]
        self._remember(ip, zone, "admin.locate", tuple(r.device.id for r, _ in out), now)
        return zone, out

    def _viewer(self, req: DevicesRequest, peer: Peer) -> int | None:
        """Return the visibility bits of whoever a listing is for (None: sees everything)."""
        policy = self.sitemap.visibility
        operator = peer.admin and req.client_ip is None and req.zone is None
        if operator or not policy.active:
            if req.client_ip is not None or req.zone is not None:
                self._locate(req.client_ip, req.zone, peer, req.id)  # refuses the untrusted
            return None
        try:
            ip, zone = self._locate(req.client_ip, req.zone, peer, req.id)
        except WireError as exc:
            if exc.code != ErrorCode.UNKNOWN_LOCATION:
                raise
            return policy.client_mask(None, req.client_ip or peer.ip or LOCAL_HOST)
        return policy.client_mask(zone.id, ip)

    def _page_order(self) -> tuple[list[PageKey], list[str]]:
        """Return the table in ``devices`` order (keys, device ids), sorted once per change.

        A page is then a bisection and a walk of the page's own records, not a pass over
        the whole inventory: pipelined ``devices`` requests cost what their replies hold.
        """
        table = self.table
        cached = self._order
        if cached is not None and cached[0] is table and cached[1] == table.generation:
            return cached[2], cached[3]
        pairs = sorted((page_key(r), r.device.id) for r in table.records())
        keys = [k for k, _ in pairs]
        ids = [i for _, i in pairs]
        self._order = (table, table.generation, keys, ids)
        return keys, ids

    def _devices(self, req: DevicesRequest, peer: Peer) -> DevicesReply:
        """Return one page of the inventory: at most ``limit`` records after ``cursor``."""
        viewer = self._viewer(req, peer)
        after: PageKey | None = None
        if req.cursor is not None:
            try:
                after = decode_cursor(req.cursor)
            except ValueError as exc:
                raise WireError(ErrorCode.BAD_REQUEST, str(exc), req.id) from None
        policy = self.sitemap.visibility
        # (key, record, restriction, quarantine entry): views are built for the page only.
        found: list[tuple[PageKey, Record, int, Any]] = []
        keys, ids = self._page_order()
        start = 0 if after is None else bisect.bisect_right(keys, after)
        if req.site is not None:
            start = max(start, bisect.bisect_left(keys, (True, req.site)))
        table = self.table
        for i in range(start, len(keys)):
            key = keys[i]
            if req.site is not None and (not key[0] or key[1] != req.site):
                break
            rec = table.get(ids[i])
            if rec is None or (req.kind is not None and rec.device.kind != req.kind):
                continue
            restrict = restriction_of(rec.device, rec.placement, self.sitemap)
            if viewer is not None and restrict & ~viewer:
                continue
            found.append((key, rec, restrict, None))
            if len(found) > req.limit:
                break
        if peer.admin and viewer is None and req.site is None:
            for (_, addresses), held in self.table.quarantine.items():
                if req.kind is not None and held.device.kind != req.kind:
                    continue
                rec = Record(held.device, None, held.last_seen)
                key = page_key(rec, addresses)
                if after is None or key > after:
                    found.append((key, rec, 0, held))
        page = heapq.nsmallest(req.limit + 1, found, key=lambda item: item[0])
        more = len(page) > req.limit
        del page[req.limit :]
        views = []
        for _, rec, restrict, held in page:
            if held is not None:
                views.append(inventory_view(rec, None, held.reason, held.first_seen))
            else:
                shown = tuple(policy.rule_text(restrict)) if restrict and viewer is None else None
                views.append(inventory_view(rec, shown))
        return DevicesReply(req.id, tuple(views), encode_cursor(page[-1][0]) if more else None)

    # ---- state -------------------------------------------------------------------------
    def apply(self, cfg: Config, sitemap: SiteMap) -> None:
        """Switch to a validated config and site map; discovered devices are placed again."""
        self.swap(prepare(cfg, sitemap, self.carry()))

    def carry(self) -> Carry:
        """Return what a new table takes over (call on the loop; cheap, nothing deep-copied)."""
        return Carry(self.table.carried(), dict(self.live))

    def swap(self, new: Prepared) -> tuple[SiteMap, DeviceTable]:
        """Switch to a prepared config and table; return the old site map and table.

        Cheap, between requests: what changed in the table since ``carry()`` (devices
        discovery added, changed or lost, polls that came back) is done again on the new one.
        """
        old_sitemap, old = self.sitemap, self.table
        table = new.table
        carried = {r.device.id: r for r in new.carry.table.records}
        now_dynamic = {r.device.id: r for r in old.dynamic_records()}
        old_held = {id(q) for q in new.carry.table.held}
        self.cfg = cfg = new.cfg
        self.sitemap = new.sitemap
        self.ranking = new.ranking
        table.continue_from(old)
        self.table = table
        for device_id in carried:
            if device_id not in now_dynamic:
                table.remove(device_id)
        for device_id, rec in now_dynamic.items():
            if carried.get(device_id) is not rec:
                table.upsert(rec.device, rec.last_seen)
        for held in old.quarantine.values():
            if id(held) not in old_held:
                table.upsert(held.device, held.last_seen)
        # Polls that came back meanwhile; static devices were given the live state as of carry().
        before = new.carry.live
        for device_id, live in list(self.live.items()):
            if before.get(device_id) is not live:
                self.set_live(device_id, live)
        for device_id in before:
            if device_id not in self.live:
                self.set_live(device_id, None)
        self.log.retention = cfg.privacy.retention
        self.log.max_entries = cfg.privacy.max_entries
        d = cfg.daemon
        self.limiter.configure(d.rate, d.burst, d.rate_clients)
        self.spikes.threshold = cfg.privacy.spike_per_minute
        set_ip_mode(cfg.privacy.log_ip)
        self._cache.clear()
        self._wheres.clear()
        return old_sitemap, old

    def upsert_device(self, device: Device, now: float) -> str:
        """Add or update a device from discovery; return what changed.

        A rogue claim of a pinned identity returns 'quarantined' (once; it is logged
        here with the reason, so callers need not log it again).
        """
        live = self.live.get(device.id)
        if live is not None:
            device = overlay(device, live)
        result = self.table.upsert(device, now)
        if result == "quarantined":
            held = self.table.quarantine.get((device.id, device.addresses))
            LOG.warning(
                "device quarantined",
                extra={
                    "device": device.id,
                    "source": device.source,
                    "addresses": ",".join(device.addresses),
                    "reason": held.reason if held else "",
                },
            )
        return result

    def is_public(self, device_id: str) -> bool:
        """Return whether every client may see a device (for adapters that publish devices)."""
        rec = self.table.get(device_id)
        if rec is None:
            return False
        return restriction_of(rec.device, rec.placement, self.sitemap) == 0

    def remove_device(self, device_id: str) -> bool:
        """Remove a discovered device."""
        removed = self.table.remove(device_id)
        if removed:
            self.live.pop(device_id, None)
        return removed

    def set_live(self, device_id: str, live: Live | None) -> str:
        """Lay a poll's finding over a device (None: forget it); return what changed, or 'gone'."""
        rec = self.table.get(device_id)
        if rec is None:
            self.live.pop(device_id, None)
            return "gone"
        if live is None:
            self.live.pop(device_id, None)
            device = replace(
                rec.device,
                state=DeviceState.UNKNOWN,
                state_reasons=(),
                accepting_jobs=True,
                supplies=(),
            )
        else:
            self.live[device_id] = live
            device = overlay(rec.device, live)
        # A poll is not a sighting: it must not keep a device discovery lost from expiring.
        return self.table.upsert(device, rec.last_seen)

    def tick(self, now: float) -> None:
        """Run time-driven upkeep: privacy purge and key rotation."""
        self.log.purge(now)
        if self.log.needs_rotation(now):
            self.log.rotate(self._key_source(), now)
        self.limiter.prune(now)

    def security_view(self) -> dict[str, Any]:
        """Return the counters of refused, rate-limited and malformed requests by interface."""
        out: dict[str, Any] = {name: {} for name in sorted(set(SECURITY_RESULTS.values()))}
        for (interface, _op, result), n in self.stats.queries.items():
            name = SECURITY_RESULTS.get(result)
            if name is not None:
                out[name][interface] = out[name].get(interface, 0) + n
        out["devices_quarantined"] = len(self.table.quarantine)
        out["devices_quarantined_total"] = self.table.quarantined_total
        out["rate_limiter_clients"] = len(self.limiter)
        out["rate_limiter_evicted"] = self.limiter.evicted
        out["pseudonym_spikes"] = self.spikes.spikes
        return out

    def census(self, now: float) -> Census:
        """Return the census of the device table, counted again only after it changed."""
        cached = self._census
        # A poll result that changes nothing in the table still adds a polled device.
        key = (self.table.generation, len(self.live))
        if cached is None or self._census_key != key:
            self._census_key = key
            cached = self._census = census(self.table.records(), now, self.live)
        return replace(cached, taken=now) if cached.taken != now else cached

    def stats_view(self, now: float) -> dict[str, Any]:
        """Return counters and sizes for ``stats``."""
        c = self.census(now)
        out: dict[str, Any] = {
            "version": __version__,
            "uptime_s": round(now - self.stats.started, 3),
            "devices": c.total,
            "unlocated": c.unlocated,
            "stale": c.stale,
            "devices_by_kind_state": {f"{k}/{s}": n for (k, s), n in c.by_kind_state},
            "devices_by_site": {f"{site}/{k}": n for (site, k), n in c.by_site_kind},
            "zones": len(self.sitemap.zones),
            "prefixes": len(self.sitemap.prefixes),
            "location_log_entries": len(self.log),
            "location_log_bytes": self.log.bytes,
            "location_log_oldest_at": self.log.oldest,
            "location_log_oldest_age_s": None
            if self.log.oldest is None
            else round(now - self.log.oldest, 3),
            "location_log_purged": self.log.purged,
            "location_log_dropped": self.log.dropped,
            "queries": {"/".join(k): v for k, v in sorted(self.stats.queries.items())},
        }
        out["security"] = self.security_view()
        if self._sections is not None:
            for key, value in self._sections().items():
                out[key] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    """Return a stats value as the wire encodes it: read-only mappings become dicts."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


_OPS = frozenset(
    (
        "nearest",
        "locate",
        "devices",
        "ping",
        "reload",
        "stats",
        "privacy.export",
        "privacy.erase",
        "map",
    )
)


def wall_clock() -> float:
    """Return the clock adapters pass in as ``now`` (seconds since the epoch)."""
    return time.time()
