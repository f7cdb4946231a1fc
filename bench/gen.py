"""Generators of large synthetic sites: GeoJSON site maps, an IPAM CSV and a device set.

The world is deterministic for a given seed: ``sites`` campuses far apart, each with
buildings laid out on a grid, 2-6 levels per building, a grid of rectangular rooms per
level (about 5% L-shaped, so the exact polygon-distance path is exercised too), IPv4
prefixes from /24 to /28 (a few /28s nested inside another zone's /24, as printer
VLANs are) and IPv6 /64s, and static devices (80% printers, 20% scanners) with varied
capabilities placed inside rooms.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EARTH_RADIUS_M = 6371008.8
KY = EARTH_RADIUS_M * math.pi / 180.0  # metres per degree of latitude

PRINTER_MODELS = (
    "HP LaserJet Enterprise M611",
    "Brother HL-L8360CDW",
    "Canon imageRUNNER ADVANCE C3530i",
    "Kyocera ECOSYS P3145dn",
    "Xerox VersaLink C405",
    "Lexmark MS826de",
)
SCANNER_MODELS = ("Fujitsu fi-7160", "Canon DR-C225 II", "Epson DS-790WN", "Brother ADS-4900W")


@dataclass(frozen=True, slots=True)
class GenZone:
    """A generated zone: ids, floor, the room's rectangle in lon/lat and a point inside."""

    id: str
    site: str
    building: str
    level: int
    ring: list[list[float]]
    inside: tuple[float, float]


@dataclass(frozen=True, slots=True)
class GenDevice:
    """A generated static device."""

    id: str
    kind: str
    site: str
    building: str
    level: int
    lon: float
    lat: float
    capabilities: dict[str, Any]


@dataclass(slots=True)
class World:
    """Everything generated, and the files once written."""

    zones: list[GenZone] = field(default_factory=list)
    prefixes: list[tuple[str, str]] = field(default_factory=list)
    devices: list[GenDevice] = field(default_factory=list)
    map_files: list[Path] = field(default_factory=list)
    csv_files: list[Path] = field(default_factory=list)


def _rooms(
    rng: random.Random, x0: float, y0: float, w: float, h: float, cols: int, rows: int
) -> list[list[tuple[float, float]]]:
    """Return a floor's rooms as rings in metres: a grid with corridors, some L-shaped."""
    rooms = []
    cw, rh = w / cols, h / rows
    for c in range(cols):
        for r in range(rows):
            ax, ay = x0 + c * cw + 0.5, y0 + r * rh + 0.5
            bx, by = ax + cw - 1.0, ay + rh - 1.0
            if rng.random() < 0.05:
                # An L: the rectangle minus its north-east quarter.
                mx, my = (ax + bx) / 2, (ay + by) / 2
                ring = [(ax, ay), (bx, ay), (bx, my), (mx, my), (mx, by), (ax, by), (ax, ay)]
            else:
                ring = [(ax, ay), (bx, ay), (bx, by), (ax, by), (ax, ay)]
            rooms.append(ring)
    return rooms


def _point_in_room(rng: random.Random, ring: list[tuple[float, float]]) -> tuple[float, float]:
    """Return a random point well inside a room (in its south-west quarter for an L)."""
    xs = [p[0] for p in ring]
    ys = [p[1] for p in ring]
    ax, bx, ay, by = min(xs), max(xs), min(ys), max(ys)
    if len(ring) > 5:
        bx, by = (ax + bx) / 2, (ay + by) / 2
    return rng.uniform(ax + 0.6, bx - 0.6), rng.uniform(ay + 0.6, by - 0.6)


def _capabilities(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind == "printer":
        paper = rng.choices(
            ["<legal-A4", "legal-A4", "tabloid-A3", "isoC-A2"], weights=[2, 70, 25, 3]
        )[0]
        caps = {
            "color": rng.random() < 0.4,
            "duplex": rng.random() < 0.7,
            "paper_max": paper,
            "secure": rng.random() < 0.3,
        }
    else:
        caps = {
            "color": rng.random() < 0.8,
            "adf": rng.random() < 0.6,
            "paper_max": "legal-A4",
            "secure": rng.random() < 0.3,
        }
    # Some devices do not state everything: unstated counts as absent.
    if rng.random() < 0.1:
        caps.pop(rng.choice(sorted(caps)))
    return caps


class _V4Allocator:
    """Hands out aligned, non-overlapping IPv4 prefixes from a list of pools."""

    def __init__(self, pools: list[str]) -> None:
        self.pools = [ipaddress.IPv4Network(p) for p in pools]
        self.pool = 0
        self.cursor = int(self.pools[0].network_address)

    def take(self, length: int) -> ipaddress.IPv4Network:
        size = 1 << (32 - length)
        while True:
            start = (self.cursor + size - 1) // size * size
            net = self.pools[self.pool]
            if start + size <= int(net.broadcast_address) + 1:
                self.cursor = start + size
                return ipaddress.IPv4Network((start, length))
            self.pool += 1
            if self.pool >= len(self.pools):
                raise ValueError("IPv4 pools exhausted")
            self.cursor = int(self.pools[self.pool].network_address)


def generate(
    seed: int = 7,
    sites: int = 40,
    buildings: int = 6,
    devices: int = 100_000,
    prefixes: int = 100_000,
    v6_share: float = 0.1,
) -> World:
    """Generate a world in memory (no files): zones, prefixes and devices."""
    rng = random.Random(seed)
    world = World()
    rooms_m: list[list[tuple[float, float]]] = []
    site_frames: list[tuple[float, float, float]] = []
    for s in range(sites):
        site = f"site{s:03d}"
        lon0 = -100.0 + (s % 20) * 7.5 + rng.uniform(-1, 1)
        lat0 = 25.0 + (s // 20) * 12.0 + rng.uniform(-1, 1)
        kx = KY * math.cos(math.radians(lat0))
        site_frames.append((lon0, lat0, kx))
        bcols = 4
        for b in range(buildings):
            building = f"b{b:02d}"
            bx, by = (b % bcols) * 140.0, (b // bcols) * 100.0
            bw, bh = rng.choice((60.0, 80.0, 100.0)), rng.choice((40.0, 60.0))
            cols, rows = int(bw // 20), int(bh // 20)
            for level in range(rng.randint(2, 6)):
                for i, ring in enumerate(_rooms(rng, bx, by, bw, bh, cols, rows)):
                    zid = f"{site}-{building}-l{level}-r{i:02d}"
                    ll = [[round(lon0 + x / kx, 7), round(lat0 + y / KY, 7)] for x, y in ring]
                    px, py = _point_in_room(rng, ring)
                    inside = (lon0 + px / kx, lat0 + py / KY)
                    world.zones.append(GenZone(zid, site, building, level, ll, inside))
                    rooms_m.append(ring)
    site_index = {f"site{s:03d}": s for s in range(sites)}

    # Prefixes: each zone gets its share; /24../28, some IPv6 /64s, some nested /28s.
    v4 = _V4Allocator(["10.0.0.0/8", "172.16.0.0/12", "100.64.0.0/10"])
    n_zones = len(world.zones)
    v6_count = 0
    taken: set[str] = set()
    i = 0
    while len(taken) < prefixes:
        zone = world.zones[i % n_zones] if i < n_zones else rng.choice(world.zones)
        i += 1
        roll = rng.random()
        if roll < v6_share:
            s = site_index[zone.site]
            world.prefixes.append((f"2001:db8:{s:x}:{v6_count:x}::/64", zone.id))
            v6_count += 1
        elif roll < v6_share + 0.03 and world.prefixes:
            # A printer VLAN: a /28 inside another zone's /24 (longest prefix wins).
            parent = rng.choice(world.prefixes)
            net = ipaddress.ip_network(parent[0])
            if net.version == 4 and net.prefixlen == 24:
                cidr = str(list(net.subnets(new_prefix=28))[rng.randrange(16)])
                if cidr in taken:  # the same /28 twice would be a conflict
                    continue
                world.prefixes.append((cidr, zone.id))
            else:
                world.prefixes.append((str(v4.take(28)), zone.id))
        else:
            length = rng.choices([24, 25, 26, 27, 28], weights=[40, 15, 15, 15, 15])[0]
            world.prefixes.append((str(v4.take(length)), zone.id))
        taken.add(world.prefixes[-1][0])

    # Devices inside rooms, each zone likely to hold some.
    for d in range(devices):
        zi = rng.randrange(n_zones)
        zone = world.zones[zi]
        lon0, lat0, kx = site_frames[site_index[zone.site]]
        x, y = _point_in_room(rng, rooms_m[zi])
        kind = "printer" if rng.random() < 0.8 else "scanner"
        world.devices.append(
            GenDevice(
                id=f"{'prn' if kind == 'printer' else 'scn'}-{d:06d}",
                kind=kind,
                site=zone.site,
                building=zone.building,
                level=zone.level,
                lon=round(lon0 + x / kx, 7),
                lat=round(lat0 + y / KY, 7),
                capabilities=_capabilities(rng, kind),
            )
        )
    return world


def _zone_feature(z: GenZone, subnets: list[str]) -> dict[str, Any]:
    props: dict[str, Any] = {
        "feature_type": "zone",
        "id": z.id,
        "site": z.site,
        "building": z.building,
        "level": z.level,
        "name": f"{z.site} {z.building} level {z.level} {z.id.rsplit('-', 1)[1]}",
    }
    if subnets:
        props["subnets"] = subnets
    return {
        "type": "Feature",
        "properties": props,
        "geometry": {"type": "Polygon", "coordinates": [z.ring]},
    }


def _device_feature(d: GenDevice) -> dict[str, Any]:
    models = PRINTER_MODELS if d.kind == "printer" else SCANNER_MODELS
    model = models[int(d.id[4:]) % len(models)]
    return {
        "type": "Feature",
        "properties": {
            "feature_type": "device",
            "static": True,
            "id": d.id,
            "name": f"{model.split()[0]} {d.id}",
            "kind": d.kind,
            "uri": f"ipps://{d.id}.print.example.net/ipp/{'print' if d.kind == 'printer' else 'scan'}",
            "make_model": model,
            "capabilities": d.capabilities,
            "site": d.site,
            "building": d.building,
            "level": d.level,
        },
        "geometry": {"type": "Point", "coordinates": [d.lon, d.lat]},
    }


def documents(
    world: World, subnets_in_maps: float = 0.1
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """Return one GeoJSON document per site (zones and devices) and the IPAM CSV rows.

    About ``subnets_in_maps`` of the prefixes go into the zones' ``subnets``, the rest
    into the CSV, as an IPAM export would hold them.
    """
    rng = random.Random(1)
    in_map: dict[str, list[str]] = {}
    csv_rows: list[tuple[str, str]] = []
    for cidr, zid in world.prefixes:
        if rng.random() < subnets_in_maps:
            in_map.setdefault(zid, []).append(cidr)
        else:
            csv_rows.append((cidr, zid))
    by_site: dict[str, list[dict[str, Any]]] = {}
    for z in world.zones:
        by_site.setdefault(z.site, []).append(_zone_feature(z, in_map.get(z.id, [])))
    for d in world.devices:
        by_site[d.site].append(_device_feature(d))
    docs = {
        site: {"type": "FeatureCollection", "features": features}
        for site, features in by_site.items()
    }
    return docs, csv_rows


def csv_text(rows: list[tuple[str, str]]) -> str:
    """Return IPAM CSV text with its header."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["prefix", "zone_id"])
    writer.writerows(rows)
    return out.getvalue()


def write(world: World, directory: Path, subnets_in_maps: float = 0.1) -> World:
    """Write one GeoJSON file per site and an IPAM CSV; record their paths in ``world``."""
    directory.mkdir(parents=True, exist_ok=True)
    docs, rows = documents(world, subnets_in_maps)
    world.map_files = []
    for site, doc in docs.items():
        path = directory / f"{site}.geojson"
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, separators=(",", ":"))
        world.map_files.append(path)
    path = directory / "ipam-export.csv"
    path.write_text(csv_text(rows), encoding="utf-8")
    world.csv_files = [path]
    return world


if __name__ == "__main__":
    import sys
    import time

    t0 = time.monotonic()
    w = generate()
    t1 = time.monotonic()
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/nearest-gen")
    write(w, target)
    print(
        f"{len(w.zones)} zones, {len(w.prefixes)} prefixes, {len(w.devices)} devices; "
        f"generated in {t1 - t0:.2f} s, written to {target} in {time.monotonic() - t1:.2f} s"
    )
