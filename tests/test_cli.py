"""`nearest` and `nearestctl` as a user runs them: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import DaemonProcess, free_port, tcp_url


def nearest(*args: str, server: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nearest_client.cli", "--server", server, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nearestd.ctl", "--config", str(daemon.config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_nearest_exit_codes_and_output(demo_daemon: DaemonProcess) -> None:
    url = tcp_url(demo_daemon.config)
    found = nearest("printer", "--color", server=url)
    assert found.returncode == 0
    assert (
        "North Lobby Colour MFP" in found.stdout
        and "ipps://10.20.10.50:631/ipp/print" in found.stdout
    )
    assert "0.0 m away" in found.stdout and "hq / north / level 0 / n0-lobby" in found.stdout
    none = nearest("printer", "--paper", "A2", "--duplex", server=url)
    assert none.returncode == 1 and "no printer matches" in none.stderr
    usage = nearest("fax", server=url)
    assert usage.returncode == 2
    unreachable = nearest("printer", server=f"tcp://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3 and "cannot reach nearestd" in unreachable.stderr
    bad_url = nearest("printer", server="http://x")
    assert bad_url.returncode == 2 and "bad server URL" in bad_url.stderr


def test_nearest_json_and_k(demo_daemon: DaemonProcess) -> None:
    r = nearest(
        "printer", "-k", "3", "--json", server=f"unix://{demo_daemon.config.parent / 'query.sock'}"
    )
    assert r.returncode == 0
    reply = json.loads(r.stdout)
    assert reply["devices"][0]["id"] == "prn-n0-lobby"
    assert len(reply["devices"]) == 3
    costs = [d["distance_m"] for d in reply["devices"]]
    assert costs == sorted(costs)


def test_nearestctl_devices_and_locate(demo_daemon: DaemonProcess) -> None:
    r = ctl(demo_daemon, "devices")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "STATE", "PLACEMENT"]
    assert "17 devices, 0 unlocated" in lines[-1]
    r = ctl(demo_daemon, "--json", "devices", "--kind", "scanner")
    assert {d["kind"] for d in json.loads(r.stdout)["devices"]} == {"scanner"}
    r = ctl(demo_daemon, "locate", "10.21.51.7")
    assert r.returncode == 0 and "s0-canteen" in r.stdout
    r = ctl(demo_daemon, "locate", "192.0.2.1")
    assert r.returncode == 1 and "unknown-location" in r.stderr
    r = ctl(demo_daemon, "locate", "not-an-ip")
    assert r.returncode == 2 and "client_ip: not an IPv4 or IPv6 address" in r.stderr


def test_example_config_and_default_server_answer_on_this_machine(tmp_path: Path) -> None:
    """What `make run` then `nearest printer` does: the example config, no --server."""
    import os
    import socket

    from support import CONFIG_DIR

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 7310)) == 0:
            import pytest

            pytest.skip("something already listens on 127.0.0.1:7310 (a `make run`?)")
    d = DaemonProcess(CONFIG_DIR / "example.toml", log_path=tmp_path / "nearestd.log")
    d.admin = CONFIG_DIR.parent / ".run" / "admin.sock"
    try:
        d.wait_ready()
        env = {k: v for k, v in os.environ.items() if k != "NEAREST_SERVER"}
        env["NEAREST_CLIENT_CONFIG"] = "/nonexistent/client.toml"
        r = subprocess.run(
            [sys.executable, "-m", "nearest_client.cli", "printer"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert "North Lobby Colour MFP" in r.stdout
    finally:
        d.stop()


async def test_async_client_pipelines(demo_daemon: DaemonProcess) -> None:
    from nearest_client import AsyncClient, ServerError

    async with AsyncClient(tcp_url(demo_daemon.config)) as c:
        replies = await c.request_many(
            [{"op": "ping"}, {"op": "nearest", "kind": "scanner"}, {"op": "locate"}]
        )
        assert [r["ok"] for r in replies] == [True, True, True]
        assert replies[1]["devices"][0]["id"] == "scn-n0-mailroom"
        try:
            await c.request({"op": "nearest", "kind": "toaster"})
        except ServerError as exc:
            assert exc.code == "bad-request" and "kind" in exc.message
        else:
            raise AssertionError("expected a ServerError")
