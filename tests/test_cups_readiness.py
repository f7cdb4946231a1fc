"""`nearest printer --set-default` says what a working driverless queue lacks: lpadmin, cups-filters.

Against the same real private cupsd and ippeveprinter as tests/test_cups_queues.py; the
filter check is pointed at a temporary CUPS_SERVERBIN, the tool check at a temporary PATH.
"""

# ruff: noqa: F811  (the fixtures imported from test_cups_queues are parameters here)

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cups_peer import PrivateCups
from nearest_client.cups import readiness
from test_cups_queues import (  # noqa: F401 (fixtures)
    Site,
    cups,
    default_of,
    nearest,
    printers,
    site,
)

pytestmark = pytest.mark.realpeer

FILTER_ADVICE = (
    "nearest: the CUPS filters texttopdf, pdftopdf are missing from {dir}: a driverless queue "
    "cannot print ordinary files without them (lp file.txt fails with Unsupported "
    'document-format "text/plain"); install cups-filters (Debian/Ubuntu: sudo apt install '
    "cups-filters; Fedora: sudo dnf install cups-filters)."
)
TOOL_ADVICE = (
    "nearest: lpadmin, lpstat, lpoptions are not installed: install the CUPS client tools "
    "(Debian/Ubuntu: sudo apt install cups-client; Fedora: sudo dnf install cups-client)."
)


def _serverbin(tmp_path: Path, filters: tuple[str, ...]) -> Path:
    root = tmp_path / "serverbin"
    (root / "filter").mkdir(parents=True)
    for name in filters:
        f = root / "filter" / name
        f.write_text("#!/bin/sh\nexit 0\n")
        f.chmod(0o755)
    return root


def _path_with(tmp_path: Path, tools: tuple[str, ...]) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        real = shutil.which(tool)
        assert real is not None
        (bin_dir / tool).symlink_to(real)
    return str(bin_dir)


def test_without_the_filters_set_default_says_to_install_cups_filters(
    site: Site,
    cups: PrivateCups,
    tmp_path: Path,
) -> None:
    serverbin = _serverbin(tmp_path, ())
    r = nearest(site, cups, "printer", "--set-default", CUPS_SERVERBIN=str(serverbin))
    assert FILTER_ADVICE.format(dir=serverbin / "filter") in r.stderr.splitlines(), r.stderr
    # The queue itself is made: PDF from applications may still print; the advice says what not.
    assert r.returncode == 0, r.stderr
    assert default_of(cups) == "system default destination: nearest-prn-a"


def test_with_one_filter_missing_it_names_that_one(tmp_path: Path) -> None:
    serverbin = _serverbin(tmp_path, ("pdftopdf",))
    ready = readiness({"PATH": os.environ["PATH"], "CUPS_SERVERBIN": str(serverbin)})
    assert ready.missing_filters == ("texttopdf",)
    assert ready.advice[-1].startswith(
        f"the CUPS filter texttopdf is missing from {serverbin / 'filter'}: "
    )


def test_with_the_filters_there_is_no_advice(
    site: Site,
    cups: PrivateCups,
    tmp_path: Path,
) -> None:
    serverbin = _serverbin(tmp_path, ("texttopdf", "pdftopdf"))
    r = nearest(site, cups, "printer", "--set-default", CUPS_SERVERBIN=str(serverbin))
    assert r.returncode == 0, r.stderr
    assert "cups-filters" not in r.stderr and "cups-client" not in r.stderr, r.stderr


def test_without_lpadmin_the_default_is_unchanged_and_it_says_what_to_install(
    site: Site,
    cups: PrivateCups,
    tmp_path: Path,
) -> None:
    serverbin = _serverbin(tmp_path, ("texttopdf", "pdftopdf"))
    r = nearest(
        site,
        cups,
        "printer",
        "--set-default",
        CUPS_SERVERBIN=str(serverbin),
        PATH=_path_with(tmp_path, ()),
    )
    assert TOOL_ADVICE in r.stderr.splitlines(), r.stderr
    assert "nearest: the default is unchanged" in r.stderr
    assert r.returncode == 3, r.stderr
    assert "nearest-prn-a" not in default_of(cups)


def test_a_remote_scheduler_runs_its_own_filters(tmp_path: Path) -> None:
    path = _path_with(tmp_path, ("lpadmin", "lpstat", "lpoptions"))
    env = {"PATH": path, "CUPS_SERVER": "print.example.net", "CUPS_SERVERBIN": str(tmp_path)}
    assert readiness(env).advice == ()
    env["CUPS_SERVER"] = "localhost:631"
    assert readiness(env).missing_filters == ("texttopdf", "pdftopdf")
