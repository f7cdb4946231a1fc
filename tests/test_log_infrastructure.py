"""The log's privacy filter keeps infrastructure addresses whole and client addresses truncated."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
from pathlib import Path

import pytest

from nearestd.logs import AddressScrubber, KeyValueFormatter, host_literals
from support import DEMO_CSV, DEMO_MAP, DaemonProcess, wait_for, write_config


def _line(scrubber: AddressScrubber, **fields: object) -> str:
    record = logging.LogRecord("nearestd", logging.ERROR, __file__, 1, "event", (), None)
    for key, value in fields.items():
        setattr(record, key, value)
    scrubber.filter(record)
    return KeyValueFormatter().format(record)


def test_infrastructure_addresses_stay_whole_only_in_error_fields() -> None:
    scrubber = AddressScrubber()
    scrubber.infrastructure = frozenset({"127.0.0.1", "2001:db8::5"})
    line = _line(
        scrubber,
        error="bind ('127.0.0.1', 27310) and [2001:db8::5]:631; peer 10.20.11.77 and 2001:db8::6",
    )
    assert "('127.0.0.1', 27310)" in line
    assert "[2001:db8::5]:631" in line
    # A client's address in the same field is truncated as before.
    assert "10.20.11.77" not in line and "10.20.11.0/24" in line
    assert "2001:db8::6" not in line
    # Outside error/problem fields an infrastructure address is scrubbed as any other.
    assert "127.0.0.1" not in _line(scrubber, detail="from 127.0.0.1")


def test_verbatim_problem_fields_quote_the_files() -> None:
    scrubber = AddressScrubber()
    problem = "site.geojson: feature 'x': properties.subnets: bad CIDR '10.20.99.1/24' (...)"
    assert problem in json.loads(
        json.dumps(_line(scrubber, problem=problem, _verbatim=("problem",)))
    )
    # Unmarked, the same text is scrubbed: the mark is what says it came from a file.
    assert "10.20.99.1/24" not in _line(scrubber, problem=problem)


def test_host_literals_take_hosts_not_networks() -> None:
    assert host_literals("tcp://127.0.0.1:7310 [::1]:80 10.0.0.0/8 10.1.2.3/32 ::1/128") == {
        "127.0.0.1",
        "::1",
        "10.1.2.3",
    }


def _site(tmp_path: Path, **daemon: object) -> Path:
    shutil.copy(DEMO_MAP, tmp_path / "site.geojson")
    return write_config(
        tmp_path,
        {"daemon": dict(daemon)} if daemon else None,
        maps=[str(tmp_path / "site.geojson")],
        subnets=[str(DEMO_CSV)],
    )


def test_a_bind_failure_names_the_configured_address(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _site(tmp_path, listen=[f"tcp://127.0.0.1:{port}"])
        d = DaemonProcess(cfg)
        try:
            assert d.proc.wait(30) == 1
        finally:
            d.stop()
    logs = d.logs()
    line = next(line for line in logs.splitlines() if "cannot listen" in line)
    assert f"('127.0.0.1', {port})" in line, line
    assert "127.0.0.0/24" not in line


def test_a_refused_reload_quotes_the_map(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    d = DaemonProcess(cfg).wait_ready()
    try:
        doc = json.loads((tmp_path / "site.geojson").read_text())
        zone = next(f for f in doc["features"] if f["properties"].get("subnets"))
        zone["properties"]["subnets"] = ["10.20.99.1/24"]
        (tmp_path / "site.geojson").write_text(json.dumps(doc))
        d.signal(signal.SIGHUP)
        line = wait_for(
            "the refused reload in the log",
            lambda: next((x for x in d.logs().splitlines() if "reload refused" in x), None),
            timeout=30,
            show=d.logs,
        )
    finally:
        d.stop()
    assert "bad CIDR '10.20.99.1/24' (10.20.99.1/24 has host bits set)" in json.loads(
        '"' + line.split('problem="', 1)[1].rsplit('"', 1)[0] + '"'
    ), line
    assert "10.20.99.0/24" not in line


@pytest.mark.parametrize("field", ["error", "problem"])
def test_a_client_address_in_an_error_field_is_still_truncated(field: str) -> None:
    scrubber = AddressScrubber()
    scrubber.infrastructure = frozenset({"127.0.0.1"})
    line = _line(scrubber, **{field: "connection from 192.0.2.77 reset"})
    assert "192.0.2.77" not in line and "192.0.2.0/24" in line


def test_a_static_device_address_from_the_map_stays_whole_read_on_first_need(
    tmp_path: Path,
) -> None:
    from nearestd.loader import load_world, map_addresses

    doc = json.loads(DEMO_MAP.read_text())
    dev = next(f for f in doc["features"] if f["properties"].get("static"))
    dev["properties"]["uri"] = "ipp://192.0.2.5:631/ipp/print"
    (tmp_path / "site.geojson").write_text(json.dumps(doc))
    world = load_world(
        write_config(tmp_path, maps=[str(tmp_path / "site.geojson")], subnets=[str(DEMO_CSV)])
    )
    assert "192.0.2.5" in map_addresses(world.sitemap)
    asked: list[int] = []

    def more() -> set[str]:
        asked.append(1)
        return map_addresses(world.sitemap)

    scrubber = AddressScrubber()
    scrubber.infrastructure = frozenset({"127.0.0.1"})
    scrubber._more = more
    assert asked == []
    line = _line(scrubber, error="connect to ('192.0.2.5', 631) timed out; peer 192.0.2.77")
    assert "('192.0.2.5', 631)" in line and "192.0.2.77" not in line
    _line(scrubber, error="again 192.0.2.5")
    assert asked == [1], "read once"
