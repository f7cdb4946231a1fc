"""The daemon as the unit runs it: an unprivileged user (as DynamicUser= gives) with only
its state and runtime directories writable."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nearest_client import Client, ClientError
from nearestd.adapters.snapshot import FILE_NAME
from nearestd.core.inventory import Saved, decode_inventory, encode_inventory
from nearestd.core.model import Device, DeviceKind
from support import skip_or_fail, write_config

NOBODY = 65534


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
    cfg = write_config(workdir / "etc")
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
        admin = (run / "admin.sock").stat()
        assert admin.st_uid == NOBODY and stat.S_IMODE(admin.st_mode) == 0o600
        assert stat.S_IMODE((run / "nearestd.sock").stat().st_mode) == 0o666
        before = (state / FILE_NAME).stat().st_mtime_ns
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
    snap = state / FILE_NAME
    assert snap.stat().st_uid == NOBODY and stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert snap.stat().st_mtime_ns != before  # rewritten by the daemon as that user
    assert [s.device.id for s in decode_inventory(snap.read_bytes())] == ["mdns-printer-nobody"]
    assert not (run / "admin.sock").exists() and not (run / "nearestd.sock").exists()
