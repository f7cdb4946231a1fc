"""The daemon under the unit's restrictions, without systemd to start it.

An unprivileged user (as DynamicUser= gives) with only its state and runtime directories
writable, no new privileges, and the unit's own SystemCallFilter=,
RestrictAddressFamilies= and MemoryDenyWriteExecute= read from systemd/nearestd.service
and applied with seccomp and prctl (tests/sandbox_exec.py); discovery and metrics on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lan import ZcPeer
from nearest_client import Client, ClientError
from nearestd.adapters.snapshot import FILE_NAME
from nearestd.core.inventory import Saved, decode_inventory, encode_inventory
from nearestd.core.model import Device, DeviceKind
from staging import stage
from support import free_port, require_tools, skip_or_fail, write_config

NOBODY = 65534
HERE = Path(__file__).resolve().parent
UNIT = HERE.parent / "systemd" / "nearestd.service"


def unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """Return the system calls of a systemd syscall group, nested groups included."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= expand(item, seen) if item.startswith("@") else {item}
    return calls


def unit_sandbox(path: Path) -> Path:
    """Write the sandbox_exec.py spec of the unit's SystemCallFilter=, families and MDWE."""
    allow: set[str] = set()
    for value in unit_values("SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= expand(item) if item.startswith("@") else {item}
        allow = allow - names if deny else allow | names
    families = [
        int(getattr(socket, name)) for name in unit_values("RestrictAddressFamilies")[0].split()
    ]
    spec = {
        "allow": sorted(allow),
        "families": families,
        "mdwe": unit_values("MemoryDenyWriteExecute") == ["yes"],
    }
    path.write_text(json.dumps(spec))
    return path


def sandboxed(spec: Path, *argv: str) -> list[str]:
    """Return argv run as nobody, without new privileges, under the unit's filters."""
    staged = stage()  # this checkout may sit where nobody cannot read it
    return [
        *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
        "--no-new-privs",
        *(staged.python, str(staged.tests / "sandbox_exec.py"), str(spec), "--", *argv),
    ]


PROBES = {
    # what must fail under the unit's restrictions, and what must still work
    "w+x memory": (
        "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
        "PermissionError",
    ),
    "packet socket": (
        "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
        "Address family not supported",
    ),
    "@resources": ("import os; os.sched_setaffinity(0, {0})", "PermissionError"),
    "allowed": ("import socket; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()", ""),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_the_sandbox_really_restricts(workdir: Path, probe: str) -> None:
    """Negative controls: the emulated unit refuses what it should, and only that."""
    code, expected = PROBES[probe]
    spec = unit_sandbox(workdir / "sandbox.json")
    r = subprocess.run(sandboxed(spec, "-c", code), capture_output=True, text=True, timeout=30)
    if expected:
        assert r.returncode != 0 and expected in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr


@pytest.fixture
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_or_fail("needs root and setpriv to run the daemon as an unprivileged user")
    require_tools("systemd-analyze")
    # Not under pytest's tmp_path: its parents are root-only.
    d = Path(tempfile.mkdtemp(prefix="nearestd-nobody-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_runs_as_an_unprivileged_user_in_its_own_directories(workdir: Path) -> None:
    run = workdir / "run"
    state = workdir / "state"
    port = free_port()
    sites = stage().config / "sites"
    cfg = write_config(
        workdir / "etc",
        sections={
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "discovery": {"enabled": True, "interfaces": ["127.0.0.1"]},
        },
        maps=[str(sites / "campus.geojson")],
        subnets=[str(sites / "ipam-export.csv")],
    )
    text = cfg.read_text()
    text = text.replace(str(workdir / "etc" / "query.sock"), str(run / "nearestd.sock"))
    text = text.replace(str(workdir / "etc" / "admin.sock"), str(run / "admin.sock"))
    text = text.replace(str(workdir / "etc" / "state"), str(state))
    cfg.write_text(text)
    device = Device(
        id="mdns-printer-nobody",
        kind=DeviceKind.PRINTER,
        name="Nobody's Printer",
        uri="ipp://127.0.0.77:631/ipp/print",
        source="mdns",
        addresses=("127.0.0.77",),
    )
    for d in (run, state):
        d.mkdir(mode=0o700)
        os.chown(d, NOBODY, NOBODY)
    (state / FILE_NAME).write_bytes(encode_inventory([Saved(device, time.time())], time.time()))
    os.chown(state / FILE_NAME, NOBODY, NOBODY)
    log = (workdir / "nearestd.log").open("wb")
    spec = unit_sandbox(workdir / "sandbox.json")
    peer = ZcPeer.local("127.0.0.1", log=workdir / "peer.log")
    proc = subprocess.Popen(
        sandboxed(spec, "-m", "nearestd.cli", "--config", str(cfg)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (workdir / "nearestd.log").read_text()
            try:
                with Client(f"unix://{run / 'admin.sock'}", timeout=1) as c:
                    inv = {x["id"]: x for x in c.request({"op": "devices"})["devices"]}
                break
            except ClientError:
                assert time.monotonic() < deadline, (workdir / "nearestd.log").read_text()
                time.sleep(0.05)
        assert inv["mdns-printer-nobody"]["state"] == "stale"
        # Discovery (python-zeroconf, ifaddr), ranking (shapely, rtree) and the exporter all
        # work without writable+executable memory.
        peer.register(
            "n",
            f"Sandbox Printer {os.getpid()}",
            host=f"sandbox-{os.getpid()}.local.",
            addresses=["127.0.0.1"],
            txt={"txtvers": "1", "rp": "ipp/print", "note": "Reception"},
        )
        wanted = f"Sandbox Printer {os.getpid()}"
        while True:
            with Client(f"unix://{run / 'nearestd.sock'}", timeout=5) as c:
                names = [x.name for x in c.nearest("printer", k=20).devices]
            if wanted in names:
                break
            assert time.monotonic() < deadline + 15, names
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"nearest_discovery_browser_running 1.0" in r.read()
        admin = (run / "admin.sock").stat()
        assert admin.st_uid == NOBODY and stat.S_IMODE(admin.st_mode) == 0o600
        assert stat.S_IMODE((run / "nearestd.sock").stat().st_mode) == 0o666
        before = (state / FILE_NAME).stat().st_mtime_ns
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        peer.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
    logged = (workdir / "nearestd.log").read_text()
    assert "level=error" not in logged and "Traceback" not in logged, logged
    snap = state / FILE_NAME
    assert snap.stat().st_uid == NOBODY and stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert snap.stat().st_mtime_ns != before  # rewritten by the daemon as that user
    saved = {s.device.name for s in decode_inventory(snap.read_bytes())}
    assert saved == {"Nobody's Printer", f"Sandbox Printer {os.getpid()}"}
    assert not (run / "admin.sock").exists() and not (run / "nearestd.sock").exists()
