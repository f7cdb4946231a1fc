"""Poller defaults: discovered devices polled, static ones only when their map or config says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nearestd.adapters.poller import Poller
from nearestd.config import ConfigError, PollerConfig
from nearestd.core.model import Device, DeviceKind
from nearestd.loader import load_world
from nearestd.service import Service
from support import CONFIG_DIR, write_config


def _service(cfg_path: Path) -> tuple[Service, PollerConfig]:
    world = load_world(cfg_path)
    return Service(world.config, world.sitemap, 0.0, lambda: b"k" * 32), world.config.poller


def test_the_default_polls_discovered_devices_every_documented_interval() -> None:
    cfg = PollerConfig()
    assert cfg.enabled is True
    assert cfg.static is False
    assert cfg.interval == 30.0
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    assert "By default (`[poller] enabled = true`)" in readme


def test_the_example_config_never_contacts_a_demo_device() -> None:
    svc, cfg = _service(CONFIG_DIR / "example.toml")
    assert cfg.enabled and not cfg.static
    assert svc.sitemap.static_devices, "the demo map has static devices"
    poller = Poller(svc, cfg)
    poller.sync_targets(0.0)
    assert poller.plan.targets == {}
    # They would be polled if static devices were: the setting is what keeps them out.
    on = Poller(svc, PollerConfig(static=True))
    on.sync_targets(0.0)
    assert len(on.plan.targets) == sum(
        1 for d, _ in svc.sitemap.static_devices if d.uri.startswith(("ipp", "http"))
    )
    assert all(d.state == "unknown" for d, _ in svc.sitemap.static_devices)
    example = (CONFIG_DIR / "example.toml").read_text()
    assert "state unknown" in example and "static = false" in example


def _map(tmp_path: Path, polls: dict[str, Any]) -> Path:
    data = json.loads((CONFIG_DIR / "sites" / "campus.geojson").read_text())
    zone = next(f for f in data["features"] if f["properties"]["feature_type"] == "zone")
    z = zone["properties"]
    lon, lat = zone["geometry"]["coordinates"][0][0]
    data["features"] = [zone]
    for dev_id, poll in polls.items():
        props: dict[str, Any] = {
            "feature_type": "device",
            "static": True,
            "id": dev_id,
            "name": dev_id,
            "kind": "printer",
            "uri": f"ipp://192.0.2.1:631/{dev_id}",
            "site": z["site"],
            "building": z["building"],
            "level": z["level"],
        }
        if poll is not None:
            props["poll"] = poll
        data["features"].append(
            {
                "type": "Feature",
                "properties": props,
                "geometry": {"type": "Point", "coordinates": [lon, lat]},
            }
        )
    path = tmp_path / "site.geojson"
    path.write_text(json.dumps(data))
    return write_config(tmp_path, maps=[str(path)], subnets=[])


@pytest.mark.parametrize(("static", "polled"), [(False, {"yes"}), (True, {"yes", "unsaid"})])
def test_a_static_device_is_polled_when_its_poll_property_or_the_config_says(
    tmp_path: Path, static: bool, polled: set[str]
) -> None:
    svc, _ = _service(_map(tmp_path, {"yes": True, "no": False, "unsaid": None}))
    poller = Poller(svc, PollerConfig(static=static))
    poller.sync_targets(0.0)
    assert set(poller.plan.targets) == polled


def test_discovered_devices_are_polled_by_default(tmp_path: Path) -> None:
    svc, cfg = _service(_map(tmp_path, {}))
    svc.upsert_device(
        Device(
            id="mdns-1",
            kind=DeviceKind.PRINTER,
            name="Found",
            uri="ipp://192.0.2.9:631/ipp/print",
            source="mdns",
        ),
        0.0,
    )
    poller = Poller(svc, cfg)
    poller.sync_targets(0.0)
    assert set(poller.plan.targets) == {"mdns-1"}


def test_a_poll_property_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_world(_map(tmp_path, {"odd": "yes"}))
    assert any(
        p.endswith("feature 'odd': properties.poll: expected true or false")
        for p in err.value.problems
    ), err.value.problems
