"""Warm restart with real discovery: a python-zeroconf printer on loopback, kill -9, restart.

The restarted daemon answers with the printer (stale) before its own discovery has
heard anything, and the printer loses the stale mark once it is announced again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lan import ZcPeer
from nearest_client import Client
from nearestd.adapters.snapshot import FILE_NAME
from nearestd.core.inventory import decode_inventory
from support import DaemonProcess, wait_for, write_config

TAG = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"  # other runs may share loopback
NAME = f"Warm Printer {TAG}"


def answered(d: DaemonProcess) -> dict[str, Any] | None:
    with Client(f"unix://{d.config.parent / 'query.sock'}", timeout=5) as c:
        reply = c.request({"op": "nearest", "kind": "printer", "k": 20})
    return next((x for x in reply["devices"] if x["name"] == NAME), None)


def advertise(peer: ZcPeer) -> None:
    peer.register(
        "w",
        NAME,
        host=f"warm-{TAG}.local.",
        addresses=["127.0.0.1"],
        txt={"txtvers": "1", "rp": "ipp/print", "note": "Reception", "Color": "T"},
    )


def test_kill_9_restart_serves_discovered_devices_stale_until_rediscovered(
    tmp_path: Path,
) -> None:
    cfg = write_config(
        tmp_path,
        sections={
            "discovery": {"enabled": True, "interfaces": ["127.0.0.1"], "expire_after": "60s"}
        },
    )
    snapshot = tmp_path / "state" / FILE_NAME
    peer = ZcPeer.local("127.0.0.1", log=tmp_path / "peer.log")
    first = DaemonProcess(cfg).wait_ready()
    try:
        advertise(peer)
        live = wait_for("discovery", lambda: answered(first), 15.0)
        assert live["state"] != "stale" and live["zone"] == "n0-lobby"
        wait_for(
            "snapshot with the printer",
            lambda: (
                snapshot.exists()
                and NAME in {s.device.name for s in decode_inventory(snapshot.read_bytes())}
            ),
            15.0,
        )
    finally:
        first.kill()  # SIGKILL: no shutdown flush, no goodbyes
        peer.kill()  # the printer goes quiet: nothing can rediscover it yet
    second = DaemonProcess(cfg).wait_ready()
    peer = ZcPeer.local("127.0.0.1", log=tmp_path / "peer2.log")
    try:
        got = answered(second)
        assert got is not None, "the restarted daemon answers from its snapshot at once"
        assert got["state"] == "stale" and got["stale"] is True
        assert got["id"] == live["id"] and got["capabilities"]["color"] is True
        advertise(peer)
        fresh = wait_for(
            "rediscovery",
            lambda: (x := answered(second)) is not None and not x["stale"] and x,
            15.0,
        )
        assert fresh["id"] == live["id"] and fresh["state"] != "stale"
    finally:
        second.stop()
        peer.close()
