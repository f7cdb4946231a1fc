"""The CUPS hook: one managed driverless queue per device, and the user's default printer.

It talks to CUPS only through its own command-line tools (``lpadmin``, ``lpoptions``,
``lpstat``), so it works against whichever scheduler ``CUPS_SERVER`` or ``client.conf``
names, with the user's own rights. Queues it creates carry a marker in ``printer-info``
(``... (managed by nearest: <device id>)``); only those are ever changed or removed.
Every failure becomes a ``CupsError`` whose message is one sentence for the user.

CUPS 2.3+ builds the IPP Everywhere PPD in the background after ``lpadmin`` has already
returned success, and an unreachable printer leaves a "Local Raw Printer" queue behind
without an error. So after creating a queue we wait until the driver is in place, and
remove the queue again if it never arrives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nearest_wire import DeviceView

MARKER = "managed by nearest"
MARKER_RE = re.compile(r"\(managed by nearest: (?P<id>[^()]+)\)\s*$")
QUEUE_PREFIX = "nearest-"
RAW_MODEL = "Local Raw Printer"
IPP_SCHEMES = ("ipp", "ipps")
DEFAULT_PORTS = {"ipp": 631, "ipps": 631}
MAX_QUEUE_NAME = 127


class CupsError(Exception):
    """CUPS could not do what was asked; ``str()`` is a sentence for the user."""


class SchedulerError(CupsError):
    """CUPS itself is missing, unreachable or refused the request."""


class DeviceUnusable(CupsError):
    """This device cannot become a driverless queue; another device might."""


@dataclass(frozen=True, slots=True)
class Queue:
    """One CUPS queue as ``lpstat`` lists it."""

    name: str
    uri: str
    info: str = ""
    location: str = ""

    @property
    def managed_id(self) -> str | None:
        """Return the device id if nearest manages this queue, else None."""
        m = MARKER_RE.search(self.info)
        return m.group("id") if m else None


def place_text(site: str | None, building: str | None, level: int | None, zone: str | None) -> str:
    """Return ``site / building / level N / zone``, leaving out what is unknown."""
    parts = [str(x) for x in (site, building) if x]
    if level is not None:
        parts.append(f"level {level}")
    if zone:
        parts.append(zone)
    return " / ".join(parts)


@dataclass(frozen=True, slots=True)
class Target:
    """The device a queue should point at, reduced to what CUPS needs."""

    device_id: str
    name: str
    uri: str
    location: str = ""

    @classmethod
    def from_reply(cls, device: DeviceView) -> Target:
        """Build from one device of a ``nearest`` reply."""
        return cls(
            device_id=device.id,
            name=device.name or device.id,
            uri=device.uri,
            location=place_text(device.site, device.building, device.level, device.zone),
        )

    @property
    def info(self) -> str:
        """Return the ``printer-info`` text that marks the queue as ours."""
        name = re.sub(r"[()\x00-\x1f]", "", self.name).strip() or self.device_id
        return f"{name} ({MARKER}: {self.device_id})"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``apply`` did: ``action`` is created, updated, unchanged or reused."""

    queue: str
    device_id: str
    uri: str
    action: str
    default_changed: bool

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {
            "queue": self.queue,
            "device": self.device_id,
            "uri": self.uri,
            "queue_action": self.action,
            "default_changed": self.default_changed,
        }


def queue_name(device_id: str) -> str:
    """Return the CUPS queue name for a device id: ``nearest-<id>``, sanitised.

    CUPS names are case-insensitive and allow no spaces, ``/``, ``#``, ``?`` or quotes;
    when sanitising changes the id, a short hash keeps two ids from sharing one queue.
    """
    clean = re.sub(r"[^a-z0-9_.-]+", "-", device_id.lower()).strip("-.") or "device"
    name = QUEUE_PREFIX + clean
    if clean != device_id or len(name) > MAX_QUEUE_NAME:
        digest = hashlib.sha256(device_id.encode()).hexdigest()[:8]
        name = name[: MAX_QUEUE_NAME - 9] + "-" + digest
    return name


def ipp_endpoint(uri: str) -> tuple[str, int] | None:
    """Return (host, port) if ``uri`` is an IPP or IPPS URI, else None."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in IPP_SCHEMES or not parts.hostname:
        return None
    return parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def parse_lpstat_v(text: str) -> dict[str, str]:
    """Parse ``lpstat -v``: queue name -> device URI."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"device for (\S+): (.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def parse_lpstat_long(text: str) -> dict[str, tuple[str, str]]:
    """Parse ``lpstat -l -p``: queue name -> (description, location)."""
    out: dict[str, tuple[str, str]] = {}
    current: str | None = None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"printer (\S+) ", line)
        if m:
            if current is not None:
                out[current] = (fields.get("Description", ""), fields.get("Location", ""))
            current, fields = m.group(1), {}
            continue
        m = re.match(r"\s+(Description|Location):\s?(.*)$", line)
        if m and current is not None:
            fields[m.group(1)] = m.group(2).strip()
    if current is not None:
        out[current] = (fields.get("Description", ""), fields.get("Location", ""))
    return out


def parse_lpstat_d(text: str) -> str | None:
    """Parse ``lpstat -d``: the default destination, or None."""
    m = re.search(r"default destination: (\S+)", text)
    return m.group(1).split("/", 1)[0] if m else None


def parse_lpoptions(text: str) -> dict[str, str]:
    """Parse ``lpoptions -p NAME``: attribute -> value."""
    out: dict[str, str] = {}
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    for word in words:
        key, sep, value = word.partition("=")
        out[key] = value if sep else ""
    return out


def translate(tool: str, stderr: str, action: str, server: str | None = None) -> CupsError:
    """Turn a CUPS tool's complaint into a sentence; choose the error class."""
    msg = " ".join(
        line.split(":", 1)[1].strip() if line.startswith(f"{tool}:") else line.strip()
        for line in stderr.strip().splitlines()
        if line.strip()
    )
    low = msg.lower()
    server = server or "the local CUPS scheduler"
    if "scheduler is not running" in low or "unable to connect to server" in low:
        return SchedulerError(f"cannot {action}: CUPS is not running or not reachable ({server}).")
    if "forbidden" in low or "not authorized" in low or "unauthorized" in low:
        return SchedulerError(
            f"cannot {action}: CUPS does not allow this user to manage printers "
            "(ask an administrator, or add the user to the lpadmin group)."
        )
    if "requires an ipp connection" in low or "bad device-uri" in low:
        return DeviceUnusable(f"cannot {action}: the device offers no IPP Everywhere endpoint.")
    if "unknown printer" in low or "does not exist" in low:
        return CupsError(f"cannot {action}: CUPS has no such queue.")
    return SchedulerError(f"cannot {action}: CUPS said: {msg or 'nothing (exit status only)'}.")


# Where distributions install CUPS filters when CUPS_SERVERBIN does not say.
FILTER_DIRS = ("/usr/lib/cups/filter", "/usr/libexec/cups/filter", "/usr/local/lib/cups/filter")
# What a driverless (IPP Everywhere) queue runs to print an ordinary file: text and other
# formats become PDF (texttopdf), PDF is prepared for the printer (pdftopdf). Both are in
# cups-filters; without them ``lp file.txt`` fails with Unsupported document-format.
NEEDED_FILTERS = ("texttopdf", "pdftopdf")
INSTALL_FILTERS = (
    "install cups-filters (Debian/Ubuntu: sudo apt install cups-filters; "
    "Fedora: sudo dnf install cups-filters)"
)


@dataclass(frozen=True, slots=True)
class Readiness:
    """What this machine lacks for a working driverless queue: sentences for the user."""

    missing_tools: tuple[str, ...]
    missing_filters: tuple[str, ...]
    advice: tuple[str, ...]


def _local_scheduler(env: Mapping[str, str]) -> bool:
    """Return whether the scheduler is on this machine (its filters are ours to check)."""
    server = env.get("CUPS_SERVER", "")
    if not server or server.startswith("/"):
        return True
    host = server.rsplit(":", 1)[0] if server.count(":") == 1 else server
    return host.strip("[]") in ("localhost", "127.0.0.1", "::1")


def readiness(env: Mapping[str, str] | None = None) -> Readiness:
    """Check for what a working IPP Everywhere queue needs: lpadmin, and cups-filters' filters.

    ``PATH`` says where the tools are; ``CUPS_SERVERBIN`` (as for cupsd) where the filters
    are, else the distributions' usual directories. A remote ``CUPS_SERVER`` runs its own
    filters, so only the tools are checked then.
    """
    env = os.environ if env is None else env
    path = env.get("PATH", os.defpath)
    tools = tuple(t for t in ("lpadmin", "lpstat", "lpoptions") if not shutil.which(t, path=path))
    advice = []
    if tools:
        advice.append(
            f"{', '.join(tools)} {'is' if len(tools) == 1 else 'are'} not installed: "
            "install the CUPS client tools (Debian/Ubuntu: sudo apt install cups-client; "
            "Fedora: sudo dnf install cups-client)."
        )
    filters: tuple[str, ...] = ()
    if _local_scheduler(env):
        serverbin = env.get("CUPS_SERVERBIN")
        dirs = [os.path.join(serverbin, "filter")] if serverbin else list(FILTER_DIRS)
        filters = tuple(
            f
            for f in NEEDED_FILTERS
            if not any(os.access(os.path.join(d, f), os.X_OK) for d in dirs)
        )
        if filters:
            advice.append(
                f"the CUPS filter{'s' if len(filters) > 1 else ''} {', '.join(filters)} "
                f"{'are' if len(filters) > 1 else 'is'} missing from {' or '.join(dirs)}: "
                "a driverless queue cannot print ordinary files without them "
                '(lp file.txt fails with Unsupported document-format "text/plain"); '
                f"{INSTALL_FILTERS}."
            )
    return Readiness(tools, filters, tuple(advice))


class Cups:
    """The CUPS command-line tools, with errors translated into sentences."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        driver_timeout: float = 30.0,
        interactive: bool = True,
    ) -> None:
        base = dict(os.environ if env is None else env)
        # The tools' messages are parsed: keep them in English.
        base["LC_ALL"] = "C"
        base["LANG"] = "C"
        self.env = base
        self.timeout = timeout
        self.driver_timeout = driver_timeout
        self.interactive = interactive

    def run(self, argv: Sequence[str], action: str, env: Mapping[str, str] | None = None) -> str:
        """Run one tool; return its stdout or raise a translated CupsError."""
        tool = argv[0]
        try:
            proc = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                errors="replace",
                env=dict(env or self.env),
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
                # Without a terminal CUPS cannot ask for a password, so it fails instead.
                start_new_session=not self.interactive,
            )
        except FileNotFoundError:
            raise SchedulerError(
                f"cannot {action}: {tool} is not installed (install the CUPS client tools, "
                "e.g. Debian's cups-client)."
            ) from None
        except subprocess.TimeoutExpired:
            raise SchedulerError(
                f"cannot {action}: {tool} did not finish within {self.timeout:g} s; "
                "is the CUPS scheduler responsive?"
            ) from None
        except OSError as exc:
            raise SchedulerError(f"cannot {action}: cannot run {tool}: {exc.strerror}.") from None
        if proc.returncode != 0:
            raise translate(tool, proc.stderr or proc.stdout, action, self.env.get("CUPS_SERVER"))
        return proc.stdout

    def queues(self) -> list[Queue]:
        """Return every queue the scheduler knows."""
        try:
            uris = parse_lpstat_v(self.run(["lpstat", "-v"], "list the CUPS queues"))
        except CupsError as exc:
            # lpstat exits 1 with "No destinations added." on an empty scheduler.
            if "no destinations" in str(exc).lower():
                return []
            raise
        if not uris:
            return []
        details = parse_lpstat_long(self.run(["lpstat", "-l", "-p"], "list the CUPS queues"))
        return [
            Queue(name, uri, *details.get(name, ("", ""))) for name, uri in sorted(uris.items())
        ]

    def managed(self) -> list[Queue]:
        """Return the queues nearest created."""
        return [q for q in self.queues() if q.managed_id is not None]

    def attributes(self, name: str) -> dict[str, str]:
        """Return the attributes ``lpoptions -p`` shows for one queue."""
        return parse_lpoptions(
            self.run(["lpoptions", "-p", name], f"read the CUPS queue {name}", self._user_env())
        )

    def default(self) -> str | None:
        """Return this user's default destination, or None."""
        return parse_lpstat_d(
            self.run(["lpstat", "-d"], "read the default printer", self._user_env())
        )

    def _user_env(self) -> dict[str, str]:
        # LPDEST/PRINTER would mask the default that lpoptions -d writes.
        return {k: v for k, v in self.env.items() if k not in ("LPDEST", "PRINTER")}

    def ensure_queue(self, target: Target) -> tuple[str, str]:
        """Create or reuse the queue for ``target``; return (queue name, action)."""
        if ipp_endpoint(target.uri) is None:
            scheme = target.uri.split(":", 1)[0] or "no URI"
            raise DeviceUnusable(
                f"{target.name} offers no IPP Everywhere endpoint (its URI is {scheme}://...), "
                "so CUPS cannot set it up driverless."
            )
        queues = self.queues()
        mine = [q for q in queues if q.managed_id == target.device_id]
        if mine:
            return self._refresh(mine[0], target)
        same_uri = [q for q in queues if q.uri == target.uri]
        if same_uri:
            return same_uri[0].name, "reused"
        name = queue_name(target.device_id)
        clash = next((q for q in queues if q.name.lower() == name.lower()), None)
        if clash is not None:
            raise CupsError(
                f"cannot create the queue {name}: a queue of that name already exists and "
                "nearest does not manage it; rename or remove it first."
            )
        self._check_reachable(target)
        self.run(
            [
                "lpadmin",
                "-p",
                name,
                "-E",
                "-v",
                target.uri,
                "-m",
                "everywhere",
                "-D",
                target.info,
                "-L",
                target.location,
                "-o",
                "printer-is-shared=false",
            ],
            f"create the queue {name} for {target.name}",
        )
        self._await_driver(name, target)
        return name, "created"

    def _refresh(self, queue: Queue, target: Target) -> tuple[str, str]:
        argv = ["lpadmin", "-p", queue.name]
        if queue.uri != target.uri:
            self._check_reachable(target)
            argv += ["-v", target.uri, "-m", "everywhere"]
        if queue.info != target.info:
            argv += ["-D", target.info]
        if queue.location != target.location:
            argv += ["-L", target.location]
        if len(argv) == 3:
            return queue.name, "unchanged"
        self.run(argv, f"update the queue {queue.name}")
        if queue.uri != target.uri:
            self._await_driver(queue.name, target, created=False)
        return queue.name, "updated"

    def _check_reachable(self, target: Target) -> None:
        endpoint = ipp_endpoint(target.uri)
        assert endpoint is not None
        host, port = endpoint
        try:
            with socket.create_connection((host, port), timeout=min(5.0, self.timeout)):
                pass
        except OSError as exc:
            raise DeviceUnusable(
                f"{target.name} is not reachable at {host}:{port} "
                f"({exc.strerror or exc}), so CUPS cannot ask it for its capabilities."
            ) from None

    def _await_driver(self, name: str, target: Target, created: bool = True) -> None:
        deadline = time.monotonic() + self.driver_timeout
        delay = 0.05
        while True:
            model = self.attributes(name).get("printer-make-and-model", "")
            if model and model != RAW_MODEL:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        if created:
            with contextlib.suppress(CupsError):
                self.run(["lpadmin", "-x", name], f"remove the unfinished queue {name}")
        raise DeviceUnusable(
            f"{target.name} at {target.uri} did not answer as an IPP Everywhere printer within "
            f"{self.driver_timeout:g} s, so CUPS could not set up a driverless queue"
            + (f"; the unfinished queue {name} was removed." if created else ".")
        )

    def set_default(self, name: str) -> bool:
        """Make ``name`` this user's default destination; return True if it changed."""
        if self.default() == name:
            return False
        self.run(["lpoptions", "-d", name], f"make {name} the default printer", self._user_env())
        return True

    def apply(self, target: Target) -> Outcome:
        """Make ``target`` the user's default printer through a managed queue."""
        name, action = self.ensure_queue(target)
        changed = self.set_default(name)
        return Outcome(name, target.device_id, target.uri, action, changed)

    def forget(self) -> list[str]:
        """Remove every queue nearest created; return their names."""
        removed = []
        default = None
        for queue in self.managed():
            if default is None:
                default = self.default() or ""
            if queue.name == default:
                # Drop the user's default first so it does not point at a missing queue.
                with contextlib.suppress(CupsError):
                    self.run(
                        ["lpoptions", "-x", queue.name],
                        f"clear the default printer {queue.name}",
                        self._user_env(),
                    )
            self.run(["lpadmin", "-x", queue.name], f"remove the queue {queue.name}")
            removed.append(queue.name)
        return removed
