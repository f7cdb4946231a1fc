"""Fixtures shared by every test module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lan import Lan, can_run
from support import DaemonProcess, skip_or_fail, write_config


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
