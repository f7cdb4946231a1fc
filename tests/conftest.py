"""Fixtures shared by every test module."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guards import guarded_loop, no_leaked_threads
from lan import Lan, can_run
from mosquitto import Mosquitto
from support import DaemonProcess, require_tools, skip_or_fail, write_config

__all__ = ["guarded_loop", "no_leaked_threads"]  # autouse guards (tests/guards.py)


@pytest.fixture
def demo_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A nearestd subprocess on the demo campus with sockets in tmp_path."""
    cfg = write_config(tmp_path)
    d = DaemonProcess(cfg).wait_ready()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def lan() -> Iterator[Lan]:
    """An isolated namespace LAN (tests/lan.py), shared by the session; skip or fail without root."""
    reason = can_run()
    if reason:
        skip_or_fail(f"cannot build the test LAN: {reason}")
    net = Lan(n_hosts=8).up()
    try:
        yield net
    finally:
        net.down()


@pytest.fixture(scope="session")
def mosquitto_broker() -> Iterator[Mosquitto]:
    """One private mosquitto on a free loopback port for the session (tests/mosquitto.py)."""
    require_tools("mosquitto")
    broker = Mosquitto().start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mqtt_prefix() -> str:
    """A fresh topic prefix per test, so tests sharing the broker never see each other."""
    return f"test/{uuid.uuid4().hex[:12]}"
