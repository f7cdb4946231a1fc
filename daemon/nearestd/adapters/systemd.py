"""Talks to the service manager with the sd_notify datagram protocol.

The protocol is small enough to speak directly (no library): each message is one
datagram of newline-separated ``KEY=VALUE`` lines sent to the Unix socket named by
``$NOTIFY_SOCKET``, where a leading ``@`` means the abstract namespace. Without that
variable every call is a no-op, so the daemon runs the same outside systemd.
WATCHDOG pings come from a task on the event loop, so a stuck loop stops them and
systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from nearestd.adapters.component import Spawn, spawn_task
from nearestd.config import Config
from nearestd.service import Service

LOG = logging.getLogger("nearestd.systemd")
STATUS_EVERY = 10.0


def notify_address(value: str) -> str | None:
    """Return the socket address of a ``NOTIFY_SOCKET`` value, or None if it is unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Return seconds between WATCHDOG pings (half the timeout), or None when not asked for."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2_000_000


class Notifier:
    """Sends sd_notify messages; silent when the daemon is not run by systemd.

    As a component it goes last: started when everything else is (READY=1), stopped
    first (STOPPING=1), and it refreshes STATUS after a reload.
    """

    name = "systemd"

    def __init__(
        self,
        address: str | None,
        watchdog: float | None = None,
        status_of: Callable[[], str] | None = None,
        spawn: Spawn = spawn_task,
    ) -> None:
        self.address = address
        self._spawn = spawn
        self.watchdog = watchdog if address else None
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        self._warned = False
        self._status_of = status_of or (lambda: "serving")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Say READY=1 and keep the watchdog fed (nothing outside systemd)."""
        if not self.enabled:
            return
        self._task = self._spawn(self.keepalive(self._status_of), "watchdog")
        self.ready(self._status_of())

    async def stop(self) -> None:
        """Say STOPPING=1; stop the watchdog pings."""
        self.stopping()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.close()

    def reconfigure(self, cfg: Config) -> None:
        """Refresh STATUS after a reload."""
        if self.enabled:
            self.status(self._status_of())

    def stats(self) -> dict[str, Any]:
        """Return whether systemd is told, and how many messages went and failed."""
        return {"notify": self.enabled, "sent": self.sent, "failed": self.failed}

    @classmethod
    def from_environment(
        cls,
        env: MutableMapping[str, str] | None = None,
        status_of: Callable[[], str] | None = None,
        spawn: Spawn = spawn_task,
    ) -> Notifier:
        """Read and unset ``NOTIFY_SOCKET`` and the watchdog variables (children must not inherit them)."""
        if env is None:
            env = os.environ
        raw = env.pop("NOTIFY_SOCKET", "")
        watchdog = watchdog_interval(env, os.getpid())
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        address = notify_address(raw) if raw else None
        if raw and address is None:
            LOG.warning("NOTIFY_SOCKET not understood; not notifying", extra={"value": raw[:80]})
        return cls(address, watchdog, status_of, spawn)

    @property
    def enabled(self) -> bool:
        """Return whether there is a service manager to tell."""
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one message of ``KEY=VALUE`` lines; return whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            self.failed += 1
            if not self._warned:
                LOG.warning("cannot notify the service manager", extra={"error": str(exc)})
                self._warned = True
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        """Say the daemon is ready to serve."""
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        """Update the one-line status ``systemctl status`` shows."""
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        """Say the daemon is shutting down."""
        return self.notify("STOPPING=1", "STATUS=stopping")

    async def keepalive(self, status: Callable[[], str]) -> None:
        """Ping the watchdog at half its timeout and refresh STATUS; runs until cancelled."""
        period = min(self.watchdog or STATUS_EVERY, STATUS_EVERY)
        last_status = ""
        since_status = STATUS_EVERY
        while True:
            await asyncio.sleep(period)
            since_status += period
            if self.watchdog is not None:
                self.notify("WATCHDOG=1")
            if since_status >= STATUS_EVERY:
                since_status = 0.0
                try:
                    text = status()
                except Exception:
                    LOG.exception("cannot compute the status line")
                    continue
                if text != last_status:
                    self.status(text)
                    last_status = text

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(service: Service, now: float) -> str:
    """Return the STATUS text: the census's device counts and the site map's size."""
    return service.census(now).status_line(len(service.sitemap.zones))
