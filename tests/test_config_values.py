"""Hostile and sloppy configuration: each case gets its named problem from ``--check`` and
from ``reload`` (never a traceback, never ``internal``), and the daemon keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nearest_client import Client, ServerError
from support import DEMO_CSV, DEMO_MAP, DaemonProcess, ask, write_config

# A case rewrites a good config file (and may write a map beside it).
Case = Callable[[Path], None]


def set_key(section: str, key: str, raw: str) -> Case:
    def make(config: Path) -> None:
        text = config.read_text()
        header = f"[{section}]\n"
        if header in text:
            text = text.replace(header, f"{header}{key} = {raw}\n", 1)
        else:
            text += f"\n{header}{key} = {raw}\n"
        config.write_text(text)

    return make


def with_map(doc: str | bytes) -> Case:
    def make(config: Path) -> None:
        extra = config.parent / "bad.geojson"
        extra.write_bytes(doc.encode() if isinstance(doc, str) else doc)
        config.write_text(config.read_text().replace("maps = [", f'maps = ["{extra}", ', 1))

    return make


def zone_with_subnets(subnets: list[Any]) -> str:
    ring = [[4.0, 52.0], [4.001, 52.0], [4.001, 52.001], [4.0, 52.001], [4.0, 52.0]]
    zone = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "feature_type": "zone",
            "id": "extra-zone",
            "site": "extra",
            "building": "b",
            "level": 0,
            "name": "Extra",
            "subnets": subnets,
        },
    }
    return json.dumps({"type": "FeatureCollection", "features": [zone]})


DEEP = 100_000
CASES: dict[str, tuple[Case, str]] = {
    "nan floor penalty": (
        set_key("ranking", "floor_penalty_m", "nan"),
        "[ranking] floor_penalty_m: expected a finite number, got nan",
    ),
    "nan rate": (
        set_key("daemon", "rate", "nan"),
        "[daemon] rate: expected a finite number, got nan",
    ),
    "inf rate": (
        set_key("poller", "jitter", "inf"),
        "[poller] jitter: expected a finite number, got inf",
    ),
    "negative building penalty": (
        set_key("ranking", "building_penalty_m", "-1e308"),
        "[ranking] building_penalty_m: expected a number from 0 to 1000000, got -1e+308",
    ),
    "infinite duration": (
        set_key("poller", "max_backoff", '"' + "9" * 400 + 's"'),
        "[poller] max_backoff: expected a finite duration",
    ),
    "integer out of range": (
        set_key("discovery", "max_devices", "0"),
        "[discovery] max_devices: expected an integer from 1 to 10000000, got 0",
    ),
    "huge TOML integer": (
        set_key("privacy", "max_entries", "9" * 5000),
        "not valid TOML (line ",
    ),
    "deep TOML": (
        set_key("poller", "deep", "[" * DEEP + "]" * DEEP),
        "arrays or tables nested too deeply",
    ),
    "deep GeoJSON": (
        with_map("[" * DEEP + "]" * DEEP),
        "bad.geojson: line 1 column 65: nested more than 64 levels deep",
    ),
    # orjson reads a map's bytes; whatever it refuses, the standard parser words.
    "map not UTF-8": (
        with_map(b'{"type": "FeatureCollection", "features": ["\xff"]}'),
        "bad.geojson: file: not UTF-8 text",
    ),
    "map not JSON": (
        with_map('{"type": "FeatureCollection", "features": ['),
        "bad.geojson: line 1 column 44: not valid JSON: Expecting value",
    ),
    "NaN in a map": (
        with_map(zone_with_subnets([]).replace("4.001, 52.0]", "NaN, 52.0]", 1)),
        "bad.geojson: feature 'extra-zone': geometry: coordinates must be finite numbers",
    ),
    "bad subnets entry": (
        with_map(zone_with_subnets(["10.99.0.0/16", "10.99.1.1/24"])),
        "feature 'extra-zone': properties.subnets[1]: bad CIDR '10.99.1.1/24'",
    ),
    "subnets entry not a string": (
        with_map(zone_with_subnets(["10.99.0.0/16", 7])),
        "feature 'extra-zone': properties.subnets[1]: expected a CIDR string, got int",
    ),
}


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nearestd.cli", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_check_names_the_problem(case: str, tmp_path: Path) -> None:
    make, expected = CASES[case]
    config = write_config(tmp_path)
    make(config)
    r = check(config)
    assert r.returncode == 1, r.stdout
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_start_up_names_the_problem_and_exits(case: str, tmp_path: Path) -> None:
    make, expected = CASES[case]
    config = write_config(tmp_path)
    make(config)
    r = subprocess.run(
        [sys.executable, "-m", "nearestd.cli", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    # Logs keep addresses to their /24 (privacy): compare up to the address.
    assert expected.split(" '10.")[0] in r.stderr.replace('\\"', '"'), r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("config-values")
    proc = DaemonProcess(write_config(d)).wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


def reload(daemon: DaemonProcess) -> dict[str, Any]:
    with Client(f"unix://{daemon.admin}", timeout=60) as c:
        try:
            return c.request({"op": "reload"})
        except ServerError as exc:
            return exc.reply


@pytest.mark.parametrize("case", list(CASES))
def test_reload_names_the_problem_and_keeps_serving(case: str, daemon: DaemonProcess) -> None:
    make, expected = CASES[case]
    good = daemon.config.read_text()
    try:
        make(daemon.config)
        reply = reload(daemon)
    finally:
        daemon.config.write_text(good)
    assert reply["ok"] is False and reply["error"]["code"] == "bad-request", reply
    assert any(expected in p for p in reply["problems"]), reply["problems"]
    assert ask(daemon, {"op": "ping"})["ok"] is True


def test_a_byte_order_mark_is_accepted_in_csv_config_and_maps(tmp_path: Path) -> None:
    csv = tmp_path / "ipam.csv"
    csv.write_text("\ufeff" + DEMO_CSV.read_text(), encoding="utf-8")
    site = tmp_path / "site.geojson"
    site.write_text("\ufeff" + DEMO_MAP.read_text(), encoding="utf-8")
    cfg = write_config(tmp_path, maps=[str(site)], subnets=[str(csv)])
    cfg.write_text("\ufeff" + cfg.read_text(), encoding="utf-8")
    r = check(cfg)
    assert r.returncode == 0, r.stderr
    first = DEMO_CSV.read_text().splitlines()[1].split(",")
    d = DaemonProcess(cfg).wait_ready()
    try:
        ip = first[0].split("/")[0].rsplit(".", 1)[0] + ".9"
        reply = ask(d, {"op": "locate", "client_ip": ip})
        assert reply["where"]["zone"] == first[1]
        assert reload(d).get("reloaded") is True
    finally:
        d.stop()


def test_ipv4_mapped_allow_and_trusted_entries_are_normalised(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        sections={
            "daemon": {
                "allow": ["::ffff:127.0.0.1/128"],
                "trusted_peers": ["::ffff:127.0.0.0/104"],
            }
        },
    )
    assert check(cfg).returncode == 0
    d = DaemonProcess(cfg).wait_ready()
    try:
        import tomllib

        url = next(u for u in tomllib.loads(cfg.read_text())["daemon"]["listen"] if "tcp" in u)
        first = DEMO_CSV.read_text().splitlines()[1].split(",")
        ip = first[0].split("/")[0].rsplit(".", 1)[0] + ".9"
        with Client(url, timeout=10) as c:
            # Allowed (a plain IPv4 peer matches the mapped entry), and trusted to ask for ip.
            reply = c.request({"op": "locate", "client_ip": ip})
        assert reply["where"]["zone"] == first[1]
    finally:
        d.stop()
