"""The typed config: unknown keys and wrong types name the file, key path and expected type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nearestd.config import ConfigError, load_config, parse_config, parse_duration
from support import CONFIG_DIR


def test_example_config_loads_with_its_values() -> None:
    cfg = load_config(CONFIG_DIR / "example.toml")
    assert cfg.discovery.enabled is False
    assert cfg.ranking.floor_penalty_m == 20.0
    assert cfg.privacy.retention == 86400.0
    assert cfg.resolve(cfg.site.maps[0]) == (CONFIG_DIR / "sites" / "campus.geojson").resolve()
    assert cfg.mqtt is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[daemon]\nlisten = 'tcp://x:1'\n",
            "f.toml: [daemon] listen: expected a list of strings, got 'tcp://x:1'",
        ),
        ("[daemon]\nbogus = 1\n", "f.toml: [daemon] bogus: unknown key"),
        ("[nope]\n", "f.toml: [nope]: unknown section"),
        (
            "[ranking]\nfloor_penalty_m = 'high'\n",
            "f.toml: [ranking] floor_penalty_m: expected a number, got 'high'",
        ),
        (
            "[ranking]\nallow_other_sites = 1\n",
            "f.toml: [ranking] allow_other_sites: expected a boolean, got 1",
        ),
        (
            "[daemon]\nmax_connections = 1.5\n",
            "f.toml: [daemon] max_connections: expected an integer, got 1.5",
        ),
        (
            "[discovery]\nexpire_after = '10 minutes'\n",
            "f.toml: [discovery] expire_after: expected a duration like",
        ),
        (
            "[discovery]\nexpire_after = 600\n",
            "f.toml: [discovery] expire_after: expected a duration string",
        ),
        (
            "[discovery]\nenabled = true\n",
            "f.toml: [discovery] interfaces: required when discovery is enabled",
        ),
        (
            "[daemon]\nlisten = ['http://x']\n",
            "f.toml: [daemon] listen[0]: expected tcp://HOST:PORT or unix:///PATH",
        ),
        (
            "[daemon]\nallow = ['10.0.0.0/33']\n",
            "f.toml: [daemon] allow[0]: expected a CIDR prefix",
        ),
        (
            "[privacy]\nlog_ip = 'full'\n",
            'f.toml: [privacy] log_ip: expected "truncated" or "none"',
        ),
        ("[metrics]\nlisten = 'localhost'\n", "f.toml: [metrics] listen: expected HOST:PORT"),
        (
            "[mqtt]\nurl = 'http://broker'\n",
            "f.toml: [mqtt] url: expected mqtt://HOST:PORT or mqtts://HOST:PORT",
        ),
        ("[mqtt]\nfederate = 'yes'\n", "f.toml: [mqtt] federate: expected a boolean"),
        ("[daemon\n", "f.toml: not valid TOML"),
        ("daemon = 3\n", "f.toml: [daemon]: expected a table"),
    ],
)
def test_config_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "f.toml")
    assert any(p.startswith(expected) for p in ei.value.problems), ei.value.problems


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(
            "[daemon]\nbogus = 1\nmax_frame = 'big'\n[ranking]\nfloor_penalty_m = true\n", "f.toml"
        )
    assert len(ei.value.problems) == 3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("24h", 86400), ("250ms", 0.25), ("1.5h", 5400), ("2d", 172800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_check_lists_every_problem_and_exits_nonzero(tmp_path: Path) -> None:
    bad_map = tmp_path / "bad.geojson"
    bad_map.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", '
        '"geometry": {"type": "Point", "coordinates": [0, 0]}, '
        '"properties": {"feature_type": "zone", "id": "z1"}}]}'
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"[site]\nmaps = ['{bad_map}', 'missing.geojson']\n[ranking]\nbuilding_penalty_m = 'x'\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "nearestd.cli", "--config", str(cfg), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "[ranking] building_penalty_m: expected a number" in r.stderr
    # The config problem stops before site maps are read; fix it and see the map problems listed.
    cfg.write_text(f"[site]\nmaps = ['{bad_map}', 'missing.geojson']\n")
    r = subprocess.run(
        [sys.executable, "-m", "nearestd.cli", "--config", str(cfg), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"{bad_map}: feature 'z1': geometry: a zone needs a Polygon or MultiPolygon" in r.stderr
    assert f"{tmp_path / 'missing.geojson'}: file: not found" in r.stderr
    assert "2 problem(s) found" in r.stderr


def test_check_passes_on_the_example() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nearestd.cli",
            "--config",
            str(CONFIG_DIR / "example.toml"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: 24 zones")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[daemon]\nmax_connections_per_source = 0\n",
            "f.toml: [daemon] max_connections_per_source: expected an integer from 1 to 1000000, "
            "got 0",
        ),
        (
            "[daemon]\nreserved_connections = -1\n",
            "f.toml: [daemon] reserved_connections: expected an integer from 0 to 1000000, got -1",
        ),
        ("[mqtt]\nrate = nan\n", "f.toml: [mqtt] rate: expected a finite number, got nan"),
        ("[mqtt]\nrate = 0\n", "f.toml: [mqtt] rate: expected a positive number"),
        (
            "[mqtt]\nburst = 0\n",
            "f.toml: [mqtt] burst: expected an integer from 1 to 1000000, got 0",
        ),
        (
            "[mqtt]\nmax_queued = 1\n",
            "f.toml: [mqtt] max_queued: expected an integer from 16 to 1000000, got 1",
        ),
    ],
)
def test_fair_share_keys_are_checked(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "f.toml")
    assert expected in ei.value.problems, ei.value.problems


def test_fair_share_defaults() -> None:
    cfg = parse_config("[mqtt]\n", "f.toml")
    assert (cfg.daemon.max_connections_per_source, cfg.daemon.reserved_connections) == (64, 64)
    assert cfg.mqtt is not None
    assert (cfg.mqtt.rate, cfg.mqtt.burst, cfg.mqtt.max_queued) == (100.0, 200, 1024)
