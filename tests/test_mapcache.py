"""The compiled site-map cache: used only for the very same files, never when corrupt or stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from nearestd import mapcache
from nearestd.config import ConfigError
from nearestd.core.sitemap import SiteMap
from nearestd.loader import load_world
from support import DEMO_CSV, DEMO_MAP, DaemonProcess, ask, wait_for, write_config


def _site(tmp_path: Path) -> Path:
    """Copy the demo map and IPAM file next to a config that uses them; return the config."""
    shutil.copy(DEMO_MAP, tmp_path / "site.geojson")
    shutil.copy(DEMO_CSV, tmp_path / "subnets.csv")
    return write_config(
        tmp_path, maps=[str(tmp_path / "site.geojson")], subnets=[str(tmp_path / "subnets.csv")]
    )


def _summary(sm: SiteMap) -> dict[str, Any]:
    """Everything a site map answers with, in comparable form."""
    return {
        "zones": {
            z.id: (z.site, z.building, z.level, z.name, z.aliases, z.subnets, z.polygon.wkt)
            for z in sm.zones.values()
        },
        "prefixes": sorted(sm.prefixes.items()),
        "pins": sm.pins,
        "static": sm.static_devices,
        "names": sm.names,
        "levels": sm.levels,
        "projections": sm.projections,
        "visibility": (sm.visibility.rules, sm.visibility.zone_sees, sm.visibility.device_restrict),
        "lookups": [sm.prefixes.lookup(ip) for ip in ("10.20.10.7", "10.21.20.9", "192.0.2.1")],
    }


def _cache_file(cfg: Path) -> Path:
    return cfg.parent / "state" / mapcache.FILE_NAME


def _built_and_cached(cfg: Path) -> SiteMap:
    world = load_world(cfg, use_cache=True)
    assert world.save_cache is not None, "a cold start validates the files"
    world.save_cache()
    assert _cache_file(cfg).exists()
    return world.sitemap


def test_warm_load_gives_the_same_map_without_validating(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    built = _built_and_cached(cfg)
    warm = load_world(cfg, use_cache=True)
    assert warm.save_cache is None, "the map came from the cache"
    assert _summary(warm.sitemap) == _summary(built)
    # Prepared polygons answer containment as before.
    zone = next(iter(warm.sitemap.zones.values()))
    assert warm.sitemap.zone_containing(zone.site, zone.building, zone.level, *zone.representative)


def test_the_file_is_private_to_the_daemon(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    _built_and_cached(cfg)
    assert _cache_file(cfg).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:-10] + bytes(x ^ 0xFF for x in b[-10:]), id="bit-flipped"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"garbage" * 100, id="garbage"),
        pytest.param(
            lambda b: (
                b[: len(mapcache.MAGIC)]
                + (mapcache.FORMAT + 1).to_bytes(4, "big")
                + b[len(mapcache.MAGIC) + 4 :]
            ),
            id="other-format",
        ),
    ],
)
def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path, damage: Any) -> None:
    cfg = _site(tmp_path)
    built = _built_and_cached(cfg)
    path = _cache_file(cfg)
    path.write_bytes(damage(path.read_bytes()))
    world = load_world(cfg, use_cache=True)
    assert world.save_cache is not None, "the damaged cache was not used"
    assert _summary(world.sitemap) == _summary(built)
    world.save_cache()
    assert load_world(cfg, use_cache=True).save_cache is None, "rebuilt and used again"


def test_a_changed_map_is_validated_again(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    _built_and_cached(cfg)
    doc = json.loads((tmp_path / "site.geojson").read_text())
    zone = next(f for f in doc["features"] if f["properties"].get("feature_type") == "zone")
    zone["properties"]["name"] = "Renamed room"
    (tmp_path / "site.geojson").write_text(json.dumps(doc))
    world = load_world(cfg, use_cache=True)
    assert world.save_cache is not None
    assert world.sitemap.zones[zone["properties"]["id"]].name == "Renamed room"


def test_a_cache_never_hides_a_new_error(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    _built_and_cached(cfg)
    doc = json.loads((tmp_path / "site.geojson").read_text())
    zone = next(f for f in doc["features"] if f["properties"].get("subnets"))
    zone["properties"]["subnets"] = ["10.20.99.1/24"]
    (tmp_path / "site.geojson").write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_world(cfg, use_cache=True)
    assert any(
        "bad CIDR '10.20.99.1/24' (10.20.99.1/24 has host bits set)" in p
        for p in err.value.problems
    ), err.value.problems


def test_check_neither_reads_nor_writes_the_cache(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    assert load_world(cfg).save_cache is None
    assert not _cache_file(cfg).exists()


def test_the_daemon_writes_the_cache_once_serving_and_starts_from_it(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    d = DaemonProcess(cfg).wait_ready()
    try:
        wait_for("the cache file", _cache_file(cfg).exists, timeout=30)
        first = ask(d, {"v": 1, "id": 1, "op": "locate", "client_ip": "10.20.11.7"})
    finally:
        d.stop()
    written = _cache_file(cfg).stat().st_mtime_ns
    # Corrupt it: the next start rebuilds from the files and answers the same.
    _cache_file(cfg).write_bytes(b"not a cache")
    d = DaemonProcess(cfg).wait_ready()
    try:
        again = ask(d, {"v": 1, "id": 1, "op": "locate", "client_ip": "10.20.11.7"})
        wait_for(
            "the cache rewritten",
            lambda: _cache_file(cfg).stat().st_size > 100,
            timeout=30,
        )
    finally:
        d.stop()
    assert again == first
    assert _cache_file(cfg).stat().st_mtime_ns != written
    assert "Traceback" not in d.logs()


def test_a_cache_others_could_have_written_is_not_read(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    _built_and_cached(cfg)
    path = _cache_file(cfg)
    path.chmod(0o666)
    assert load_world(cfg, use_cache=True).save_cache is not None, "not read"
    path.chmod(0o600)
    assert load_world(cfg, use_cache=True).save_cache is None, "read again once private"
