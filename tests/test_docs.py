"""The documentation stays true to the code."""

from __future__ import annotations

import subprocess
import sys

from support import ROOT


def test_configuration_reference_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_docs.py"), "--check"], timeout=60
    )
    assert r.returncode == 0, "docs/configuration.md is out of date: run `make docs`"


def test_metrics_reference_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "metrics_docs.py"), "--check"], timeout=60
    )
    assert r.returncode == 0, "docs/metrics.md is out of date: run `make docs`"


def test_readme_names_the_two_commands_and_every_op() -> None:
    text = (ROOT / "README.md").read_text()
    for needle in (
        "make run",
        "make test",
        "make bench",
        "nearest printer",
        "nearestctl",
        "`nearest`",
        "`locate`",
        "`devices`",
        "`ping`",
        "`privacy.export`",
        "`privacy.erase`",
        "`reload`",
        "`stats`",
    ):
        assert needle in text, needle
