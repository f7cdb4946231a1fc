"""The one face every edge shows the app: start, stop, reconfigure, stats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from nearestd.config import Config


@runtime_checkable
class Component(Protocol):
    """An adapter the app starts, stops and reconfigures; it never knows the app."""

    name: str

    async def start(self) -> None:
        """Open sockets and start background tasks; raise OSError if it cannot listen."""

    async def stop(self) -> None:
        """Close everything it opened and wait for its tasks; never raise."""

    def reconfigure(self, cfg: Config) -> None:
        """Follow a new, already validated config (called on the loop, between requests)."""

    def stats(self) -> Mapping[str, Any]:
        """Return an immutable view of its counters for `stats` and the metrics collector."""
