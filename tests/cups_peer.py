"""Real CUPS peers for the workstation tests: a private cupsd and ippeveprinter on loopback.

Nothing here touches the host's CUPS: cupsd gets its own ServerRoot, state, cache, spool
and logs under a temp dir and listens only on its own Unix socket (no TCP port, no
browsing). ippeveprinter is started with ``-n localhost`` so it binds 127.0.0.1 and ::1
only, and ``-r off`` so it registers nothing; it still insists on reaching a DNS-SD
daemon over the system bus, so it gets a private dbus-daemon (no avahi: the Avahi client
starts in "connecting" state and never sends a packet).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from support import device_feature, free_port, require_tools, skip_or_fail, zone_feature

CUPS_TOOLS = ("cupsd", "lpadmin", "lpoptions", "lpstat", "ippeveprinter", "dbus-daemon")

DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/>
    <allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""

CUPS_FILES_CONF = """ServerRoot {d}/etc
StateDir {d}/state
CacheDir {d}/cache
RequestRoot {d}/spool
TempDir {d}/tmp
AccessLog {d}/log/access_log
ErrorLog {d}/log/error_log
PageLog {d}/log/page_log
Printcap {d}/printcap
ServerKeychain {d}/ssl
SystemGroup {groups}
"""

CUPSD_CONF = """Listen {d}/cups.sock
LogLevel info
Browsing No
BrowseLocalProtocols none
WebInterface No
DefaultAuthType Basic
<Location />
  Order allow,deny
  Allow all
</Location>
<Policy default>
  <Limit CUPS-Add-Modify-Printer CUPS-Delete-Printer CUPS-Set-Default>
    AuthType Default
    Require user @SYSTEM
    Order deny,allow
  </Limit>
  <Limit All>
    Order deny,allow
  </Limit>
</Policy>
"""


def require_cups() -> None:
    """Skip (or fail under CI) unless the CUPS peers can run here."""
    require_tools(*CUPS_TOOLS)
    if os.geteuid() != 0:
        # cupsd insists on running as root (it drops to lp for filters).
        skip_or_fail("a private cupsd needs root")


def short_tempdir(prefix: str) -> Path:
    """Return a fresh dir under /tmp, short enough for Unix socket paths."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _wait(cond: Any, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited {proc.returncode}: {log.read_text(errors='replace')}"
            )
        time.sleep(0.02)
    raise RuntimeError(f"{what} not ready in {timeout}s: {log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class PrivateBus:
    """A dbus-daemon on its own socket, standing in for the system bus."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "bus.sock"
        conf = directory / "dbus.conf"
        conf.write_text(DBUS_CONF.format(path=self.path))
        self.log = directory / "dbus.log"
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(self.path.exists, 10, "dbus-daemon", self.proc, self.log)
        self.address = f"unix:path={self.path}"

    def stop(self) -> None:
        """Stop the bus."""
        _stop(self.proc)


class IppPrinter:
    """CUPS's ippeveprinter: a real IPP Everywhere printer on 127.0.0.1 and ::1 only."""

    def __init__(self, directory: Path, name: str, bus: PrivateBus) -> None:
        self.name = name
        self.port = free_port()
        spool = directory / f"spool-{self.port}"
        spool.mkdir(parents=True)
        self.log = directory / f"ippeveprinter-{self.port}.log"
        self.proc = subprocess.Popen(
            [
                "ippeveprinter",
                "-n",
                "localhost",
                "-p",
                str(self.port),
                "-r",
                "off",
                "-d",
                str(spool),
                # Its TLS key and certificate stay here, not in /etc/cups/ssl.
                "-K",
                str(directory / "ssl"),
                "-M",
                "Nearest",
                "-m",
                name,
                name,
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
            start_new_session=True,
        )
        _wait(self._listening, 15, f"ippeveprinter {name}", self.proc, self.log)

    @property
    def uri(self) -> str:
        """Return the printer's IPP URI on loopback."""
        return f"ipp://127.0.0.1:{self.port}/ipp/print"

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the printer."""
        _stop(self.proc)


class PrivateCups:
    """cupsd with its own configuration, state and Unix socket; no TCP, no browsing."""

    def __init__(self, directory: Path, system_groups: str = "root") -> None:
        self.dir = directory
        for sub in ("etc", "state", "cache", "spool", "tmp", "log", "home", "client", "ssl"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        # cupsd runs filters as lp and refuses world-unsafe paths: keep modes conventional.
        for path in [directory, *directory.iterdir()]:
            path.chmod(0o755)
        (directory / "etc" / "cups-files.conf").write_text(
            CUPS_FILES_CONF.format(d=directory, groups=system_groups)
        )
        (directory / "etc" / "cupsd.conf").write_text(CUPSD_CONF.format(d=directory))
        self.socket = directory / "cups.sock"
        self.log = directory / "log" / "stdout"
        self.proc = subprocess.Popen(
            [
                "cupsd",
                "-f",
                "-c",
                str(directory / "etc" / "cupsd.conf"),
                "-s",
                str(directory / "etc" / "cups-files.conf"),
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(self._ready, 15, "cupsd", self.proc, self.log)

    def env(self) -> dict[str, str]:
        """Return the environment that points the CUPS tools at this cupsd only."""
        env = {k: v for k, v in os.environ.items() if k not in ("LPDEST", "PRINTER")}
        env.update(
            CUPS_SERVER=str(self.socket),
            # As root, lpoptions would write the server root's lpoptions: keep it here.
            CUPS_SERVERROOT=str(self.dir / "client"),
            HOME=str(self.dir / "home"),
            LC_ALL="C",
        )
        return env

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        r = subprocess.run(["lpstat", "-r"], env=self.env(), capture_output=True, text=True)
        return "is running" in r.stdout

    def tool(self, *argv: str) -> str:
        """Run a CUPS tool against this cupsd; return stdout (raise on failure)."""
        r = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"{argv} failed {r.returncode}: {r.stderr}")
        return r.stdout

    def admin_requests(self) -> list[str]:
        """Return the administrative operations CUPS carried out, in order."""
        path = self.dir / "log" / "access_log"
        if not path.exists():
            return []
        ops = ("CUPS-Add-Modify-Printer", "CUPS-Delete-Printer", "CUPS-Set-Default")
        # A 401 line is the tool's first, unauthenticated try; only a 200 changed anything.
        lines = [line for line in path.read_text().splitlines() if '" 200 ' in line]
        return [op for line in lines for op in ops if op in line]

    def stop(self) -> None:
        """Stop cupsd and remove its files."""
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def zone(zid: str, building: str, x: float, subnets: list[str]) -> dict[str, Any]:
    """Return a 10 m square zone feature at longitude offset ``x`` (metres, roughly)."""
    lon, lat, d = 4.89 + x / 68000.0, 52.37, 10 / 68000.0
    ring = [[lon, lat], [lon + d, lat], [lon + d, lat + d / 1.6], [lon, lat + d / 1.6], [lon, lat]]
    return zone_feature(zid, ring, subnets, building=building, name=f"Zone {zid}")


def device(
    did: str,
    name: str,
    uri: str,
    building: str,
    x: float,
    caps: dict[str, Any] | None = None,
    kind: str = "printer",
) -> dict[str, Any]:
    """Return a static device feature inside the zone at offset ``x``."""
    lon, lat = 4.89 + (x + 5) / 68000.0, 52.37 + 3 / 68000.0 / 1.6
    return device_feature(
        did,
        name,
        kind,
        uri,
        (lon, lat),
        building=building,
        make_model="ippeveprinter",
        capabilities=caps or {"duplex": True, "paper_max": "legal-A4"},
    )


def write_map(path: Path, features: list[dict[str, Any]]) -> Path:
    """Write a FeatureCollection."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1))
    return path
