"""The one face every edge shows the app: start, stop, reconfigure, stats."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from nearestd.config import Config


# Starts a component's long-running task; the app's runs it in its task group, where a
# task that fails is logged instead of stopping the daemon.
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def spawn_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a task on its own (a component used outside the app, as tests do)."""
    return asyncio.create_task(coro, name=name)


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
