"""The daemon as the unit runs it: an unprivileged user (as DynamicUser= gives) with only
its state and runtime directories writable, no new privileges, and no writable+executable
memory (what MemoryDenyWriteExecute= enforces), with discovery and metrics on."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import sys
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
from support import free_port, skip_or_fail, write_config

NOBODY = 65534
PR_SET_MDWE = 65  # what MemoryDenyWriteExecute= uses on kernels that have it
PR_MDWE_REFUSE_EXEC_GAIN = 1


def mdwe_supported() -> bool:
    """Return whether this kernel has PR_SET_MDWE (Linux 6.3+)."""
    try:
        subprocess.run(["true"], preexec_fn=deny_write_execute, check=True, timeout=10)
    except subprocess.SubprocessError:
        return False
    return True


def deny_write_execute() -> None:
    """In the child before exec: refuse writable+executable memory from now on."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def test_the_write_execute_denial_really_applies() -> None:
    """Negative control: under it, an anonymous W+X mapping is refused."""
    probe = (
        "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", probe],
            preexec_fn=deny_write_execute,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.SubprocessError as exc:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {exc}")
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    assert subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


@pytest.fixture
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_or_fail("needs root and setpriv to run the daemon as an unprivileged user")
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
    cfg = write_config(
        workdir / "etc",
        sections={
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "discovery": {"enabled": True, "interfaces": ["127.0.0.1"]},
        },
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
    if not mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    peer = ZcPeer.local("127.0.0.1", log=workdir / "peer.log")
    proc = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--no-new-privs",
            sys.executable,
            "-m",
            "nearestd.cli",
            "--config",
            str(cfg),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=deny_write_execute,
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
                names = [x["name"] for x in c.nearest("printer", k=20)["devices"]]
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
    snap = state / FILE_NAME
    assert snap.stat().st_uid == NOBODY and stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert snap.stat().st_mtime_ns != before  # rewritten by the daemon as that user
    saved = {s.device.name for s in decode_inventory(snap.read_bytes())}
    assert saved == {"Nobody's Printer", f"Sandbox Printer {os.getpid()}"}
    assert not (run / "admin.sock").exists() and not (run / "nearestd.sock").exists()
