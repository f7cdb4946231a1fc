"""Exact k-nearest devices under the contract's cost: neighbour lists, then floor search.

Theory of operation. A device D answers a client in zone Z at

    cost = dist(D, Z.polygon) + |D.level - Z.level| * floor_penalty
           + (D.building != Z.building) * building_penalty

Clients only ever ask from zones, and zones are few and fixed by the site map, so each
(zone, kind, ranking) keeps a *neighbour list*: the NEAR_LIST cheapest devices of the
zone's cheapest non-empty floor in cost order, whatever their capabilities or state,
and a ``bound`` that every device left out costs at least (the next device of that
floor, and for every other floor its penalty plus the distance between the zone's box
and the floor's box). A query walks the list, filters, and stops at the first cost
above its k-th best. The answer is proven when that k-th best is below ``bound``;
otherwise (a rare capability, a large k) the floors are searched. A list is dated by
the moves (devices added, moved, removed) of its site; a change of state or visibility
only changes what the walk filters, so it keeps the lists, and only their copies of
the devices' filter words (capabilities, paper class, availability in one integer,
so the walk touches an entry only when it matches) are read again. ``SpatialIndex.warm``
builds the lists when the map loads.

The floor search: the penalty is constant for all devices on one (site, building,
level), so devices are grouped that way per kind, and groups are visited in
increasing penalty. A group whose box is farther than the k-th best cost is skipped.
A tiny group is scanned in Python; a medium one is evaluated whole with numpy; a
large one is searched through its rtree, which yields devices in order of distance
to Z's bounding box, a lower bound of the distance to Z's polygon, in batches
enlarged until the bound proves the answer. Equal costs are always visited, because
the tie-breaks (state: idle before processing or unknown; then distance to Z's
centroid; then device id) may prefer them. Every path computes distances with the
same operations, rounded the same way, so the result is exactly the brute-force
answer, which ``brute_force`` computes and which the tests compare against.
"""

from __future__ import annotations

import bisect
import ctypes
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import shapely
from rtree import core as rtree_core
from rtree import index as rtree_index
from shapely.geometry.base import BaseGeometry

from nearest_wire import PAPER_CLASSES, Need
from nearestd.core.model import Zone
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import Projection

COLOR, DUPLEX, ADF, SECURE = 1, 2, 4, 8
# Slack for the pruning bound: bbox distances are computed differently from GEOS's
# polygon distances, and a last-bit difference must not prune a tying device.
EPSILON = 1e-6
# Devices asked of a group's rtree at first; enlarged fourfold while the bound is unproven.
FIRST_BATCH = 8
# Expected devices per answer wanted in the zone's box before the box query is tried first.
SETTLE_INSIDE = 2.0
# A floor with at most this many devices of a kind is scanned in Python; up to
# LARGE_GROUP it is evaluated whole with numpy (a dozen array operations cost less than
# one rtree call at that size, and keep no 17 KB tree per floor); past LARGE_GROUP it
# moves into an rtree, and back into arrays once it has shrunk to half that.
TINY_GROUP = 8
LARGE_GROUP = 4096
# Per (zone, kind, ranking), the cost order of this many cheapest devices is kept, with
# no filter applied; a query walks it and, when the walk cannot prove its answer (a
# rare capability), searches the floors. Up to NEAR_CACHE such lists are kept.
NEAR_LIST = 32
NEAR_CACHE = 65536
# Filter word layout (word_of): capability bits, then one bit per paper class, then state.
PAPER_SHIFT = 4
AVAILABLE = 1 << (PAPER_SHIFT + len(PAPER_CLASSES))


@dataclass(frozen=True, slots=True)
class Entry:
    """What the index keeps of a placed device."""

    device_id: str
    kind: str
    site: str
    building: str
    level: int
    x: float
    y: float
    mask: int
    paper: int
    available: bool
    # Visibility rule bits a client must hold to see this device (core.visibility).
    restrict: int = 0
    # Tie-break between equal costs: 0 idle, 1 processing or unknown, 2 not available.
    state_rank: int = 1


class Hit(NamedTuple):
    """One ranked answer: the device id, its cost and the tie-break distance."""

    cost: float
    centroid_distance: float
    device_id: str
    planar_distance: float


def need_mask(need: Need) -> int:
    """Return the capability bits a request needs."""
    return (
        (COLOR if need.color else 0)
        | (DUPLEX if need.duplex else 0)
        | (ADF if need.adf else 0)
        | (SECURE if need.secure else 0)
    )


def caps_mask(color: bool, duplex: bool, adf: bool, secure: bool) -> int:
    """Return the capability bits a device has."""
    return (
        (COLOR if color else 0)
        | (DUPLEX if duplex else 0)
        | (ADF if adf else 0)
        | (SECURE if secure else 0)
    )


class ZoneFrame:
    """A zone's polygon as seen in one site's frame, with cached measures."""

    __slots__ = ("bbox", "cx", "cy", "is_rect", "polygon")

    def __init__(self, polygon: BaseGeometry) -> None:
        self.polygon = polygon
        shapely.prepare(polygon)
        minx, miny, maxx, maxy = polygon.bounds
        self.bbox = (minx, miny, maxx, maxy)
        c = polygon.centroid
        self.cx, self.cy = c.x, c.y
        box_area = (maxx - minx) * (maxy - miny)
        self.is_rect = (
            polygon.geom_type == "Polygon"
            and abs(polygon.area - box_area) <= (1e-12 * max(box_area, 1.0))
            and len(polygon.interiors) == 0
        )

    def bbox_distance(self, x: float, y: float) -> float:
        """Return the distance from the point to the polygon's bounding box."""
        minx, miny, maxx, maxy = self.bbox
        dx = minx - x if x < minx else (x - maxx if x > maxx else 0.0)
        dy = miny - y if y < miny else (y - maxy if y > maxy else 0.0)
        # sqrt of the sum of squares, as the numpy search computes it: every step is
        # rounded the same way, so both give the same metres to the last bit.
        return math.sqrt(dx * dx + dy * dy)

    def bbox_distances_sq(
        self, xs: np.ndarray[Any, np.dtype[np.float64]], ys: np.ndarray[Any, np.dtype[np.float64]]
    ) -> np.ndarray[Any, np.dtype[np.float64]]:
        """Return ``bbox_distance`` squared for many points, each step rounded as it rounds."""
        minx, miny, maxx, maxy = self.bbox
        dx: np.ndarray[Any, np.dtype[np.float64]] = np.maximum(minx - xs, xs - maxx)
        np.maximum(dx, 0.0, out=dx)
        dy = np.maximum(miny - ys, ys - maxy)
        np.maximum(dy, 0.0, out=dy)
        dx *= dx
        dy *= dy
        dx += dy
        return dx

    def distance(self, x: float, y: float) -> float:
        """Return the planar distance from the point to the polygon (0 inside)."""
        if self.is_rect:
            return self.bbox_distance(x, y)
        return float(shapely.distance(self.polygon, shapely.points(x, y)))

    def centroid_distance(self, x: float, y: float) -> float:
        """Return the distance from the point to the zone's centroid."""
        return math.hypot(x - self.cx, y - self.cy)


def _reproject(geom: BaseGeometry, src: Projection, dst: Projection) -> BaseGeometry:
    def fn(coords: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out = np.empty_like(coords)
        lon = coords[:, 0] / src.kx + src.lon0
        lat = coords[:, 1] / src.ky + src.lat0
        out[:, 0] = (lon - dst.lon0) * dst.kx
        out[:, 1] = (lat - dst.lat0) * dst.ky
        return out

    return shapely.transform(geom, fn)


class Frames:
    """Zone frames per (zone, site), made on first use."""

    def __init__(self, projections: dict[str, Projection]) -> None:
        self._projections = projections
        self._cache: dict[tuple[str, str], ZoneFrame] = {}

    def get(self, zone: Zone, site: str) -> ZoneFrame:
        """Return the frame of ``zone`` in ``site``'s projection."""
        key = (zone.id, site)
        frame = self._cache.get(key)
        if frame is None:
            if site == zone.site:
                frame = ZoneFrame(zone.polygon)
            else:
                frame = ZoneFrame(
                    _reproject(zone.polygon, self._projections[zone.site], self._projections[site])
                )
            self._cache[key] = frame
        return frame


def _new_tree(
    stream: Iterable[tuple[int, tuple[float, float, float, float], None]] | None = None,
) -> Any:
    """Return an in-memory rtree sized for one floor's devices, bulk-loaded from ``stream``.

    There is one tree per (site, kind, building, level), thousands on a large site map:
    libspatialindex's defaults (100-entry nodes, 10-page buffers, pools of 100s) cost
    about 25 KB per tree before the first device; these cost about 17 KB.
    """
    props = rtree_index.Property()
    props.leaf_capacity = 32
    props.index_capacity = 32
    props.buffering_capacity = 1
    props.point_pool_capacity = 1
    props.region_pool_capacity = 1
    props.index_pool_capacity = 1
    if stream is None:
        return rtree_index.Index(interleaved=True, properties=props)
    return rtree_index.Index(stream, interleaved=True, properties=props)


class _Group:
    """One (site, kind, building, level): its devices, searched as a list, arrays or an rtree.

    ``members`` (slots in position order) and ``pos`` are always kept. Queries scan the
    members of a tiny group in Python, evaluate a medium one with numpy over arrays built
    from the entries on first use after a change, and search a large one's rtree.
    """

    __slots__ = ("arrays", "bounds", "count", "members", "pos", "tree")

    def __init__(self, members: list[int], entries: dict[int, Entry]) -> None:
        self.members = members
        self.pos = {slot: i for i, slot in enumerate(members)}
        self.count = len(members)
        self.bounds = [math.inf, math.inf, -math.inf, -math.inf]
        self.arrays: _Arrays | None = None
        self.tree: Any = None
        if members:
            xs = [entries[slot].x for slot in members]
            ys = [entries[slot].y for slot in members]
            self.bounds = [min(xs), min(ys), max(xs), max(ys)]
        if self.count > LARGE_GROUP:
            self.tree = self._build_tree(entries)

    def insert(self, slot: int, x: float, y: float, entries: dict[int, Entry]) -> None:
        """Add a device, moving the group into an rtree once it outgrows the arrays."""
        self.pos[slot] = len(self.members)
        self.members.append(slot)
        self.count += 1
        self.arrays = None
        self.grow(x, y)
        if self.tree is not None:
            self.tree.insert(slot, (x, y, x, y))
        elif self.count > LARGE_GROUP:
            self.tree = self._build_tree(entries)

    def _build_tree(self, entries: dict[int, Entry]) -> Any:
        """Return an rtree bulk-loaded with the group's devices."""
        return _new_tree(
            (s, (entries[s].x, entries[s].y, entries[s].x, entries[s].y), None)
            for s in self.members
        )

    def delete(self, slot: int, x: float, y: float) -> None:
        """Remove a device; a shrunken large group leaves its rtree for arrays."""
        i = self.pos.pop(slot)
        last = self.members.pop()
        if last != slot:
            self.members[i] = last
            self.pos[last] = i
        self.count -= 1
        self.arrays = None
        if self.tree is not None:
            if self.count <= LARGE_GROUP // 2:
                self.tree = None
            else:
                self.tree.delete(slot, (x, y, x, y))

    def update(self, slot: int, entry: Entry) -> None:
        """Refresh a device's filter word in place after a change of state or visibility."""
        arrays = self.arrays
        if arrays is None:
            return
        i = self.pos[slot]
        arrays.words[i] = word_of(entry)
        if entry.restrict or arrays.restricted.get(i):
            arrays.restricted[i] = entry.restrict
            if not entry.restrict:
                del arrays.restricted[i]

    def grow(self, x: float, y: float) -> None:
        b = self.bounds
        if x < b[0]:
            b[0] = x
        if y < b[1]:
            b[1] = y
        if x > b[2]:
            b[2] = x
        if y > b[3]:
            b[3] = y

    def build(self, entries: dict[int, Entry]) -> _Arrays:
        """Return the group's arrays, building them from the entries if a change dropped them."""
        arrays = self.arrays
        if arrays is None:
            members = self.members
            n = len(members)
            es = [entries[s] for s in members]
            arrays = self.arrays = _Arrays(
                np.fromiter((e.x for e in es), np.float64, n),
                np.fromiter((e.y for e in es), np.float64, n),
                np.fromiter((word_of(e) for e in es), np.int64, n),
                {i: e.restrict for i, e in enumerate(es) if e.restrict},
            )
        return arrays


@dataclass(slots=True)
class _Arrays:
    """A medium group's devices as numpy arrays, in the order of ``_Group.members``."""

    xs: np.ndarray[Any, np.dtype[np.float64]]
    ys: np.ndarray[Any, np.dtype[np.float64]]
    # Capability bits, paper classes as a thermometer and availability: see word_of.
    words: np.ndarray[Any, np.dtype[np.int64]]
    # Position -> visibility rule bits, for the few devices that have any.
    restricted: dict[int, int]


def word_of(entry: Entry) -> int:
    """Return a device's filter word: a request matches when it holds every bit it needs."""
    paper = ((1 << (entry.paper + 1)) - 1) << PAPER_SHIFT if entry.paper >= 0 else 0
    return entry.mask | paper | (AVAILABLE if entry.available else 0)


def need_word(mask: int, paper: int, any_state: bool) -> int:
    """Return the filter word bits a request needs (see ``word_of``)."""
    return (
        mask | (1 << (PAPER_SHIFT + paper) if paper >= 0 else 0) | (0 if any_state else AVAILABLE)
    )


_BOX = ctypes.c_double * 2
_I64 = ctypes.c_int64
_U64 = ctypes.c_uint64
_VOID_P = ctypes.POINTER(ctypes.c_void_p)
_INTERSECTS = rtree_core.rt.Index_Intersects_id
_NEAREST = rtree_core.rt.Index_NearestNeighbors_id
_FREE = rtree_core.rt.Index_Free
_byref = ctypes.byref
_pointer = ctypes.pointer
_cast = ctypes.cast


def _tree_ids(tree: Any, bbox: tuple[float, float, float, float], n: int) -> list[int]:
    """Return the ids in ``bbox`` (n == 0) or the ``n`` nearest to it, as rtree would.

    The same libspatialindex calls as ``Index.intersection`` / ``Index.nearest`` on a 2-D
    interleaved index, without their per-call property reads and per-id generator: on
    the query's hot path those cost more than the search itself.
    """
    mins = _BOX(bbox[0], bbox[1])
    maxs = _BOX(bbox[2], bbox[3])
    it = _pointer(_I64())
    count = _U64(n)
    (_NEAREST if n else _INTERSECTS)(tree.handle, mins, maxs, 2, _byref(it), _byref(count))
    try:
        return it[: count.value]
    finally:
        _FREE(_cast(it, _VOID_P))


def _rect_distance(a: tuple[float, float, float, float], b: list[float]) -> float:
    dx = max(b[0] - a[2], a[0] - b[2], 0.0)
    dy = max(b[1] - a[3], a[1] - b[3], 0.0)
    return math.hypot(dx, dy)


def _inside(bbox: tuple[float, float, float, float], group: _Group) -> float:
    """Return about how many of a group's devices lie in the box, if spread evenly.

    Devices inside the zone's box all tie at bound 0, so a first batch smaller than
    their number can never prove the answer and is always enlarged: ask for more.
    """
    g = group.bounds
    area = (g[2] - g[0]) * (g[3] - g[1])
    w = min(bbox[2], g[2]) - max(bbox[0], g[0])
    h = min(bbox[3], g[3]) - max(bbox[1], g[1])
    if area <= 0.0 or w <= 0.0 or h <= 0.0:
        return 0.0
    return group.count * (w * h) / area


def cost_of(entry: Entry, zone: Zone, frame: ZoneFrame, ranking: Ranking) -> tuple[float, float]:
    """Return (cost, planar distance) of a device for a client in ``zone``."""
    dist = frame.distance(entry.x, entry.y)
    cost = dist + _penalty(entry.site, entry.building, entry.level, zone, ranking)
    return cost, dist


def _penalty(site: str, building: str, level: int, zone: Zone, ranking: Ranking) -> float:
    pen = abs(level - zone.level) * ranking.floor_penalty_m
    if site != zone.site or building != zone.building:
        pen += ranking.building_penalty_m
    return pen


def matches(entry: Entry, kind: str, need: Need, mask: int, paper: int) -> bool:
    """Return whether a device meets the kind, capability and state filters."""
    return (
        entry.kind == kind
        and (entry.mask & mask) == mask
        and entry.paper >= paper
        and (entry.available or need.any_state)
    )


def _need_paper(need: Need) -> int:
    return -1 if need.paper is None else PAPER_CLASSES.index(need.paper)


@dataclass(slots=True)
class _Near:
    """A zone's cheapest devices of one kind, in cost order, as of ``version``."""

    version: int
    # The floor's penalty and the centroid of the zone in the floor's site frame.
    pen: float
    cx: float
    cy: float
    # Planar distances, ascending, and the devices' slots.
    dists: array[float]
    slots: array[int]
    # Every device left out costs at least this (inf: none was left out).
    bound: float
    # The devices' filter words (word_of) as of ``words_at`` (SpatialIndex._changes), so
    # that the walk reads an entry only for a device that matches; and whether any of
    # them has visibility rules.
    words: array[int]
    words_at: int
    restricted: bool


class SpatialIndex:
    """Devices by (site, kind, building, level) in rtrees; exact k-nearest queries."""

    def __init__(self, projections: dict[str, Projection]) -> None:
        self.frames = Frames(projections)
        self._entries: dict[int, Entry] = {}
        self._slot_of: dict[str, int] = {}
        self._next_slot = 0
        self._groups: dict[tuple[str, str, str, int], _Group] = {}
        self._by_site_kind: dict[tuple[str, str], list[tuple[str, int]]] = {}
        # The groups to visit in increasing penalty, per (site, building, level, kind,
        # ranking) of the client's zone; dropped whenever a group is created.
        self._plans: dict[tuple[str, str, int, str, Ranking], list[tuple[float, str, _Group]]] = {}
        # Devices added, moved or removed, per site and in all: what dates a _Near list.
        self._moves: dict[str, int] = {}
        self._all_moves = 0
        # Entries replaced in place (a change of state or visibility): what dates the
        # filter words of a _Near list.
        self._changes = 0
        self._near: dict[tuple[str, str, Ranking], _Near] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> Iterable[Entry]:
        """Yield every indexed entry."""
        return self._entries.values()

    def get(self, device_id: str) -> Entry | None:
        """Return a device's entry, if indexed."""
        slot = self._slot_of.get(device_id)
        return None if slot is None else self._entries[slot]

    def _group(self, entry: Entry) -> _Group:
        key = (entry.site, entry.kind, entry.building, entry.level)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group([], self._entries)
            self._plans.clear()
            self._by_site_kind.setdefault((entry.site, entry.kind), []).append(
                (entry.building, entry.level)
            )
        return group

    def bulk_load(self, entries: Iterable[Entry]) -> None:
        """Load many entries at once into an empty index (rtrees stream bulk-loaded)."""
        if self._entries:
            raise ValueError("bulk_load needs an empty index")
        by_group: dict[tuple[str, str, str, int], list[int]] = {}
        stored, slot_of = self._entries, self._slot_of
        slot = self._next_slot
        for entry in entries:
            if entry.device_id in slot_of:
                self._next_slot = slot
                raise ValueError(f"duplicate device id {entry.device_id!r}")
            stored[slot] = entry
            slot_of[entry.device_id] = slot
            key = (entry.site, entry.kind, entry.building, entry.level)
            members = by_group.get(key)
            if members is None:
                by_group[key] = [slot]
            else:
                members.append(slot)
            slot += 1
        self._next_slot = slot
        for key, members in by_group.items():
            self._groups[key] = _Group(members, self._entries)
            self._by_site_kind.setdefault((key[0], key[1]), []).append((key[2], key[3]))
        self._plans.clear()
        self._all_moves += 1
        for site in {key[0] for key in by_group}:
            self._moves[site] = self._moves.get(site, 0) + 1

    def upsert(self, entry: Entry) -> None:
        """Insert a device or replace its entry."""
        old_slot = self._slot_of.get(entry.device_id)
        if old_slot is not None:
            old = self._entries[old_slot]
            if old == entry:
                return
            same_place = (old.site, old.kind, old.building, old.level, old.x, old.y) == (
                entry.site,
                entry.kind,
                entry.building,
                entry.level,
                entry.x,
                entry.y,
            )
            if same_place:
                self._entries[old_slot] = entry
                self._changes += 1
                self._groups[(entry.site, entry.kind, entry.building, entry.level)].update(
                    old_slot, entry
                )
                return
            self.remove(entry.device_id)
        slot = self._next_slot
        self._next_slot += 1
        self._entries[slot] = entry
        self._slot_of[entry.device_id] = slot
        self._group(entry).insert(slot, entry.x, entry.y, self._entries)
        self._moved(entry.site)

    def remove(self, device_id: str) -> None:
        """Remove a device if indexed."""
        slot = self._slot_of.pop(device_id, None)
        if slot is None:
            return
        entry = self._entries[slot]
        key = (entry.site, entry.kind, entry.building, entry.level)
        self._groups[key].delete(slot, entry.x, entry.y)
        del self._entries[slot]
        self._moved(entry.site)

    def _moved(self, site: str) -> None:
        self._moves[site] = self._moves.get(site, 0) + 1
        self._all_moves += 1

    def _plan(self, zone: Zone, kind: str, ranking: Ranking) -> list[tuple[float, str, _Group]]:
        """Return the (penalty, site, group) to visit for a client in ``zone``, cheapest first."""
        key = (zone.site, zone.building, zone.level, kind, ranking)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        sites = [zone.site]
        if ranking.allow_other_sites:
            sites += sorted(s for (s, kd) in self._by_site_kind if kd == kind and s != zone.site)
        plan = []
        for site in sites:
            for building, level in self._by_site_kind.get((site, kind), ()):
                pen = _penalty(site, building, level, zone, ranking)
                plan.append((pen, site, self._groups[(site, kind, building, level)]))
        plan.sort(key=lambda p: p[0])
        self._plans[key] = plan
        return plan

    def nearest(
        self, zone: Zone, kind: str, need: Need, k: int, ranking: Ranking, visible: int = -1
    ) -> list[Hit]:
        """Return the k cheapest matching devices a client may see in ``zone``, exactly.

        ``visible`` holds the visibility rule bits the client satisfies (-1: all).
        """
        near = self._neighbours(zone, kind, ranking)
        if near.words_at != self._changes:
            self._refresh(near)
        mask = need_mask(need)
        paper = _need_paper(need)
        want = need_word(mask, paper, need.any_state)
        hidden = ~visible
        screen = bool(hidden) and near.restricted
        best: list[tuple[float, int, float, str, float]] = []
        entries = self._entries
        pen = near.pen
        cx = near.cx
        cy = near.cy
        hypot = math.hypot
        for dist, slot, word in zip(near.dists, near.slots, near.words, strict=True):
            cost = dist + pen
            if len(best) >= k and cost > best[-1][0]:
                break
            if word & want != want:
                continue
            e = entries[slot]
            if screen and e.restrict & hidden:
                continue
            bisect.insort(best, (cost, e.state_rank, hypot(e.x - cx, e.y - cy), e.device_id, dist))
            if len(best) > k:
                best.pop()
        # Every device the list leaves out costs at least ``bound`` (inf: it leaves none
        # out), so only an answer cheaper than that is proven; else search the floors.
        bound = near.bound
        if bound != math.inf and not (len(best) >= k and best[-1][0] < bound):
            return self.search(zone, kind, need, k, ranking, visible)
        return [Hit(c, cd, d, p) for c, _, cd, d, p in best]

    def warm(self, zones: Iterable[Zone], kinds: Iterable[str], ranking: Ranking) -> int:
        """Prepare every zone's frame and neighbour lists now; return how many lists.

        Queries build what they miss on first use; warming at load time makes the first
        client of each zone as quick as the rest.
        """
        kinds = tuple(kinds)
        n = 0
        for zone in zones:
            for kind in kinds:
                self._neighbours(zone, kind, ranking)
                n += 1
        return n

    def warming(
        self, zones: Iterable[Zone], kinds: Iterable[str], ranking: Ranking
    ) -> Iterator[None]:
        """Prepare the zones' neighbour lists one at a time, yielding after each.

        The caller spends a slice of time per step, so the lists of a large map are built
        in the loop's idle time after start-up instead of delaying it.
        """
        kinds = tuple(kinds)
        for zone in zones:
            for kind in kinds:
                self._neighbours(zone, kind, ranking)
                yield

    def _neighbours(self, zone: Zone, kind: str, ranking: Ranking) -> _Near:
        """Return the cheapest devices of the zone's cheapest floor, whatever their state."""
        version = self._all_moves if ranking.allow_other_sites else self._moves.get(zone.site, 0)
        key = (zone.id, kind, ranking)
        near = self._near.get(key)
        if near is not None and near.version == version:
            return near
        near = self._near_list(zone, kind, ranking, version)
        if len(self._near) >= NEAR_CACHE:
            self._near.clear()
        self._near[key] = near
        return near

    def _near_list(self, zone: Zone, kind: str, ranking: Ranking, version: int) -> _Near:
        """Order the first non-empty floor of the zone's plan; bound every other device."""
        plan = self._plan(zone, kind, ranking)
        first = next((i for i, p in enumerate(plan) if p[2].count), None)
        if first is None:
            return _Near(
                version, 0.0, 0.0, 0.0, array("d"), array("i"), math.inf, array("H"), 0, False
            )
        pen, site, group = plan[first]
        frame = self.frames.get(zone, site)
        arrays = group.build(self._entries)
        xs = arrays.xs
        ys = arrays.ys
        members = group.members
        n = len(members)
        if frame.is_rect:
            dist = np.sqrt(frame.bbox_distances_sq(xs, ys))
        else:
            dist = shapely.distance(frame.polygon, shapely.points(xs, ys))
        order = np.argsort(dist, kind="stable")
        bound = math.inf
        if n > NEAR_LIST:
            bound = float(dist[order[NEAR_LIST]]) + pen
            order = order[:NEAR_LIST]
        # Any device on another floor costs at least its floor's penalty plus the
        # distance from the zone's box to the floor's box.
        for other_pen, other_site, other in plan[first + 1 :]:
            if other_pen - EPSILON >= bound:
                break
            if not other.count:
                continue
            box = self.frames.get(zone, other_site).bbox
            bound = min(bound, _rect_distance(box, other.bounds) + other_pen - EPSILON)
        near = _Near(
            version,
            pen,
            frame.cx,
            frame.cy,
            array("d", dist[order].tolist()),
            array("i", [members[i] for i in order.tolist()]),
            bound,
            array("H"),
            -1,
            False,
        )
        self._refresh(near)
        return near

    def _refresh(self, near: _Near) -> None:
        """Read a list's filter words from the entries again, after changes in place."""
        entries = self._entries
        listed = [entries[slot] for slot in near.slots]
        near.words = array("H", [word_of(e) for e in listed])
        near.restricted = any(e.restrict for e in listed)
        near.words_at = self._changes

    def search(
        self, zone: Zone, kind: str, need: Need, k: int, ranking: Ranking, visible: int = -1
    ) -> list[Hit]:
        """Return what ``nearest`` returns by searching the floors, cheapest first."""
        hidden = ~visible
        mask = need_mask(need)
        paper = _need_paper(need)
        word = need_word(mask, paper, need.any_state)
        best: list[tuple[float, int, float, str, float]] = []
        frames = self.frames
        inf = math.inf
        for pen, site, group in self._plan(zone, kind, ranking):
            worst = best[-1][0] if len(best) >= k else inf
            if pen - EPSILON > worst:
                break
            if group.count == 0:
                continue
            frame = frames.get(zone, site)
            if _rect_distance(frame.bbox, group.bounds) + pen - EPSILON > worst:
                continue
            if group.count <= TINY_GROUP or group.tree is not None:
                self._search(group, frame, pen, k, best, mask, paper, need.any_state, hidden)
            else:
                self._evaluate(group, frame, pen, k, best, word, hidden)
        return [Hit(c, cd, d, p) for c, _, cd, d, p in best]

    def _evaluate(
        self,
        group: _Group,
        frame: ZoneFrame,
        pen: float,
        k: int,
        best: list[tuple[float, int, float, str, float]],
        word: int,
        hidden: int,
    ) -> None:
        """Offer a medium group's cheapest matches to ``best``, computed over its arrays."""
        arrays = group.build(self._entries)
        ok = (arrays.words & word) == word
        if hidden and arrays.restricted:
            for i, restrict in arrays.restricted.items():
                if restrict & hidden:
                    ok[i] = False
        d2 = np.where(ok, frame.bbox_distances_sq(arrays.xs, arrays.ys), np.inf)
        n = len(d2)
        inf = math.inf
        worst = best[-1][0] if len(best) >= k else inf
        if frame.is_rect:
            # The bbox distance is the cost: the k smallest, and any within a rounding of
            # the k-th (adding the penalty may make them tie), are all that can rank.
            kth = float(
                d2.min() if k == 1 else (np.partition(d2, k - 1)[k - 1] if n > k else d2.max())
            )
            limit = min(math.sqrt(kth), worst - pen) + EPSILON
            picked = np.flatnonzero(ok) if limit == inf else np.flatnonzero(d2 <= limit * limit)
        else:
            # The bbox distance only bounds the polygon's: evaluate in its order until the
            # bound passes the k-th best cost.
            picked = np.argsort(d2, kind="stable")
        members = group.members
        entries = self._entries
        cx = frame.cx
        cy = frame.cy
        is_rect = frame.is_rect
        sqrt = math.sqrt
        hypot = math.hypot
        for i, sq in zip(picked.tolist(), d2[picked].tolist(), strict=True):
            if sq == inf:
                break
            lb = sqrt(sq)
            worst = best[-1][0] if len(best) >= k else inf
            if lb + pen - EPSILON > worst:
                if is_rect:
                    continue
                break
            e = entries[members[i]]
            dist = lb if is_rect else frame.distance(e.x, e.y)
            cost = dist + pen
            if cost > worst:
                continue
            bisect.insort(best, (cost, e.state_rank, hypot(e.x - cx, e.y - cy), e.device_id, dist))
            if len(best) > k:
                best.pop()

    def _search(
        self,
        group: _Group,
        frame: ZoneFrame,
        pen: float,
        k: int,
        best: list[tuple[float, int, float, str, float]],
        mask: int,
        paper: int,
        any_state: bool,
        hidden: int,
    ) -> None:
        """Offer a tiny group's (every device) or a large group's (its rtree's) matches."""
        entries = self._entries
        hypot = math.hypot
        sqrt = math.sqrt
        inf = math.inf
        worst = best[-1][0] if len(best) >= k else inf
        bbox = frame.bbox
        minx, miny, maxx, maxy = bbox
        cx = frame.cx
        cy = frame.cy
        expected = _inside(bbox, group)
        m = max(FIRST_BATCH, 4 * k, int(expected * 1.5) + 4 if expected > 0.0 else 0)
        visited: set[int] | None = None
        # On the zone's own floor (penalty 0) of a rectangular zone, every device in
        # the zone's closed box costs exactly 0 and every other one more than 0 (no
        # penalty to round it away): when k of those inside match, a box query (about
        # half a nearest search) settles the group. Tried where many are expected.
        small = group.members if group.tree is None else None
        settle = small is None and pen == 0.0 and frame.is_rect and expected >= SETTLE_INSIDE * k
        while True:
            far = 0.0
            if small is not None:
                slots = small  # a small group: every device is evaluated
            elif settle:
                slots = _tree_ids(group.tree, bbox, 0)
            else:
                slots = _tree_ids(group.tree, bbox, m)
                # A nearest-m answer holds no device farther than one it leaves out,
                # so any returned device's bound is a bound for the rest; the last
                # one's is the tightest (they come nearest first). Filtered-out
                # devices then need no bound of their own.
                if slots:
                    last = entries[slots[-1]]
                    far = frame.bbox_distance(last.x, last.y)
            for slot in slots:
                if visited is not None:
                    if slot in visited:
                        continue
                    visited.add(slot)
                e = entries[slot]
                if not (
                    (e.mask & mask) == mask
                    and e.paper >= paper
                    and (e.available or any_state)
                    and not (e.restrict & hidden)
                ):
                    continue
                x = e.x
                y = e.y
                # ZoneFrame.bbox_distance inlined: this loop is the query's hot path.
                dx = minx - x if x < minx else (x - maxx if x > maxx else 0.0)
                dy = miny - y if y < miny else (y - maxy if y > maxy else 0.0)
                lb = sqrt(dx * dx + dy * dy)
                worst = best[-1][0] if len(best) >= k else inf
                if lb + pen - EPSILON > worst:
                    continue
                # For a rectangle the distance is the bbox distance just computed.
                dist = lb if frame.is_rect else frame.distance(x, y)
                cost = dist + pen
                if cost > worst:
                    continue
                item = (
                    cost,
                    e.state_rank,
                    hypot(x - cx, y - cy),
                    e.device_id,
                    dist,
                )
                bisect.insort(best, item)
                if len(best) > k:
                    best.pop()
            if small is not None:
                break
            if settle:
                settle = False
                if len(best) >= k and best[-1][0] == 0.0:
                    break
                visited = set(slots)
                continue
            if len(slots) < m:
                break
            worst = best[-1][0] if len(best) >= k else inf
            if far + pen - EPSILON > worst:
                break
            if visited is None:
                visited = set(slots)
            m *= 4

    def brute_force(
        self, zone: Zone, kind: str, need: Need, k: int, ranking: Ranking, visible: int = -1
    ) -> list[Hit]:
        """Return the answer by evaluating every device: the oracle for tests."""
        mask = need_mask(need)
        paper = _need_paper(need)
        scored: list[tuple[float, int, float, str, float]] = []
        for e in self._entries.values():
            if not matches(e, kind, need, mask, paper):
                continue
            if e.restrict & ~visible:
                continue
            if e.site != zone.site and not ranking.allow_other_sites:
                continue
            frame = self.frames.get(zone, e.site)
            cost, dist = cost_of(e, zone, frame, ranking)
            scored.append(
                (cost, e.state_rank, frame.centroid_distance(e.x, e.y), e.device_id, dist)
            )
        scored.sort()
        return [Hit(c, cd, d, p) for c, _, cd, d, p in scored[:k]]
