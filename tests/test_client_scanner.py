"""`nearest scanner`: the eSCL URI and a ready sane-airscan device string."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from nearest_client.cli import sane_device
from support import DaemonProcess, tcp_url


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nearest_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_scanner_prints_escl_uri_and_scanimage_line(demo_daemon: DaemonProcess) -> None:
    r = run("--server", tcp_url(demo_daemon.config), "scanner")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    uri = "https://10.20.11.60:443/eSCL/"
    assert f"   eSCL:  {uri}" in lines
    assert (
        "   scan:  scanimage -d 'airscan:escl:North Mail Room Scanner:"
        f"{uri}' --format=png > scan.png"
    ) in lines
    assert f'   airscan.conf [devices]: "North Mail Room Scanner" = {uri}, eSCL' in lines


def test_scanner_json_carries_the_sane_strings(demo_daemon: DaemonProcess) -> None:
    r = run("--server", tcp_url(demo_daemon.config), "scanner", "--json", "-k", "3")
    assert r.returncode == 0, r.stderr
    devices = json.loads(r.stdout)["devices"]
    assert len(devices) == 3
    for d in devices:
        assert d["sane"]["escl"] == d["uri"]
        assert d["sane"]["device"] == f"airscan:escl:{d['name']}:{d['uri']}"


def test_printers_get_no_sane_lines(demo_daemon: DaemonProcess) -> None:
    r = run("--server", tcp_url(demo_daemon.config), "printer")
    assert r.returncode == 0
    assert "scanimage" not in r.stdout and "eSCL" not in r.stdout


def test_device_string_survives_awkward_names() -> None:
    # sane-airscan splits at the first two colons: a colon in the name must go.
    sane = sane_device({"name": "Floor 2: Scan's", "uri": "http://10.0.0.5:8080/eSCL/"})
    assert sane is not None
    assert sane["device"] == "airscan:escl:Floor 2 Scan's:http://10.0.0.5:8080/eSCL/"
    # The shell line is quoted so it can be pasted as it is.
    argv = shlex.split(sane["scanimage"].split(" > ")[0])
    assert argv == ["scanimage", "-d", sane["device"], "--format=png"]
    quoted = sane_device({"name": 'The "big" one', "uri": "https://[2001:db8::5]/eSCL/"})
    assert quoted is not None
    assert quoted["airscan_conf"] == "\"The 'big' one\" = https://[2001:db8::5]/eSCL/, eSCL"


def test_a_scanner_without_escl_says_so() -> None:
    assert sane_device({"name": "Old", "uri": "socket://10.0.0.9:9100"}) is None
    assert sane_device({"name": "Odd", "uri": "http://[bad"}) is None
