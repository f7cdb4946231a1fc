"""Exact k-nearest devices under the contract's cost, with rtree pruning.

Theory of operation. A device D answers a client in zone Z at

    cost = dist(D, Z.polygon) + |D.level - Z.level| * floor_penalty
           + (D.building != Z.building) * building_penalty

The penalty is constant for all devices on one (site, building, level), so devices
are grouped that way, one rtree per (site, kind, building, level). Groups are
visited in increasing penalty. Inside a group the rtree yields devices in order of
distance to Z's bounding box, which never exceeds the distance to Z's polygon, so
``bbox distance + penalty`` is a lower bound of the cost. A group (or the rest of
one) is skipped only when that bound is strictly above the k-th best cost found so
far: equal costs are still visited because the tie-breaks (state: idle before
processing or unknown; then distance to Z's centroid; then device id) may prefer
them. Capability filters are applied to the
candidates; when a batch runs out before the bound proves the answer, the batch is
enlarged. The result is therefore exactly the brute-force answer, which
``brute_force`` computes with the same distance function and which the tests
compare against.
"""

from __future__ import annotations

import bisect
import ctypes
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import shapely
from rtree import core as rtree_core
from rtree import index as rtree_index
from shapely.geometry.base import BaseGeometry

from nearest_wire import PAPER_CLASSES, Need
from nearestd.core.model import Zone
from nearestd.core.sitemap import Projection

COLOR, DUPLEX, ADF, SECURE = 1, 2, 4, 8
# Slack for the pruning bound: bbox distances are computed differently from GEOS's
# polygon distances, and a last-bit difference must not prune a tying device.
EPSILON = 1e-6
# Devices asked of a group's rtree at first; enlarged fourfold while the bound is unproven.
FIRST_BATCH = 8
# Expected devices per answer wanted in the zone's box before the box query is tried first.
SETTLE_INSIDE = 2.0
# A floor with at most this many devices of a kind keeps them in a list that queries scan
# whole (cheaper than an rtree search at that size; an rtree costs ~17 KB even when
# nearly empty); past twice as many they move into an rtree.
SMALL_GROUP = 32


@dataclass(frozen=True, slots=True)
class Ranking:
    """The ranking parameters of the contract."""

    floor_penalty_m: float = 20.0
    building_penalty_m: float = 100.0
    allow_other_sites: bool = False


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


@dataclass(frozen=True, slots=True)
class Hit:
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
        if dx == 0.0:
            return dy
        if dy == 0.0:
            return dx
        return math.hypot(dx, dy)

    def distance(self, x: float, y: float) -> float:
        """Return the planar distance from the point to the polygon (0 inside)."""
        if self.is_rect:
            return self.bbox_distance(x, y)
        return float(shapely.distance(self.polygon, shapely.points(x, y)))

    def centroid_distance(self, x: float, y: float) -> float:
        """Return the distance from the point to the zone's centroid."""
        return math.hypot(x - self.cx, y - self.cy)


def _reproject(geom: BaseGeometry, src: Projection, dst: Projection) -> BaseGeometry:
    import numpy as np

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
    """One (site, kind, building, level): its devices in a list while few, else an rtree."""

    __slots__ = ("bounds", "count", "small", "tree")

    def __init__(self, small: list[int] | None = None, tree: Any = None) -> None:
        # Exactly one of the two holds the group's slots.
        self.small = small if tree is not None or small is not None else []
        self.tree = tree
        self.count = 0 if self.small is None else len(self.small)
        self.bounds = [math.inf, math.inf, -math.inf, -math.inf]

    def insert(self, slot: int, x: float, y: float, entries: dict[int, Entry]) -> None:
        """Add a device, moving the group into an rtree once it outgrows a list."""
        if self.small is not None:
            self.small.append(slot)
            if len(self.small) > 2 * SMALL_GROUP:
                self.tree = _new_tree(
                    (s, (entries[s].x, entries[s].y, entries[s].x, entries[s].y), None)
                    for s in self.small
                )
                self.small = None
        else:
            self.tree.insert(slot, (x, y, x, y))
        self.count += 1
        self.grow(x, y)

    def delete(self, slot: int, x: float, y: float) -> None:
        """Remove a device."""
        if self.small is not None:
            self.small.remove(slot)
        else:
            self.tree.delete(slot, (x, y, x, y))
        self.count -= 1

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
            group = self._groups[key] = _Group()
            self._plans.clear()
            self._by_site_kind.setdefault((entry.site, entry.kind), []).append(
                (entry.building, entry.level)
            )
        return group

    def bulk_load(self, entries: Iterable[Entry]) -> None:
        """Load many entries at once into an empty index (stream bulk loading)."""
        if self._entries:
            raise ValueError("bulk_load needs an empty index")
        by_group: dict[tuple[str, str, str, int], list[tuple[int, Entry]]] = {}
        for entry in entries:
            if entry.device_id in self._slot_of:
                raise ValueError(f"duplicate device id {entry.device_id!r}")
            slot = self._next_slot
            self._next_slot += 1
            self._entries[slot] = entry
            self._slot_of[entry.device_id] = slot
            key = (entry.site, entry.kind, entry.building, entry.level)
            by_group.setdefault(key, []).append((slot, entry))
        for key, items in by_group.items():
            if len(items) <= SMALL_GROUP:
                group = _Group(small=[slot for slot, _ in items])
            else:
                stream = ((slot, (e.x, e.y, e.x, e.y), None) for slot, e in items)
                group = _Group(tree=_new_tree(stream))
                group.count = len(items)
            for _, e in items:
                group.grow(e.x, e.y)
            self._groups[key] = group
            self._by_site_kind.setdefault((key[0], key[1]), []).append((key[2], key[3]))
        self._plans.clear()

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
                return
            self.remove(entry.device_id)
        slot = self._next_slot
        self._next_slot += 1
        self._entries[slot] = entry
        self._slot_of[entry.device_id] = slot
        self._group(entry).insert(slot, entry.x, entry.y, self._entries)

    def remove(self, device_id: str) -> None:
        """Remove a device if indexed."""
        slot = self._slot_of.pop(device_id, None)
        if slot is None:
            return
        entry = self._entries.pop(slot)
        key = (entry.site, entry.kind, entry.building, entry.level)
        self._groups[key].delete(slot, entry.x, entry.y)

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
        hidden = ~visible
        mask = need_mask(need)
        paper = _need_paper(need)
        any_state = need.any_state
        best: list[tuple[float, int, float, str, float]] = []
        entries = self._entries
        frames = self.frames
        hypot = math.hypot
        inf = math.inf
        for pen, site, group in self._plan(zone, kind, ranking):
            worst = best[-1][0] if len(best) >= k else inf
            if pen - EPSILON > worst:
                break
            if group.count == 0:
                continue
            frame = frames.get(zone, site)
            bbox = frame.bbox
            if _rect_distance(bbox, group.bounds) + pen - EPSILON > worst:
                continue
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
            small = group.small
            settle = (
                small is None and pen == 0.0 and frame.is_rect and expected >= SETTLE_INSIDE * k
            )
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
                    lb = dy if dx == 0.0 else (dx if dy == 0.0 else hypot(dx, dy))
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
        return [Hit(c, cd, d, p) for c, _, cd, d, p in best]

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
