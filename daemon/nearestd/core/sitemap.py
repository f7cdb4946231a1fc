"""Site maps: GeoJSON zones and devices, local projections and the prefix table.

Parsing is pure: the caller reads the files and passes their decoded JSON (and CSV
text); every problem is collected with its file and feature id rather than raised
one at a time, so ``nearestd --check`` can list them all.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pytricia
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from nearest_wire import KINDS, PAPER_CLASSES
from nearestd.core.model import (
    Capabilities,
    Device,
    DeviceKind,
    Placement,
    PlacementMethod,
    Zone,
    compile_constructor,
)
from nearestd.core.visibility import PolicyBuilder, VisibilityPolicy, parse_visible_to

EARTH_RADIUS_M = 6371008.8
PIN_KEYS = ("uuid", "name", "host", "ip")
CAPABILITY_KEYS = {"color": bool, "duplex": bool, "paper_max": str, "adf": bool, "secure": bool}
URI_SCHEMES = ("ipp", "ipps", "http", "https", "socket", "lpd")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a site map, located by file and feature."""

    file: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}"


class SiteMapError(Exception):
    """The site maps have problems; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Projection:
    """Equirectangular projection around a site's centre: metres east and north."""

    lon0: float
    lat0: float
    # Metres per degree of longitude (at the site's latitude) and of latitude: computed
    # once, not per projected point (100,000s of them in a large map).
    kx: float = field(init=False, repr=False, compare=False)
    ky: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ky = EARTH_RADIUS_M * math.pi / 180.0
        object.__setattr__(self, "ky", ky)
        object.__setattr__(self, "kx", ky * math.cos(math.radians(self.lat0)))

    def forward(self, lon: float, lat: float) -> tuple[float, float]:
        """Project a WGS84 position to site-frame metres."""
        return ((lon - self.lon0) * self.kx, (lat - self.lat0) * self.ky)

    def inverse(self, x: float, y: float) -> tuple[float, float]:
        """Return the WGS84 position of a site-frame point."""
        return (self.lon0 + x / self.kx, self.lat0 + y / self.ky)

    def geometry(self, geom: BaseGeometry) -> BaseGeometry:
        """Project a lon/lat geometry to the site frame."""
        kx, ky, lon0, lat0 = self.kx, self.ky, self.lon0, self.lat0

        def fn(coords: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            out = np.empty_like(coords)
            out[:, 0] = (coords[:, 0] - lon0) * kx
            out[:, 1] = (coords[:, 1] - lat0) * ky
            return out

        return shapely.transform(geom, fn)


@dataclass(frozen=True, slots=True)
class Pin:
    """A site-map rule that places a discovered device matching ``field`` = ``value``."""

    field: str
    value: str
    placement: Placement
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    source: str
    feature: str
    # Visibility bits of the pin's ``visible_to`` (see core.visibility).
    restrict: int = 0
    # Where the pinned device may announce from (``subnets``); empty: the zone's subnets.
    expect: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


class PrefixTable:
    """Longest-prefix match from client IP to zone id (pytricia, IPv4 and IPv6)."""

    def __init__(self) -> None:
        self._v4 = pytricia.PyTricia(32)
        self._v6 = pytricia.PyTricia(128)

    def __len__(self) -> int:
        return len(self._v4) + len(self._v6)

    def add(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, zone_id: str) -> None:
        """Map a prefix to a zone; a later add of the same prefix replaces it."""
        self.add_key(str(network), zone_id)

    def add_key(self, key: str, zone_id: str) -> None:
        """Map a prefix in canonical text form (``str`` of an ip_network) to a zone."""
        if ":" in key:
            self._v6[key] = zone_id
        else:
            self._v4[key] = zone_id

    def lookup(self, ip: str) -> str | None:
        """Return the zone of the longest prefix containing ``ip`` (a valid address)."""
        if ":" not in ip:
            return self._v4.get(ip)  # type: ignore[no-any-return]
        low = ip.lower()
        if low.startswith("::ffff:") and "." in low:
            return self._v4.get(low[7:])  # type: ignore[no-any-return]
        return self._v6.get(ip)  # type: ignore[no-any-return]

    def items(self) -> Iterable[tuple[str, str]]:
        """Yield (prefix, zone id) pairs."""
        for tree in (self._v4, self._v6):
            for key in tree:
                yield key, tree[key]


@dataclass(slots=True)
class SiteMap:
    """Zones, sites, pins and static devices from every configured map."""

    zones: dict[str, Zone] = field(default_factory=dict)
    projections: dict[str, Projection] = field(default_factory=dict)
    levels: dict[tuple[str, str], frozenset[int]] = field(default_factory=dict)
    prefixes: PrefixTable = field(default_factory=PrefixTable)
    pins: tuple[Pin, ...] = ()
    static_devices: tuple[tuple[Device, Placement], ...] = ()
    names: dict[str, str] = field(default_factory=dict)
    visibility: VisibilityPolicy = field(default_factory=VisibilityPolicy)
    # Static devices whose ``poll`` property says whether the poller asks them.
    static_poll: dict[str, bool] = field(default_factory=dict)

    def zone_for_ip(self, ip: str) -> Zone | None:
        """Return the client's zone by longest-prefix match."""
        zid = self.prefixes.lookup(ip)
        return None if zid is None else self.zones[zid]

    def zone_for_text(self, text: str | None) -> Zone | None:
        """Return the zone whose name or alias equals ``text`` (case- and space-insensitive)."""
        if not text:
            return None
        zid = self.names.get(normalise_name(text))
        return None if zid is None else self.zones[zid]

    def placement_in_zone(self, zone: Zone, method: PlacementMethod) -> Placement:
        """Return a placement at the zone's representative point."""
        x, y = zone.representative
        lon, lat = zone.representative_lonlat
        return Placement(zone.site, zone.building, zone.level, zone.id, x, y, lon, lat, method)

    def zone_containing(
        self, site: str, building: str, level: int, x: float, y: float
    ) -> str | None:
        """Return the id of the zone on that floor that contains the point, if any."""
        pt = shapely.points(x, y)
        for zone in self.zones.values():
            if (
                zone.site == site
                and zone.building == building
                and zone.level == level
                and zone.polygon.covers(pt)
            ):
                return zone.id
        return None


def normalise_name(text: str) -> str:
    """Fold case and drop whitespace, for matching notes against zone names."""
    return "".join(text.split()).casefold()


def _cidr_list_problem(value: Any) -> str | None:
    """Return what is wrong with a ``subnets`` property's shape (entry by index), or None."""
    if not isinstance(value, list):
        return "properties.subnets: expected a list of CIDR strings"
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            return f"properties.subnets[{i}]: expected a CIDR string, got {type(entry).__name__}"
    return None


def _fid(feature: Any, index: int) -> str:
    props = feature.get("properties") if isinstance(feature, dict) else None
    fid = props.get("id") if isinstance(props, dict) else None
    if isinstance(fid, str) and fid:
        return f"feature {fid!r}"
    return f"feature #{index}"


_NUMBER = (int, float)


def _check_coords(coords: Any, depth: int) -> str | None:
    """Return a problem with nested GeoJSON positions, or None."""
    if depth == 0:
        # The common case, a plain [lon, lat] of JSON numbers within range, without the
        # general checks below (which decide everything else, with their messages).
        if type(coords) is list and len(coords) == 2:
            lon, lat = coords
            if (
                type(lon) in _NUMBER
                and type(lat) in _NUMBER
                and -180.0 <= lon <= 180.0
                and -90.0 <= lat <= 90.0
            ):
                return None
        if (
            not isinstance(coords, list)
            or len(coords) < 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coords)
        ):
            return "a position must be [longitude, latitude]"
        lon, lat = coords[0], coords[1]
        if not (math.isfinite(lon) and math.isfinite(lat)):
            return "coordinates must be finite numbers"
        if not -180.0 <= lon <= 180.0:
            return f"longitude {lon} outside WGS84 range -180..180"
        if not -90.0 <= lat <= 90.0:
            return f"latitude {lat} outside WGS84 range -90..90"
        return None
    if not isinstance(coords, list) or not coords:
        return "coordinates are empty or not nested as the geometry type requires"
    for item in coords:
        err = _check_coords(item, depth - 1)
        if err:
            return err
    return None


class _Floors:
    """Zones by floor with their bounding boxes: ``SiteMap.zone_containing`` without the scan."""

    def __init__(self, zones: Iterable[Zone]) -> None:
        self._floors: dict[
            tuple[str, str, int], list[tuple[float, float, float, float, bool, Zone]]
        ] = {}
        listed = list(zones)
        polygons = np.array([zone.polygon for zone in listed], dtype=object)
        # Every polygon at once: one call each instead of thousands of per-zone calls.
        bounds = shapely.bounds(polygons).reshape(-1, 4)
        boxes = _are_boxes(polygons, bounds)
        for zone, (minx, miny, maxx, maxy), box in zip(
            listed, bounds.tolist(), boxes.tolist(), strict=True
        ):
            self._floors.setdefault((zone.site, zone.building, zone.level), []).append(
                (minx, miny, maxx, maxy, box, zone)
            )

    def zone_containing(
        self, site: str, building: str, level: int, x: float, y: float
    ) -> str | None:
        """Return the first zone (in map order) on that floor that covers the point."""
        for minx, miny, maxx, maxy, box, zone in self._floors.get((site, building, level), ()):
            if x < minx or x > maxx or y < miny or y > maxy:
                continue
            # For one point, intersecting a polygon is covering it (boundary included).
            if box or shapely.intersects_xy(zone.polygon, x, y):
                return zone.id
        return None


def _shared(text: str) -> str:
    """Return the one interned copy of a string many devices repeat (site, model, ...)."""
    return sys.intern(text)


def _are_boxes(
    polygons: np.ndarray[Any, Any], bounds: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """Return, per valid polygon, whether it is exactly its bounding box.

    That is: a Polygon without holes whose every vertex is a corner of its bounds.
    """
    simple: np.ndarray[Any, Any] = (
        shapely.get_type_id(polygons) == shapely.GeometryType.POLYGON
    ) & (shapely.get_num_interior_rings(polygons) == 0)
    boxes: np.ndarray[Any, Any] = simple.copy()
    if not simple.any():
        return boxes
    rings = shapely.get_exterior_ring(polygons[simple])
    coords, owner = shapely.get_coordinates(rings, return_index=True)
    edges = bounds[simple][owner]
    on_corner = ((coords[:, 0] == edges[:, 0]) | (coords[:, 0] == edges[:, 2])) & (
        (coords[:, 1] == edges[:, 1]) | (coords[:, 1] == edges[:, 3])
    )
    off = np.bincount(owner[~on_corner], minlength=len(rings))
    boxes[simple] = off == 0
    return boxes


_KIND_OF = {kind.value: kind for kind in DeviceKind}
_SCHEMES = frozenset(URI_SCHEMES)
_new_static = compile_constructor(Device, "id", "kind", "name", "uri", "make_model", "capabilities")
_new_placement = compile_constructor(Placement, *(f.name for f in fields(Placement)))
_NO_CAPS = Capabilities()
# Distinct capability objects remembered; a map with more is validated the slow way.
_KNOWN_CAPS_MAX = 4096


def _caps_key(caps: Any) -> tuple[Any, ...] | None:
    """Return what identifies a ``capabilities`` object among those seen, or None.

    The types are part of the key: True == 1 == 1.0 in Python, and a cache keyed by the
    items alone would take {"color": 1} for {"color": True}.
    """
    if type(caps) is not dict:
        return None
    key = (*caps.items(), *map(type, caps.values()))
    try:
        hash(key)
    except TypeError:  # a list or an object as a value: never valid, never cached
        return None
    return key


# A property that is absent (where absent and null mean different things).
_MISSING: Any = object()


class _Builder:
    """Collects features from several files, then validates them as a whole."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.raw_zones: list[tuple[str, str, dict[str, Any], BaseGeometry]] = []
        # (file, feature, properties, lon, lat, for a static device the device or None if
        # invalid and the problems found validating it; for a pin None, None). A static
        # device keeps only what placement and visibility read of its properties: (site,
        # building, level, visible_to, poll), the last two _MISSING when absent; and "" for
        # its feature when it is valid. Flat: one tuple per device, 100,000s of them until build().
        self.raw_devices: list[
            tuple[
                str,
                str,
                dict[str, Any] | tuple[Any, ...],
                float,
                float,
                Device | None,
                tuple[Problem, ...] | None,
            ]
        ] = []
        # (file, CSV line number, prefix, zone id): the line's text is made only when needed.
        self.extra_prefixes: list[tuple[str, int, str, str]] = []
        self.policy = PolicyBuilder()
        self.floors: _Floors | None = None
        # One object per distinct capability set: thousands of devices share a few.
        self.capabilities: dict[Capabilities, Capabilities] = {}
        # A valid ``capabilities`` object (by _caps_key) -> its Capabilities: a repeated
        # one is not validated key by key again.
        self.known_caps: dict[tuple[Any, ...] | None, Capabilities] = {}

    def problem(self, file: str, where: str, message: str) -> None:
        self.problems.append(Problem(file, where, message))

    def add_geojson(self, file: str, doc: Any) -> None:
        if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
            self.problem(file, "top level", "expected a GeoJSON FeatureCollection")
            return
        features = doc.get("features")
        if not isinstance(features, list):
            self.problem(file, "features", "expected a list of features")
            return
        for i, feat in enumerate(features):
            if not isinstance(feat, dict) or feat.get("type") != "Feature":
                self.problem(file, _fid(feat, i), "expected a GeoJSON Feature")
                continue
            props = feat.get("properties")
            if not isinstance(props, dict):
                self.problem(file, _fid(feat, i), "properties: expected an object")
                continue
            ftype = props.get("feature_type")
            geom = feat.get("geometry")
            if ftype == "device":
                self._device(file, feat, i, props, geom)
            elif ftype == "zone":
                self._zone(file, _fid(feat, i), props, geom)
            else:
                where = _fid(feat, i)
                self.problem(
                    file,
                    where,
                    f"properties.feature_type: expected 'zone' or 'device', got {ftype!r}",
                )

    def _zone(self, file: str, where: str, props: dict[str, Any], geom: Any) -> None:
        if not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
            self.problem(file, where, "geometry: a zone needs a Polygon or MultiPolygon")
            return
        depth = 2 if geom["type"] == "Polygon" else 3
        err = _check_coords(geom.get("coordinates"), depth)
        if err:
            self.problem(file, where, f"geometry: {err}")
            return
        rings = [geom["coordinates"]] if depth == 2 else geom["coordinates"]
        for poly in rings:
            for ring in poly:
                if len(ring) < 4 or ring[0][:2] != ring[-1][:2]:
                    self.problem(
                        file,
                        where,
                        "geometry: each ring needs 4 or more positions and must be closed",
                    )
                    return
        try:
            g = shape(geom)
        except (ValueError, TypeError, shapely.errors.GEOSException) as exc:
            self.problem(file, where, f"geometry: {exc}")
            return
        if not g.is_valid:
            self.problem(file, where, f"geometry: invalid polygon ({explain_validity(g)})")
            return
        if g.is_empty or g.area <= 0:
            self.problem(file, where, "geometry: polygon has no area")
            return
        ok = True
        for key in ("id", "site", "building", "name"):
            val = props.get(key)
            if not isinstance(val, str) or not val.strip():
                self.problem(file, where, f"properties.{key}: expected a non-empty string")
                ok = False
        level = props.get("level")
        if not isinstance(level, int) or isinstance(level, bool):
            self.problem(file, where, "properties.level: expected an integer (0 = ground floor)")
            ok = False
        aliases = props.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            self.problem(file, where, "properties.aliases: expected a list of strings")
            ok = False
        problem = _cidr_list_problem(props.get("subnets", []))
        if problem is not None:
            self.problem(file, where, problem)
            ok = False
        if "visible_to" in props and parse_visible_to(props["visible_to"])[2] is not None:
            self.problem(
                file, where, f"properties.visible_to: {parse_visible_to(props['visible_to'])[2]}"
            )
            ok = False
        if ok:
            self.raw_zones.append((file, where, props, g))

    def _device(self, file: str, feat: Any, index: int, props: dict[str, Any], geom: Any) -> None:
        if not isinstance(geom, dict) or geom.get("type") != "Point":
            self.problem(file, _fid(feat, index), "geometry: a device needs a Point")
            return
        err = _check_coords(geom.get("coordinates"), 0)
        if err:
            self.problem(file, _fid(feat, index), f"geometry: {err}")
            return
        lon, lat = geom["coordinates"][:2]
        if props.get("static") is True:
            # Validate a static device now, keeping only what placement needs: otherwise
            # every device's raw properties (100,000s of dicts) are held until build().
            # No ``where`` text, no problem list and no dict per valid device: with
            # 100,000s of them these held tens of MB until build() (``where`` is rebuilt
            # there when needed).
            device = self._static_fast(props)
            problems: tuple[Problem, ...] = ()
            where = ""
            if device is None:
                # Its problems are set aside and reported where they always were.
                where = _fid(feat, index)
                held, self.problems = self.problems, []
                device = self._static_checked(file, where, props)
                problems = tuple(self.problems)
                self.problems = held
            get = props.get
            kept = (
                get("site"),
                get("building"),
                get("level"),
                get("visible_to", _MISSING),
                get("poll", _MISSING),
            )
            self.raw_devices.append(
                (file, "" if device else where, kept, float(lon), float(lat), device, problems)
            )
            return
        where = _fid(feat, index)
        self.raw_devices.append((file, where, props, float(lon), float(lat), None, None))

    def add_csv(self, file: str, text: str) -> None:
        # Spreadsheet exports often begin with a UTF-8 byte-order mark.
        reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["prefix", "zone_id"]:
            self.problem(file, "line 1", "expected the header 'prefix,zone_id'")
            return
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                self.problem(file, f"line {lineno}", "expected two fields: prefix,zone_id")
                continue
            self.extra_prefixes.append((file, lineno, row[0].strip(), _shared(row[1].strip())))

    def build(self) -> SiteMap:
        sm = SiteMap()
        # Sites and their projections come from the zones' extent.
        extents: dict[str, list[float]] = {}
        seen_ids: dict[str, str] = {}
        zones_ok: list[tuple[str, str, dict[str, Any], BaseGeometry]] = []
        for file, where, props, g in self.raw_zones:
            zid = props["id"]
            if zid in seen_ids:
                self.problem(
                    file,
                    where,
                    f"properties.id: duplicate zone id {zid!r} (also in {seen_ids[zid]})",
                )
                continue
            seen_ids[zid] = file
            zones_ok.append((file, where, props, g))
            minx, miny, maxx, maxy = g.bounds
            ext = extents.setdefault(props["site"], [0.0, 0.0, 0.0])
            ext[0] += (minx + maxx) / 2
            ext[1] += (miny + maxy) / 2
            ext[2] += 1
        for site, (sx, sy, n) in extents.items():
            sm.projections[site] = Projection(sx / n, sy / n)
        levels: dict[tuple[str, str], set[int]] = {}
        prefix_owner: dict[str, tuple[str, str]] = {}
        for file, where, props, g in zones_ok:
            proj = sm.projections[props["site"]]
            poly = proj.geometry(g)
            if isinstance(poly, Polygon | MultiPolygon):
                rep = poly.representative_point()
                cen = poly.centroid
            else:  # pragma: no cover - shape() of a Polygon is a polygon
                continue
            zone = Zone(
                id=props["id"],
                site=props["site"],
                building=props["building"],
                level=props["level"],
                name=props["name"],
                aliases=tuple(props.get("aliases", [])),
                subnets=tuple(props.get("subnets", [])),
                polygon=poly,
                centroid=(cen.x, cen.y),
                representative=(rep.x, rep.y),
                representative_lonlat=proj.inverse(rep.x, rep.y),
                source=file,
            )
            shapely.prepare(poly)
            sm.zones[zone.id] = zone
            levels.setdefault((zone.site, zone.building), set()).add(zone.level)
            for text in (zone.name, *zone.aliases):
                key = normalise_name(text)
                other = sm.names.get(key)
                if other is not None and other != zone.id:
                    self.problem(file, where, f"name or alias {text!r} also names zone {other!r}")
                sm.names[key] = zone.id
            for i, cidr in enumerate(zone.subnets):
                err = self._add_prefix(sm, prefix_owner, file, cidr, zone.id)
                if err is not None:
                    self.problem(file, where, f"properties.subnets[{i}]: {err}")
        zones = sm.zones
        for file, lineno, cidr, zid in self.extra_prefixes:
            known = zones.get(zid)
            if known is None:
                self.problem(file, f"line {lineno}", f"zone_id: unknown zone {zid!r}")
                continue
            # The zone's own id string, not the CSV's: one copy, not one per prefix.
            err = self._add_prefix(sm, prefix_owner, file, cidr, known.id)
            if err is not None:
                self.problem(file, f"line {lineno}", f"prefix: {err}")
        sm.levels = {k: frozenset(v) for k, v in levels.items()}
        for file, where, props, _ in zones_ok:
            if "visible_to" in props and props["id"] in sm.zones:
                bits = self._visibility(sm, file, where, props["visible_to"])
                if bits:
                    self.policy.zone_rules[props["id"]] = bits
        self._devices(sm)
        sm.visibility = self.policy.build({z.id: z.subnets for z in sm.zones.values()})
        for rows in (prefix_owner, zones_ok, seen_ids):
            _drain(rows)
        return sm

    def discard(self) -> None:
        """Drop what was collected, a slice at a time (see ``_drain``)."""
        for rows in (self.extra_prefixes, self.raw_devices, self.raw_zones):
            _drain(rows)

    def _visibility(self, sm: SiteMap, file: str, where: str, value: Any) -> int:
        """Return the rule bits of a ``visible_to`` property, reporting unknown zones."""
        zones, nets, err = parse_visible_to(value)
        if err is not None:
            self.problem(file, where, f"properties.visible_to: {err}")
            return 0
        unknown = [z for z in zones if z not in sm.zones]
        if unknown:
            self.problem(
                file,
                where,
                f"properties.visible_to: unknown zone {unknown[0]!r} (not a CIDR either)",
            )
            return 0
        return self.policy.add(zones, nets)

    @staticmethod
    def _add_prefix(
        sm: SiteMap, owner: dict[str, tuple[str, str]], file: str, cidr: str, zid: str
    ) -> str | None:
        """Give a prefix to a zone; return what is wrong with it instead, or None.

        The caller words where (a zone's ``subnets`` entry, a CSV line): its text is made
        only for a problem, not for each of 100,000s of prefixes.
        """
        key = _canonical_v4(cidr) or _canonical_v6(cidr)
        if key is None:
            try:
                key = str(ipaddress.ip_network(cidr, strict=True))
            except ValueError as exc:
                return f"bad CIDR {cidr!r} ({exc})"
        prev = owner.get(key)
        if prev is not None and prev[0] != zid:
            return f"prefix {key} is given to zone {zid!r} and to zone {prev[0]!r} ({prev[1]})"
        owner[key] = (zid, file)
        sm.prefixes.add_key(key, zid)
        return None

    def _placement(
        self,
        sm: SiteMap,
        file: str,
        where: str,
        site: Any,
        building: Any,
        level: Any,
        lonlat: tuple[float, float],
        method: PlacementMethod,
    ) -> Placement | None:
        if not isinstance(site, str) or site not in sm.projections:
            self.problem(file, where, f"properties.site: unknown site {site!r} (no zone has it)")
            return None
        if not isinstance(building, str) or (site, building) not in sm.levels:
            self.problem(
                file, where, f"properties.building: site {site!r} has no building {building!r}"
            )
            return None
        if not isinstance(level, int) or isinstance(level, bool):
            self.problem(file, where, "properties.level: expected an integer")
            return None
        if level not in sm.levels[(site, building)]:
            have = ", ".join(str(v) for v in sorted(sm.levels[(site, building)]))
            self.problem(
                file,
                where,
                f"properties.level: building {building!r} has no level {level} (it has {have})",
            )
            return None
        return self._place(sm, site, building, level, lonlat, method)

    def _place(
        self,
        sm: SiteMap,
        site: str,
        building: str,
        level: int,
        lonlat: tuple[float, float],
        method: PlacementMethod,
    ) -> Placement:
        """Return the placement at a position on a floor that ``_placement`` accepted."""
        lon, lat = lonlat
        x, y = sm.projections[site].forward(lon, lat)
        if self.floors is None:
            self.floors = _Floors(sm.zones.values())
        zone = self.floors.zone_containing(site, building, level, x, y)
        return _new_placement(_shared(site), _shared(building), level, zone, x, y, lon, lat, method)

    def _devices(self, sm: SiteMap) -> None:
        pins: list[Pin] = []
        statics: list[tuple[Device, Placement]] = []
        static_ids: dict[str, str] = {}
        levels = sm.levels
        static_method = PlacementMethod.STATIC
        for file, where, raw, lon, lat, dev, problems in self.raw_devices:
            lonlat = (lon, lat)
            if problems is not None:
                self.problems.extend(problems)
                if dev is None:
                    continue
                # As _fid() wrote it: a valid static device's id is a non-empty string.
                # Written out only where a problem needs it: most devices have none.
                where = ""
                assert isinstance(raw, tuple)  # a static device keeps only these
                site, building, level, visible_to, poll = raw
                if dev.id in static_ids:
                    where = f"feature {dev.id!r}"
                    self.problem(file, where, f"properties.id: duplicate device id {dev.id!r}")
                    continue
                # The common case, a known floor, first: _placement words any problem.
                floors = (
                    levels.get((site, building))
                    if type(site) is str and type(building) is str
                    else None
                )
                if floors is not None and type(level) is int and level in floors:
                    place = self._place(sm, site, building, level, lonlat, static_method)
                else:
                    where = f"feature {dev.id!r}"
                    found = self._placement(
                        sm, file, where, site, building, level, lonlat, static_method
                    )
                    if found is None:
                        continue
                    place = found
                static_ids[dev.id] = file
                statics.append((dev, place))
                if poll is not _MISSING:
                    sm.static_poll[dev.id] = poll
                if visible_to is not _MISSING:
                    where = f"feature {dev.id!r}"
                    bits = self._visibility(sm, file, where, visible_to)
                    if bits:
                        self.policy.device_rules[dev.id] = bits
                continue
            assert isinstance(raw, dict)  # a pin keeps its properties whole
            props = raw
            if "static" in props and props["static"] is not False:
                self.problem(file, where, "properties.static: expected true or false")
                continue
            match = props.get("match")
            if not isinstance(match, dict) or len(match) != 1:
                self.problem(
                    file,
                    where,
                    "properties.match: expected an object with exactly one of uuid, name, host, ip",
                )
                continue
            ((key, value),) = match.items()
            if key not in PIN_KEYS or not isinstance(value, str) or not value:
                self.problem(
                    file,
                    where,
                    f"properties.match.{key}: expected one of uuid, name, host, ip with a string value",
                )
                continue
            network = None
            if key == "ip":
                try:
                    network = ipaddress.ip_network(value, strict=False)
                except ValueError:
                    self.problem(file, where, f"properties.match.ip: bad address or CIDR {value!r}")
                    continue
            pin_place = self._placement(
                sm,
                file,
                where,
                props.get("site"),
                props.get("building"),
                props.get("level"),
                lonlat,
                PlacementMethod.PIN,
            )
            if pin_place is None:
                continue
            restrict = 0
            if "visible_to" in props:
                restrict = self._visibility(sm, file, where, props["visible_to"])
            expect: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
            raw_expect = props.get("subnets", [])
            problem = _cidr_list_problem(raw_expect)
            if problem is not None:
                self.problem(file, where, problem)
                continue
            bad = False
            for i, c in enumerate(raw_expect):
                try:
                    expect.append(ipaddress.ip_network(c, strict=False))
                except ValueError as exc:
                    self.problem(file, where, f"properties.subnets[{i}]: bad CIDR {c!r} ({exc})")
                    bad = True
            if bad:
                continue
            pins.append(
                Pin(
                    key,
                    normalise_pin(key, value),
                    pin_place,
                    network,
                    file,
                    where,
                    restrict,
                    tuple(expect),
                )
            )
        sm.pins = tuple(pins)
        sm.static_devices = tuple(statics)

    def _static_fast(self, props: dict[str, Any]) -> Device | None:
        """Return the Device of a static device in the common case, else None (undecided).

        The common case, every value of its expected type and a ``capabilities`` object
        seen before, is recognised with a few exact type tests; ``_static_checked`` decides
        anything else and words its problems.
        """
        get = props.get
        dev_id, name, uri, kind = get("id"), get("name"), get("uri"), get("kind")
        make_model = get("make_model", "")
        poll = get("poll", False)
        if (
            type(dev_id) is str
            and type(name) is str
            and type(uri) is str
            and type(make_model) is str
            and type(poll) is bool
            and type(kind) is str
            and kind in _KIND_OF
            and dev_id.strip()
            and name.strip()
            and uri.strip()
            and uri.partition(":")[0] in _SCHEMES
        ):
            caps = get("capabilities", _MISSING)
            capabilities = _NO_CAPS if caps is _MISSING else self.known_caps.get(_caps_key(caps))
            if capabilities is not None:
                return _new_static(
                    dev_id, _KIND_OF[kind], name, uri, _shared(make_model), capabilities
                )
        return None

    def _static_checked(self, file: str, where: str, props: dict[str, Any]) -> Device | None:
        """Validate a static device's properties one by one, recording each problem."""
        ok = True
        for key in ("id", "name", "uri"):
            if not isinstance(props.get(key), str) or not props[key].strip():
                self.problem(file, where, f"properties.{key}: expected a non-empty string")
                ok = False
        kind = props.get("kind")
        if kind not in KINDS:
            self.problem(
                file, where, f"properties.kind: expected 'printer' or 'scanner', got {kind!r}"
            )
            ok = False
        uri = props.get("uri")
        if isinstance(uri, str) and uri.split(":", 1)[0] not in URI_SCHEMES:
            self.problem(
                file, where, f"properties.uri: scheme must be one of {', '.join(URI_SCHEMES)}"
            )
            ok = False
        if "poll" in props and not isinstance(props["poll"], bool):
            self.problem(file, where, "properties.poll: expected true or false")
            ok = False
        make_model = props.get("make_model", "")
        if not isinstance(make_model, str):
            self.problem(file, where, "properties.make_model: expected a string")
            ok = False
        caps = props.get("capabilities", {})
        parsed: dict[str, Any] = {}
        if not isinstance(caps, dict):
            self.problem(file, where, "properties.capabilities: expected an object")
            ok = False
        else:
            for key, val in caps.items():
                typ = CAPABILITY_KEYS.get(key)
                if typ is None:
                    known = ", ".join(CAPABILITY_KEYS)
                    self.problem(
                        file,
                        where,
                        f"properties.capabilities.{key}: unknown capability (known: {known})",
                    )
                    ok = False
                elif key == "paper_max":
                    if val not in PAPER_CLASSES:
                        self.problem(
                            file,
                            where,
                            f"properties.capabilities.paper_max: expected one of {', '.join(PAPER_CLASSES)}",
                        )
                        ok = False
                    else:
                        parsed[key] = PAPER_CLASSES[PAPER_CLASSES.index(val)]
                elif not isinstance(val, bool):
                    self.problem(
                        file, where, f"properties.capabilities.{key}: expected true or false"
                    )
                    ok = False
                else:
                    parsed[key] = val
        if not ok:
            return None
        capabilities = Capabilities(**parsed)
        capabilities = self.capabilities.setdefault(capabilities, capabilities)
        seen = _caps_key(caps)
        if seen is not None and len(self.known_caps) < _KNOWN_CAPS_MAX:
            self.known_caps[seen] = capabilities
        return Device(
            id=props["id"],
            kind=DeviceKind(str(kind)),
            name=props["name"],
            uri=props["uri"],
            make_model=_shared(make_model),
            capabilities=capabilities,
            source="static",
        )


# Decimal text without leading zeros, as ipaddress accepts it: octets and prefix lengths.
_OCTETS = {str(i): i for i in range(256)}
_LENGTHS = {str(n): n for n in range(33)}


def _canonical_v4(cidr: str) -> str | None:
    """Return a plain, valid IPv4 CIDR as is; None for anything else (ipaddress decides).

    The common case of a large IPAM export, parsed without building ipaddress objects;
    whatever this does not accept goes through ipaddress, whose message is the one shown.
    """
    addr, _, length = cidr.partition("/")
    n = _LENGTHS.get(length)
    parts = addr.split(".")
    if n is None or len(parts) != 4:
        return None
    octet = _OCTETS.get
    a, b, c, d = octet(parts[0]), octet(parts[1]), octet(parts[2]), octet(parts[3])
    if a is None or b is None or c is None or d is None:
        return None
    if (a << 24 | b << 16 | c << 8 | d) & ((1 << (32 - n)) - 1):
        return None
    return cidr


_LENGTHS_V6 = {str(n): n for n in range(129)}
_HEX = frozenset("0123456789abcdefABCDEF")


def _canonical_v6(cidr: str) -> str | None:
    """Return a plain IPv6 CIDR in ipaddress's text form; None for anything else.

    The common case of an IPAM export's IPv6 prefixes, without ipaddress objects (9 us
    each): hextets, at most one ``::``, a prefix length. Embedded IPv4, scopes and
    whatever else this does not take go through ipaddress, which decides and words them.
    """
    addr, _, length = cidr.partition("/")
    n = _LENGTHS_V6.get(length)
    if n is None or "." in addr or "%" in addr:
        return None
    head, gap, tail = addr.partition("::")
    left = head.split(":") if head else []
    right = tail.split(":") if tail else []
    if gap:
        if "::" in tail or len(left) + len(right) > 7:
            return None
        groups = [*left, *("0" * (8 - len(left) - len(right))), *right]
    elif len(left) == 8:
        groups = left
    else:
        return None
    value = 0
    for group in groups:
        if not 0 < len(group) <= 4 or not _HEX.issuperset(group):
            return None
        value = value << 16 | int(group, 16)
    if value & ((1 << (128 - n)) - 1):
        return None
    hextets = [f"{(value >> shift) & 0xFFFF:x}" for shift in range(112, -16, -16)]
    # The longest run of two or more zero hextets (the first of equals) becomes "::".
    best, best_len, start = -1, 1, -1
    for i, hextet in enumerate(hextets):
        if hextet != "0":
            start = -1
            continue
        if start < 0:
            start = i
        if i - start + 1 > best_len:
            best, best_len = start, i - start + 1
    if best >= 0:
        end = best + best_len
        hextets[best:end] = [""]
        if end == 8:
            hextets.append("")
        if best == 0:
            hextets.insert(0, "")
    text = ":".join(hextets)
    # ipaddress may write an IPv4-mapped address its own way: it decides those.
    return None if text.startswith("::ffff:") else f"{text}/{n}"


def normalise_pin(key: str, value: str) -> str:
    """Normalise a pin's or a device's identifier for comparison."""
    value = value.strip()
    if key == "uuid":
        value = value.lower()
        return value[9:] if value.startswith("urn:uuid:") else value
    if key == "host":
        value = value.lower().rstrip(".")
        return value[:-6] if value.endswith(".local") else value
    if key == "name":
        return value.casefold()
    return value


def build_sitemap(
    geojson: Iterable[tuple[str, Any]], csvs: Sequence[tuple[str, str]] = ()
) -> SiteMap:
    """Validate and combine decoded site maps; raise SiteMapError listing every problem."""
    builder = _Builder()
    for file, doc in geojson:
        builder.add_geojson(file, doc)
    for file, text in csvs:
        builder.add_csv(file, text)
    sm = builder.build()
    if builder.problems:
        raise SiteMapError(builder.problems)
    builder.discard()
    return sm


def _drain(rows: list[Any] | dict[Any, Any]) -> None:
    """Empty a large list or dict a slice at a time.

    Freeing 100,000 rows in one go holds the GIL for 50-100 ms; a reload builds its map
    in a worker thread, and this lets the event loop's thread take the GIL between slices.
    """
    if isinstance(rows, dict):
        while rows:
            for _ in range(min(len(rows), 512)):
                rows.popitem()
    else:
        while rows:
            del rows[-512:]
