"""Discovery over loopback only (no namespaces needed): a real python-zeroconf responder
process and the daemon both bound to 127.0.0.1, never to a real interface."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lan import ZcPeer
from nearest_client import Client
from support import DaemonProcess, wait_for, write_config

TAG = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"  # other runs may share loopback


def ask(d: DaemonProcess, req: dict[str, Any], admin: bool = True) -> dict[str, Any]:
    sock = d.admin if admin else d.config.parent / "query.sock"
    with Client(f"unix://{sock}", timeout=5) as c:
        return c.request(req)


def mine(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in ask(d, {"op": "devices"})["devices"] if TAG in x["name"]}


def start(tmp_path: Path, **discovery: Any) -> DaemonProcess:
    cfg = write_config(
        tmp_path,
        sections={"discovery": {"enabled": True, "interfaces": ["127.0.0.1"], **discovery}},
    )
    return DaemonProcess(cfg).wait_ready()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[ZcPeer]:
    p = ZcPeer.local("127.0.0.1", log=tmp_path / "peer.log")
    try:
        yield p
    finally:
        p.close()


def test_loopback_add_queue_and_goodbye(tmp_path: Path, peer: ZcPeer) -> None:
    d = start(tmp_path)
    try:
        name = f"Loop Printer {TAG}"
        peer.register(
            "a",
            name,
            host=f"loop-{TAG}.local.",
            addresses=["127.0.0.1"],
            txt={"txtvers": "1", "rp": "ipp/print", "note": "Reception", "Duplex": "T"},
        )
        queue = f"Loop Queue {TAG}"
        peer.register(
            "q",
            queue,
            host=f"loopq-{TAG}.local.",
            addresses=["127.0.0.1"],
            txt={
                "txtvers": "1",
                "rp": "printers/q",
                "printer-type": "0x801046",
                "note": "Reception",
            },
        )
        inv = wait_for("both", lambda: (x := mine(d)) and len(x) == 2 and x)
        assert inv[name]["zone"] == "n0-lobby" and inv[name]["placed_by"] == "note"
        assert inv[queue]["is_queue"] is True and not inv[name]["is_queue"]
        answer = ask(d, {"op": "nearest", "kind": "printer", "k": 20}, admin=False)["devices"]
        names = {x["name"] for x in answer}
        assert name in names and queue not in names  # queues are listed, never answered
        hit = next(x for x in answer if x["name"] == name)
        assert hit["uri"] == "ipp://127.0.0.1:631/ipp/print" and hit["capabilities"]["duplex"]
        peer.unregister("a")
        # Loopback is shared with every other test on this machine (a flood may drop a
        # packet); the namespace LAN test holds the goodbye to its tight bound.
        wait_for("goodbye", lambda: name not in mine(d), timeout=10, show=d.logs)
    finally:
        d.stop()


def test_max_devices_bounds_the_table(tmp_path: Path, peer: ZcPeer) -> None:
    d = start(tmp_path, max_devices=3)
    try:
        for i in range(5):
            peer.register(
                f"m{i}", f"Many {i} {TAG}", host=f"many{i}-{TAG}.local.", addresses=["127.0.0.1"]
            )
        wait_for(
            "refusals",
            lambda: ask(d, {"op": "stats"})["stats"]["discovery"]["refused_over_max_devices"] >= 2,
        )
        assert len(mine(d)) <= 3
        assert "max_devices" in d.logs()
    finally:
        d.stop()


def test_unknown_interface_is_reported_and_the_daemon_serves(tmp_path: Path) -> None:
    d = start(tmp_path, interfaces=["nosuch0"])
    try:
        stats = wait_for(
            "the error", lambda: (x := ask(d, {"op": "stats"})["stats"]["discovery"])["error"] and x
        )
        assert stats["running"] is False
        assert stats["error"] == "[discovery] interfaces: no interface named 'nosuch0'"
        assert "no interface named" in d.logs()
        assert ask(d, {"op": "ping"}, admin=False)["ok"]
    finally:
        d.stop()


def test_reload_reopens_links_and_disabling_forgets_devices(tmp_path: Path, peer: ZcPeer) -> None:
    d = start(tmp_path, interfaces=["nosuch0"])
    try:
        name = f"Reload Printer {TAG}"
        peer.register("r", name, host=f"reload-{TAG}.local.", addresses=["127.0.0.1"])
        wait_for("the error", lambda: ask(d, {"op": "stats"})["stats"]["discovery"]["error"])
        text = d.config.read_text()
        d.config.write_text(text.replace('interfaces = ["nosuch0"]', 'interfaces = ["lo"]'))
        assert ask(d, {"op": "reload"})["ok"]
        wait_for("found after reload", lambda: name in mine(d), show=d.logs)
        stats = ask(d, {"op": "stats"})["stats"]["discovery"]
        assert stats["running"] and stats["interfaces"] == ["lo"] and stats["error"] is None
        on = "[discovery]\nenabled = true"
        assert on in d.config.read_text()
        d.config.write_text(d.config.read_text().replace(on, "[discovery]\nenabled = false"))
        assert ask(d, {"op": "reload"})["ok"]
        wait_for("forgotten when disabled", lambda: name not in mine(d), show=d.logs)
        assert ask(d, {"op": "stats"})["stats"]["discovery"]["running"] is False
    finally:
        d.stop()
