"""`nearest printer --set-default` / `--forget` against a real private cupsd and ippeveprinter.

The laptop is the test process: on the daemon's Unix socket it counts as 127.0.0.1, and the
site map puts 127.0.0.0/8 in one zone. "Moving the laptop" rewrites the site map so that
prefix belongs to another zone, and reloads the daemon over its admin socket: exactly what
happens when the network the machine sits on is mapped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cups_peer import (
    IppPrinter,
    PrivateBus,
    PrivateCups,
    device,
    require_cups,
    short_tempdir,
    write_map,
    zone,
)
from nearest_client import Client
from staging import stage
from support import DaemonProcess, free_port, require_tools, tcp_url, write_config

pytestmark = pytest.mark.realpeer

LOOPBACK = ["127.0.0.0/8", "::1/128"]


class Printers:
    """Two real IPP Everywhere printers shared by the module."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.bus = PrivateBus(directory)
        self.a = IppPrinter(directory, "Printer A", self.bus)
        self.b = IppPrinter(directory, "Printer B", self.bus)

    def stop(self) -> None:
        for p in (self.a, self.b):
            p.stop()
        self.bus.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def printers() -> Iterator[Printers]:
    require_cups()
    directory = short_tempdir("ncp-")
    p = Printers(directory)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def cups() -> Iterator[PrivateCups]:
    require_cups()
    c = PrivateCups(short_tempdir("ncc-"))
    try:
        yield c
    finally:
        c.stop()


class Site:
    """A nearestd whose map has zones a, b, c; the laptop's prefix sits in one of them."""

    def __init__(self, directory: Path, printers: Printers, laptop_in: str) -> None:
        self.printers = printers
        directory.mkdir(parents=True, exist_ok=True)
        # What the site map says about prn-a; a test may change it and call move().
        self.a_name, self.a_uri = "Printer A", printers.a.uri
        self.map = directory / "site.geojson"
        self.write(laptop_in)
        cfg = write_config(directory, maps=[str(self.map)], subnets=[])
        self.daemon = DaemonProcess(cfg).wait_ready()
        self.socket = directory / "query.sock"

    def write(self, laptop_in: str) -> None:
        subnets = {
            z: (LOOPBACK if z == laptop_in else [f"10.77.{i}.0/24"])
            for i, z in enumerate(("a", "b", "c"))
        }
        write_map(
            self.map,
            [
                zone("a", "west", 0, subnets["a"]),
                zone("b", "east", 300, subnets["b"]),
                zone("c", "north", 600, subnets["c"]),
                device("prn-a", self.a_name, self.a_uri, "west", 0),
                device("prn-b", "Printer B", self.printers.b.uri, "east", 300),
                # The nearest device in zone c has no IPP endpoint at all.
                device(
                    "prn-c-raw",
                    "Raw Printer C",
                    "socket://127.0.0.1:9",
                    "north",
                    600,
                    {"color": True},
                ),
            ],
        )

    def move(self, laptop_in: str) -> None:
        self.write(laptop_in)
        with Client(f"unix://{self.daemon.admin}") as c:
            c.request({"op": "reload"})

    def stop(self) -> None:
        self.daemon.stop()


@pytest.fixture
def site(tmp_path: Path, printers: Printers) -> Iterator[Site]:
    s = Site(tmp_path / "site", printers, "a")
    try:
        yield s
    finally:
        s.stop()


def nearest(
    site: Site, cups: PrivateCups, *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**cups.env(), "NEAREST_SERVER": f"unix://{site.socket}", **extra}
    return subprocess.run(
        [sys.executable, "-m", "nearest_client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def default_of(cups: PrivateCups) -> str:
    return cups.tool("lpstat", "-d").strip()


def uris_of(cups: PrivateCups) -> dict[str, str]:
    out = {}
    for line in cups.tool("lpstat", "-v").splitlines():
        name, _, uri = line.removeprefix("device for ").partition(": ")
        out[name] = uri
    return out


def lpoptions_file(cups: PrivateCups) -> Path:
    return Path(cups.env()["HOME"]) / ".cups" / "lpoptions"


def test_set_default_creates_a_driverless_queue_and_makes_it_the_default(
    site: Site, cups: PrivateCups
) -> None:
    r = nearest(site, cups, "printer", "--set-default")
    assert r.returncode == 0, r.stderr
    assert "Created the CUPS queue nearest-prn-a" in r.stdout
    assert "nearest-prn-a is now your default printer: Printer A" in r.stdout
    assert default_of(cups) == "system default destination: nearest-prn-a"
    assert uris_of(cups) == {"nearest-prn-a": site.printers.a.uri}
    assert lpoptions_file(cups).read_text().split() == ["Default", "nearest-prn-a"]
    attrs = cups.tool("lpoptions", "-p", "nearest-prn-a")
    # The PPD came from the printer over IPP: driverless, not a raw queue.
    assert re.search(r"printer-make-and-model='[^']* - IPP Everywhere'", attrs), attrs
    assert "printer-info='Printer A (managed by nearest: prn-a)'" in attrs
    assert "printer-location='lab / west / level 0 / a'" in attrs
    assert "printer-is-shared=false" in attrs


def test_second_run_changes_nothing(site: Site, cups: PrivateCups) -> None:
    assert nearest(site, cups, "printer", "--set-default").returncode == 0
    before_ops = cups.admin_requests()
    before_attrs = cups.tool("lpoptions", "-p", "nearest-prn-a")
    before_file = lpoptions_file(cups).stat()
    r = nearest(site, cups, "printer", "--set-default")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        "nearest-prn-a is already your default printer: Printer A (lab / west / level 0 / a)."
    )
    assert cups.admin_requests() == before_ops == ["CUPS-Add-Modify-Printer"]
    assert cups.tool("lpoptions", "-p", "nearest-prn-a") == before_attrs
    after_file = lpoptions_file(cups).stat()
    assert (after_file.st_mtime_ns, after_file.st_ino) == (
        before_file.st_mtime_ns,
        before_file.st_ino,
    )
    assert uris_of(cups) == {"nearest-prn-a": site.printers.a.uri}


def test_a_printer_variable_that_masks_the_default_is_pointed_out(
    site: Site, cups: PrivateCups
) -> None:
    r = nearest(site, cups, "printer", "--set-default", PRINTER="office")
    assert r.returncode == 0, r.stderr
    assert r.stderr == (
        "nearest: note: $PRINTER=office overrides the CUPS default in programs that read it; "
        "unset it to print to the nearest printer.\n"
    )
    # The default is still set and read from lpoptions, not from $PRINTER.
    assert default_of(cups) == "system default destination: nearest-prn-a"
    r = nearest(site, cups, "printer", "--set-default", PRINTER="office")
    assert "already your default" in r.stdout


def test_a_zone_change_moves_the_default(site: Site, cups: PrivateCups) -> None:
    assert nearest(site, cups, "printer", "--set-default").returncode == 0
    site.move("b")
    r = nearest(site, cups, "printer", "--set-default", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["queue"] == "nearest-prn-b"
    assert out["queue_action"] == "created"
    assert out["default_changed"] is True
    assert out["where"]["zone"] == "b"
    assert default_of(cups) == "system default destination: nearest-prn-b"
    assert uris_of(cups) == {
        "nearest-prn-a": site.printers.a.uri,
        "nearest-prn-b": site.printers.b.uri,
    }
    # Back in zone a the existing queue is reused, not created again.
    site.move("a")
    ops = len(cups.admin_requests())
    r = nearest(site, cups, "printer", "--set-default")
    assert r.returncode == 0, r.stderr
    assert "Created" not in r.stdout
    assert default_of(cups) == "system default destination: nearest-prn-a"
    assert len(cups.admin_requests()) == ops


def test_a_changed_device_updates_its_managed_queue_in_place(site: Site, cups: PrivateCups) -> None:
    assert nearest(site, cups, "printer", "--set-default").returncode == 0
    # The administrator renames the device and gives it another URI for the same printer.
    site.a_name = "Printer A (2nd floor)"
    site.a_uri = f"ipp://localhost:{site.printers.a.port}/ipp/print"
    site.move("a")
    r = nearest(site, cups, "printer", "--set-default")
    assert r.returncode == 0, r.stderr
    assert f"Updated the CUPS queue nearest-prn-a for Printer A (2nd floor) ({site.a_uri})." in (
        r.stdout
    )
    assert uris_of(cups) == {"nearest-prn-a": site.a_uri}
    attrs = cups.tool("lpoptions", "-p", "nearest-prn-a")
    assert "printer-info='Printer A 2nd floor (managed by nearest: prn-a)'" in attrs
    assert re.search(r"printer-make-and-model='[^']* - IPP Everywhere'", attrs), attrs
    assert default_of(cups) == "system default destination: nearest-prn-a"


def test_a_foreign_queue_with_our_name_is_left_alone(site: Site, cups: PrivateCups) -> None:
    other = site.printers.b.uri
    cups.tool("lpadmin", "-p", "nearest-prn-a", "-E", "-v", other, "-m", "everywhere")
    r = nearest(site, cups, "printer", "--set-default")
    assert r.returncode == 3
    assert r.stderr == (
        "nearest: cannot create the queue nearest-prn-a: a queue of that name already exists "
        "and nearest does not manage it; rename or remove it first.\n"
    )
    assert uris_of(cups) == {"nearest-prn-a": other}
    assert default_of(cups) == "no system default destination"


def test_forget_removes_only_managed_queues(site: Site, cups: PrivateCups) -> None:
    # An administrator's own queue, pointing at the same printer under another URI.
    own_uri = f"ipp://localhost:{site.printers.a.port}/ipp/print"
    cups.tool("lpadmin", "-p", "office", "-E", "-v", own_uri, "-m", "everywhere", "-D", "Office")
    assert nearest(site, cups, "printer", "--set-default").returncode == 0
    site.move("b")
    assert nearest(site, cups, "printer", "--set-default").returncode == 0
    assert set(uris_of(cups)) == {"office", "nearest-prn-a", "nearest-prn-b"}
    r = nearest(site, cups, "printer", "--forget")
    assert r.returncode == 0, r.stderr
    assert "nearest-prn-a" in r.stdout and "nearest-prn-b" in r.stdout
    assert uris_of(cups) == {"office": own_uri}
    # The default pointed at a removed queue: it is cleared, not left dangling.
    assert default_of(cups) == "no system default destination"
    r = nearest(site, cups, "printer", "--forget")
    assert r.returncode == 0
    assert "nothing removed" in r.stdout
    assert uris_of(cups) == {"office": own_uri}


def test_an_existing_queue_for_the_same_printer_is_reused(site: Site, cups: PrivateCups) -> None:
    uri = site.printers.a.uri
    cups.tool("lpadmin", "-p", "office", "-E", "-v", uri, "-m", "everywhere", "-D", "Office")
    r = nearest(site, cups, "printer", "--set-default")
    assert r.returncode == 0, r.stderr
    assert "Using the existing CUPS queue office for Printer A." in r.stdout
    assert uris_of(cups) == {"office": uri}
    assert default_of(cups) == "system default destination: office"
    # Not ours: --forget leaves it alone.
    assert nearest(site, cups, "printer", "--forget").returncode == 0
    assert uris_of(cups) == {"office": uri}


def test_no_ipp_everywhere_endpoint_is_said_and_the_next_printer_used(
    site: Site, cups: PrivateCups
) -> None:
    site.move("c")
    r = nearest(site, cups, "printer", "--set-default")
    assert r.returncode == 0, r.stderr
    assert (
        "nearest: Raw Printer C offers no IPP Everywhere endpoint (its URI is socket://...), "
        "so CUPS cannot set it up driverless." in r.stderr
    )
    assert "Using the next nearest printer, Printer B." in r.stdout
    assert default_of(cups) == "system default destination: nearest-prn-b"
    # Colour: only the raw printer has it, so nothing can become the default.
    r = nearest(site, cups, "printer", "--set-default", "--color")
    assert r.returncode == 1
    assert "offers no IPP Everywhere endpoint" in r.stderr
    assert "none of the 1 nearest matching printers can be set up driverless" in r.stderr
    assert "Traceback" not in r.stderr
    assert default_of(cups) == "system default destination: nearest-prn-b"


def test_unreachable_and_non_ipp_printers_are_reported_in_sentences(
    tmp_path: Path, printers: Printers, cups: PrivateCups
) -> None:
    dead_port = free_port()
    # Accepts TCP connections but never speaks IPP: CUPS cannot build a driver for it.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        mute_port = mute.getsockname()[1]
        site = Site(tmp_path / "s", printers, "a")
        try:
            write_map(
                site.map,
                [
                    zone("a", "west", 0, LOOPBACK),
                    device(
                        "prn-dead",
                        "Dead Printer",
                        f"ipp://127.0.0.1:{dead_port}/ipp/print",
                        "west",
                        0,
                    ),
                    device(
                        "prn-mute",
                        "Mute Printer",
                        f"ipp://127.0.0.1:{mute_port}/ipp/print",
                        "west",
                        3,
                    ),
                ],
            )
            with Client(f"unix://{site.daemon.admin}") as c:
                c.request({"op": "reload"})
            r = nearest(site, cups, "printer", "--set-default", "--driver-timeout", "2")
        finally:
            site.stop()
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith(
        f"nearest: Dead Printer is not reachable at 127.0.0.1:{dead_port} ("
    ), r.stderr
    assert lines[1] == (
        f"nearest: Mute Printer at ipp://127.0.0.1:{mute_port}/ipp/print did not answer as an "
        "IPP Everywhere printer within 2 s, so CUPS could not set up a driverless queue; "
        "the unfinished queue nearest-prn-mute was removed."
    )
    assert lines[2] == (
        "nearest: none of the 2 nearest matching printers can be set up driverless; "
        "the default is unchanged"
    )
    assert uris_of_or_empty(cups) == {}
    assert default_of(cups) == "no system default destination"


def uris_of_or_empty(cups: PrivateCups) -> dict[str, str]:
    r = subprocess.run(["lpstat", "-v"], env=cups.env(), capture_output=True, text=True)
    return {} if r.returncode else uris_of(cups)


def test_cups_errors_are_sentences_with_exit_3(site: Site, cups: PrivateCups) -> None:
    # No scheduler at all.
    env = {**cups.env(), "CUPS_SERVER": str(cups.dir / "nothing-here.sock")}
    env["NEAREST_SERVER"] = f"unix://{site.socket}"
    r = subprocess.run(
        [sys.executable, "-m", "nearest_client.cli", "printer", "--set-default"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3
    assert "CUPS is not running or not reachable" in r.stderr
    assert "Traceback" not in r.stderr


def as_nobody(site: Site, cups: PrivateCups, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `nearest` as an ordinary user (nobody), with its own HOME."""
    require_tools("setpriv")
    home = cups.dir / "nobody-home"
    home.mkdir(exist_ok=True)
    os.chown(home, 65534, 65534)
    # Over TCP the laptop is 127.0.0.1 too, and needs no access to root's socket dir.
    env = {**cups.env(), "HOME": str(home), "NEAREST_SERVER": tcp_url(site.daemon.config)}
    env.pop("CUPS_SERVERROOT")
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--init-groups",
            stage().python,  # this checkout may sit where nobody cannot read it
            "-m",
            "nearest_client.cli",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )


def test_a_user_without_printer_rights_is_told_so(site: Site, cups: PrivateCups) -> None:
    r = as_nobody(site, cups, "printer", "--set-default")
    assert r.returncode == 3, r.stderr
    assert r.stderr == (
        "nearest: cannot create the queue nearest-prn-a for Printer A: CUPS does not allow this "
        "user to manage printers (ask an administrator, or add the user to the lpadmin group).\n"
    )
    assert uris_of_or_empty(cups) == {}


def test_an_ordinary_user_in_the_admin_group_gets_a_personal_default(site: Site) -> None:
    require_cups()
    # As in Debian's lpadmin group: members may add printers without a password.
    cups = PrivateCups(short_tempdir("ncc-"), system_groups="root nogroup")
    try:
        r = as_nobody(site, cups, "printer", "--set-default")
        assert r.returncode == 0, r.stderr
        assert "nearest-prn-a is now your default printer" in r.stdout
        lpoptions = cups.dir / "nobody-home" / ".cups" / "lpoptions"
        assert lpoptions.read_text().split() == ["Default", "nearest-prn-a"]
        assert lpoptions.stat().st_uid == 65534
        assert uris_of(cups) == {"nearest-prn-a": site.printers.a.uri}
        r = as_nobody(site, cups, "printer", "--set-default")
        assert r.returncode == 0 and "already your default" in r.stdout
        # root's own default is untouched: the default is per user.
        assert default_of(cups) == "no system default destination"
    finally:
        cups.stop()


def agent(site: Site, cups: PrivateCups, state: Path) -> subprocess.CompletedProcess[str]:
    return nearest(site, cups, "agent", "--settle", "0", "--state-dir", str(state))


def test_the_agent_follows_the_laptop_and_keeps_the_default_when_lost(
    tmp_path: Path, site: Site, cups: PrivateCups
) -> None:
    state = tmp_path / "agent"
    r = agent(site, cups, state)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (
        "nearest agent: default printer is now nearest-prn-a (Printer A, lab / west / level 0 / a)\n"
    )
    assert default_of(cups) == "system default destination: nearest-prn-a"
    r = agent(site, cups, state)
    assert r.stderr == "nearest agent: default printer stays nearest-prn-a (Printer A)\n"
    site.move("b")
    assert agent(site, cups, state).returncode == 0
    assert default_of(cups) == "system default destination: nearest-prn-b"
    # A network the site map does not know (e.g. at home): keep what we have.
    site.move("nowhere")
    r = agent(site, cups, state)
    assert r.returncode == 0
    assert "does not know this network; keeping the current default" in r.stderr
    # The daemon is gone altogether: still status 0, still the same default.
    site.stop()
    r = agent(site, cups, state)
    assert r.returncode == 0
    assert r.stderr.startswith("nearest agent: cannot reach nearestd at unix://")
    assert default_of(cups) == "system default destination: nearest-prn-b"
    assert uris_of(cups) == {
        "nearest-prn-a": site.printers.a.uri,
        "nearest-prn-b": site.printers.b.uri,
    }
