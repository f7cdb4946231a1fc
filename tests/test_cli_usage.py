"""`nearest` and `nearestctl` edge cases a user trips on: usage errors, pipes, output forms."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import DaemonProcess, tcp_url

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def run(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


BAD_URLS = ["http://x", "tcp://127.0.0.1", "tcp://127.0.0.1:notaport", "tcp://127.0.0.1:70000"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_server_url_is_a_usage_error(url: str) -> None:
    r = run("nearest_client.cli", "--server", url, "printer")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("nearest: --server: bad server URL"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_nearest_server_is_a_usage_error(url: str) -> None:
    r = run("nearest_client.cli", "printer", env={"NEAREST_SERVER": url})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("nearest: NEAREST_SERVER: bad server URL"), r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["printer", "--adf"], "--adf applies to scanners only, not to printers"),
        (["scanner", "--paper", "A4"], "--paper applies to printers only, not to scanners"),
    ],
)
def test_an_option_of_the_other_kind_is_a_usage_error(args: list[str], message: str) -> None:
    # An unreachable server: the usage error must come first, without asking anyone.
    r = run("nearest_client.cli", "--server", "tcp://127.0.0.1:9", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


def run_into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is gone, as `... | head -1` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the child writes: every write of its gets EPIPE
    try:
        return subprocess.run(
            [sys.executable, "-m", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)


def test_a_closed_stdout_ends_quietly(demo_daemon: DaemonProcess) -> None:
    url = tcp_url(demo_daemon.config)
    for argv in (
        ["nearest_client.cli", "--server", url, "printer", "--json", "-k", "20"],
        ["nearestd.ctl", "--socket", str(demo_daemon.admin), "devices"],
        ["nearestd.ctl", "--socket", str(demo_daemon.admin), "--json", "stats"],
    ):
        r = run_into_closed_pipe(argv)
        assert r.stderr == "", r.stderr
        assert r.returncode == 141, argv


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run("nearestd.ctl", "--socket", str(daemon.admin), *args)


def test_nearestctl_is_human_by_default_and_json_with_json(demo_daemon: DaemonProcess) -> None:
    assert ctl(demo_daemon, "nearest", "127.0.0.1", "printer").returncode == 0
    human = ctl(demo_daemon, "privacy", "export", "127.0.0.1")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "OP", "ZONE", "DEVICES"]
    first = lines[1].split()
    assert ISO_UTC.match(first[0]) and first[1:3] == ["admin.nearest", "n0-lobby"], lines
    assert lines[-1] == f"{len(lines) - 2} entries"
    as_json = json.loads(ctl(demo_daemon, "--json", "privacy", "export", "127.0.0.1").stdout)
    assert isinstance(as_json["entries"][0]["ts"], float)

    stats = ctl(demo_daemon, "stats")
    assert stats.returncode == 0
    assert not stats.stdout.lstrip().startswith("{")
    pairs = dict(line.split(": ", 1) for line in stats.stdout.splitlines())
    assert pairs["devices"] == "17" and pairs["zones"] == "24"
    assert json.loads(ctl(demo_daemon, "--json", "stats").stdout)["stats"]["devices"] == 17

    for args in (["ping"], ["locate", "10.21.51.7"], ["devices"], ["privacy", "erase", "1.2.3.4"]):
        out = ctl(demo_daemon, *args).stdout
        assert not out.lstrip().startswith("{"), (args, out)
        assert json.loads(ctl(demo_daemon, "--json", *args).stdout)["ok"] is True


def test_nearestctl_finds_its_socket_in_the_environment(
    demo_daemon: DaemonProcess, tmp_path: Path
) -> None:
    r = run("nearestd.ctl", "ping", env={"NEARESTCTL_SOCKET": str(demo_daemon.admin)})
    assert r.returncode == 0 and r.stdout.startswith("alive"), r.stderr
    missing = tmp_path / "nowhere.sock"
    r = run("nearestd.ctl", "ping", env={"NEARESTCTL_SOCKET": str(missing)})
    assert r.returncode == 3
    assert f"tried {missing} (from NEARESTCTL_SOCKET)" in r.stderr, r.stderr
    assert "/run/nearestd/admin.sock (from default)" in r.stderr, r.stderr
