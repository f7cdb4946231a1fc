"""Fixtures shared by every test module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import DaemonProcess, write_config


@pytest.fixture
def demo_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A nearestd subprocess on the demo campus with sockets in tmp_path."""
    cfg = write_config(tmp_path)
    d = DaemonProcess(cfg).wait_ready()
    try:
        yield d
    finally:
        d.stop()
