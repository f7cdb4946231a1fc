"""`nearest scanner`: the eSCL URI and a ready sane-airscan device string."""

from __future__ import annotations

import glob
import json
import os
import shlex
import struct
import subprocess
import sys
from pathlib import Path

from cups_peer import device, write_map, zone
from nearest_client.cli import sane_device
from support import DaemonProcess, free_port, require_tools, skip_or_fail, tcp_url, write_config


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
    sane = sane_device("Floor 2: Scan's", "http://10.0.0.5:8080/eSCL/")
    assert sane is not None
    assert sane["device"] == "airscan:escl:Floor 2 Scan's:http://10.0.0.5:8080/eSCL/"
    # The shell line is quoted so it can be pasted as it is.
    argv = shlex.split(sane["scanimage"].split(" > ")[0])
    assert argv == ["scanimage", "-d", sane["device"], "--format=png"]
    quoted = sane_device('The "big" one', "https://[2001:db8::5]/eSCL/")
    assert quoted is not None
    assert quoted["airscan_conf"] == "\"The 'big' one\" = https://[2001:db8::5]/eSCL/, eSCL"


def test_a_scanner_without_escl_says_so() -> None:
    assert sane_device("Old", "socket://10.0.0.9:9100") is None
    assert sane_device("Odd", "http://[bad") is None


def test_the_printed_scanimage_line_scans_through_sane_airscan(tmp_path: Path) -> None:
    """Run the very line `nearest scanner` prints, with the real sane-airscan backend.

    scanimage and the eSCL scanner run in a fresh network namespace that has only its own
    loopback, and sane-airscan's discovery is off: nothing leaves the test.
    """
    require_tools("scanimage", "unshare", "ip")
    if not glob.glob("/usr/lib/*/sane/libsane-airscan.so*"):
        skip_or_fail("the sane-airscan backend is not installed")
    if os.geteuid() != 0:
        skip_or_fail("a private network namespace needs root")
    port = free_port()
    uri = f"http://127.0.0.1:{port}/eSCL/"
    site_map = write_map(
        tmp_path / "site.geojson",
        [
            zone("a", "west", 0, ["127.0.0.0/8", "::1/128"]),
            device("scn-a", "Lab Scanner: East", uri, "west", 0, {"color": True}, "scanner"),
        ],
    )
    cfg = write_config(tmp_path / "d", maps=[str(site_map)], subnets=[])
    daemon = DaemonProcess(cfg).wait_ready()
    try:
        r = run("--server", tcp_url(cfg), "scanner")
    finally:
        daemon.stop()
    assert r.returncode == 0, r.stderr
    scan_line = next(x for x in r.stdout.splitlines() if x.startswith("   scan:  "))
    command = scan_line.removeprefix("   scan:  ")
    conf_line = next(x for x in r.stdout.splitlines() if "airscan.conf [devices]: " in x)
    devices_entry = conf_line.split("airscan.conf [devices]: ", 1)[1]
    assert devices_entry == f'"Lab Scanner East" = {uri}, eSCL'

    sane_dir = tmp_path / "sane"
    sane_dir.mkdir()
    (sane_dir / "dll.conf").write_text("airscan\n")
    (sane_dir / "airscan.conf").write_text(
        f"[options]\ndiscovery = disable\nws-discovery = off\n[devices]\n{devices_entry}\n"
    )
    script = f"""
set -e
ip link set lo up
{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).parent / "escl_peer.py"))} {port} \\
    > escl.out 2> escl.log &
peer=$!
trap 'kill $peer' EXIT
for i in $(seq 100); do grep -q READY escl.out 2>/dev/null && break; sleep 0.05; done
{command}
scanimage -L > list.txt
"""
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "SANE_CONFIG_DIR": str(sane_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + (tmp_path / "escl.log").read_text()
    image = (tmp_path / "scan.png").read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", image[16:24]) == (75, 75)
    requests = (tmp_path / "escl.log").read_text().splitlines()
    assert "escl: POST /eSCL/ScanJobs" in requests
    assert "escl: GET /eSCL/ScanJobs/1/NextDocument" in requests
    # The [devices] line makes the scanner a configured sane-airscan device too.
    assert (
        "device `airscan:e0:Lab Scanner East' is a eSCL Lab Scanner East"
        in (tmp_path / "list.txt").read_text()
    )
