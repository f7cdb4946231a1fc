"""Wires the service and its components together on one event loop; reload; signals.

The app owns the list of components (``adapters/component.py``): it starts them in
order, reconfigures them after a reload and stops them in reverse, and it runs its own
background tasks (the ticker, the reload worker) in one ``asyncio.TaskGroup`` whose
tasks log their failure instead of taking the daemon down.

Reload has one path, whoever asks (SIGHUP, ``nearestctl reload``, the admin op): the
config and site maps are read and validated, and the new device table and neighbour
lists built, in a worker thread; the loop then swaps them in between two requests, and
the old ones are freed in the worker thread a piece at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from nearestd.adapters.component import Component
from nearestd.adapters.metrics import MetricsExporter
from nearestd.adapters.poller import Poller
from nearestd.adapters.snapshot import InventorySnapshots
from nearestd.adapters.socket_server import SocketServers
from nearestd.adapters.systemd import Notifier, status_line
from nearestd.config import Config, ConfigError
from nearestd.loader import World, config_addresses, load_world, map_addresses
from nearestd.logs import host_literals, set_infrastructure
from nearestd.service import Carry, Prepared, Service, prepare

LOG = logging.getLogger("nearestd")
TICK_SECONDS = 0.5
# The longest the background warming of neighbour lists holds the loop at a time.
WARM_SLICE = 0.005
SHUTDOWN_GRACE = 3.0
# SIGTERM to exit stays under 5 s even when a component hangs in its stop.
STOP_BUDGET = 3.5
# Free an old world this many objects at a time, so that no single free holds the GIL long.
RELEASE_CHUNK = 2000
RELEASE_DEPTH = 8
RELOAD_SWITCH_INTERVAL = 0.001
T = TypeVar("T")


def new_key() -> bytes:
    """Return a fresh random 256-bit pseudonym key."""
    return secrets.token_bytes(32)


class Daemon:
    """The running daemon: the service, its components and the app's background tasks."""

    def __init__(self, world: World, config_path: str) -> None:
        self.config_path = config_path
        self.world = world
        self.service = Service(
            world.config,
            world.sitemap,
            time.time(),
            new_key,
            sections=self.sections,
            reload=self.reload,
        )
        self._stop = asyncio.Event()
        self._exit = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.reloads_ok = 0
        self.warmed_in: float | None = None
        self.reloads_failed = 0
        self.last_reload = 0.0
        self.last_reload_ok = True
        self._reloading: asyncio.Task[None] | None = None
        self._reload_waiters: list[asyncio.Future[list[str]]] = []
        # Set by serve(): the world is frozen out of the cyclic collector between reloads.
        self.freeze_gc = False
        service = self.service
        cfg = world.config
        # Started in this order, stopped in reverse: the saved inventory is back before
        # discovery starts, the sockets open when everything answers, READY=1 comes last.
        spawn = self.spawn
        self.snapshots = InventorySnapshots(service, spawn=spawn)
        self.components: list[Component] = [self.snapshots]
        if cfg.discovery.enabled:
            from nearestd.adapters.mdns import MdnsDiscovery

            self.components.append(MdnsDiscovery(service, cfg.discovery, spawn=spawn))
        self.components.append(Poller(service, cfg.poller, spawn=spawn))
        if cfg.mqtt is not None:
            from nearestd.adapters.mqtt import MqttAdapter

            self.components.append(MqttAdapter(service, cfg.mqtt, cfg, spawn=spawn))
        if cfg.dnssd is not None:
            from nearestd.adapters.dnssd import DnssdServer

            self.components.append(DnssdServer(service, cfg.dnssd))
        if cfg.web is not None:
            from nearestd.adapters.web import WebView

            self.components.append(WebView(service, cfg))
        self.metrics = MetricsExporter(service, self.sections)
        self.components.append(self.metrics)
        self.sockets = SocketServers(service)
        self.components.append(self.sockets)
        self.notifier = Notifier.from_environment(
            status_of=lambda: status_line(self.service, time.time()), spawn=spawn
        )
        self.components.append(self.notifier)
        self.note_infrastructure()

    def note_infrastructure(self) -> None:
        """Tell the log filter which addresses are the config's, the maps' and our sockets'."""
        own: set[str] = set()
        for address in self.addresses:
            own |= host_literals(address)
        sitemap = self.world.sitemap
        set_infrastructure(
            config_addresses(self.world.config) | own, lambda: map_addresses(sitemap)
        )

    @property
    def config(self) -> Config:
        """Return the current config."""
        return self.service.cfg

    @property
    def addresses(self) -> list[str]:
        """Return the addresses the sockets listen on."""
        return self.sockets.addresses

    # ---- figures ---------------------------------------------------------------------------
    def sections(self) -> dict[str, Mapping[str, Any]]:
        """Return the app's reload figures and every component's ``stats()``, by name."""
        out: dict[str, Mapping[str, Any]] = {
            "operations": {
                "reloads_ok": self.reloads_ok,
                "reloads_failed": self.reloads_failed,
                "last_reload_ok": self.last_reload_ok,
                "last_reload": self.last_reload or self.service.stats.started,
                # Seconds the background warming of neighbour lists took; None until done.
                "lists_warmed_in": self.warmed_in,
            },
            # Refused, rate-limited and malformed requests: the service counts them.
            "security": self.service.security_view(),
        }
        for component in self.components:
            try:
                out[component.name] = component.stats()
            except Exception:
                LOG.exception("component stats failed", extra={"component": component.name})
        return out

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the components in order and the app's tasks; raise OSError if one cannot listen."""
        self._group = await self._exit.enter_async_context(asyncio.TaskGroup())
        self.spawn(self._ticker(), "ticker")
        for component in self.components:
            await component.start()
        self.note_infrastructure()  # the sockets' own addresses, now bound
        self.spawn(self._warm(), "warm")
        LOG.info(
            "serving",
            extra={
                "listen": ",".join(self.addresses),
                "zones": len(self.service.sitemap.zones),
                "devices": len(self.service.table),
            },
        )

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a background task in the app's task group; its failure is logged, not fatal."""
        guarded = _guarded(coro, name)
        if self._group is not None:
            task = self._group.create_task(guarded, name=name)
        else:
            # Not started (a test driving the daemon directly): cancelled at stop all the same.
            task = asyncio.create_task(guarded, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _warm(self) -> None:
        """Build every zone's neighbour lists in slices of the loop's idle time after start.

        Start-up does not wait for them (a query builds what it misses); warming them here
        makes each zone's first client as quick as the rest without delaying anyone by more
        than one slice.
        """
        steps = self.service.warming()
        table = self.service.table
        started = time.perf_counter()
        lists = 0
        while self.service.table is table:  # a reload builds its own lists, off the loop
            end = time.perf_counter() + WARM_SLICE
            for _ in steps:
                lists += 1
                if time.perf_counter() >= end:
                    break
            else:
                self.warmed_in = time.perf_counter() - started
                if self.freeze_gc:
                    # The lists live as long as the table: a full collection walking them
                    # (millions of objects on a large map) would stall queries ~100 ms.
                    gc.collect(1)
                    gc.freeze()
                LOG.info(
                    "neighbour lists warmed",
                    extra={"lists": lists, "seconds": round(self.warmed_in, 3)},
                )
                return
            await asyncio.sleep(0)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.service.tick(time.time())
                self.sockets.conns.sweep()
            except Exception:
                LOG.exception("tick failed")

    def request_stop(self) -> None:
        """Ask the daemon to shut down."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Wait until a stop is requested."""
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop the components in reverse (each within the budget), then the app's tasks."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_BUDGET
        for component in reversed(self.components):
            try:
                grace = min(SHUTDOWN_GRACE, deadline - loop.time())
                await asyncio.wait_for(component.stop(), max(0.1, grace))
            except Exception:
                LOG.exception("component stop failed", extra={"component": component.name})
        for waiter in self._reload_waiters:
            waiter.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._exit.aclose()
        self._group = None

    # ---- reload ------------------------------------------------------------------------------
    def reload_in_background(self) -> None:
        """Reload for SIGHUP: the same path as ``reload``, nobody waiting for the answer."""
        self._request_reload()

    def reload(self) -> asyncio.Future[list[str]]:
        """Load config and site maps again; switch only if all of it is valid; return problems.

        Asked at once, awaited by the caller. Requests that come while a reload reads
        the files get the next one: each asker's answer is about files read after it asked.
        """
        return asyncio.shield(self._request_reload())

    def _request_reload(self) -> asyncio.Future[list[str]]:
        waiter: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._reload_waiters.append(waiter)
        if self._reloading is None or self._reloading.done():
            self._reloading = self.spawn(self._reload_worker(), "reload")
        return waiter

    async def _reload_worker(self) -> None:
        while self._reload_waiters:
            waiters, self._reload_waiters = self._reload_waiters, []
            try:
                problems = await self._reload_once()
            except Exception as exc:
                LOG.exception("reload failed")
                problems = self._refuse([f"internal error: {type(exc).__name__}"])
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(problems)

    async def _reload_once(self) -> list[str]:
        carry = self.service.carry()
        # The loop's thread waits up to one switch interval for the GIL each time it wants
        # it back while the worker builds: shorter turns keep query delays short.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(RELOAD_SWITCH_INTERVAL)
        freeze = self.freeze_gc
        if freeze:
            # Building a world allocates millions of objects: with the collector on, its
            # full passes over them would hold the GIL (and so the loop) for 100s of ms.
            gc.disable()
        core = share_one_core()
        cpu = None if core is None else core[0]
        try:
            try:
                prepared = await in_thread(self._prepare, carry, cpu=cpu)
            except ConfigError as exc:
                return self._refuse(exc.problems)
            old = self._switch(prepared)
            # The old world's last references are in ``old`` now, to be freed off the loop.
            del prepared, carry
            try:
                await in_thread(release, old, cpu=cpu)
            except Exception:
                LOG.exception("freeing the old world failed")
            del old
        finally:
            sys.setswitchinterval(interval)
            if core is not None:
                restore_cores(*core)
            if freeze:
                gc.freeze()
                gc.enable()
        return []

    def _prepare(self, carry: Carry) -> Prepared:
        """Read, validate and build the new world (worker thread: touches nothing in use).

        Not through the compiled-map cache, either way: unpickling or pickling a large
        map is one C call that holds the GIL (measured: 0.2-0.7 s), stalling every query.
        The cache is written at the next start.
        """
        world = load_world(self.config_path)
        return prepare(world.config, world.sitemap, carry)

    def save_map_cache(self, world: World) -> None:
        """Write the compiled site map in a worker thread, if the world was not read from it."""
        save = world.save_cache
        if save is None:
            return

        async def run() -> None:
            try:
                await in_thread(save)
            except Exception:
                LOG.exception("site map cache not written")

        self.spawn(run(), "map-cache")

    def _refuse(self, problems: list[str]) -> list[str]:
        self.reloads_failed += 1
        self.last_reload_ok = False
        for problem in problems:
            # Problems quote the config and site-map files: shown as written there.
            LOG.error("reload refused", extra={"problem": problem, "_verbatim": ("problem",)})
        return problems

    def _switch(self, prepared: Prepared) -> list[object]:
        """Swap the prepared world in (on the loop, between requests); return the old one."""
        old_world = self.world
        old_sitemap, old_table = self.service.swap(prepared)
        self.world = World(prepared.cfg, prepared.sitemap)
        self.note_infrastructure()
        for component in self.components:
            try:
                component.reconfigure(prepared.cfg)
            except Exception:
                # The new configuration is in force; one component failing to follow must
                # not leave the others (or the counters) behind.
                LOG.exception("component reconfigure failed", extra={"component": component.name})
        self.reloads_ok += 1
        self.last_reload_ok = True
        self.last_reload = time.time()
        LOG.info(
            "reloaded",
            extra={"zones": len(prepared.sitemap.zones), "devices": len(self.service.table)},
        )
        return [old_world, old_sitemap, old_table, prepared.carry]


def share_one_core() -> tuple[int, set[int]] | None:
    """Keep the loop's thread on one core for a reload; return (that core, its old set).

    The reload's worker is put on the same core. On two cores, a CPU-bound worker on the
    other core takes the GIL back each time the loop's thread drops it for a system call
    (a read, a write, a poll), before that thread can run again: queries waited up to
    80-180 ms. On one shared core the scheduler hands the GIL over at once (measured with
    the reload bench: the largest delay 30-36 ms, the reload no slower). None where
    there is one core, or no affinity to set.
    """
    try:
        cpus = os.sched_getaffinity(0)
        if len(cpus) < 2:
            return None
        cpu = min(cpus)
        os.sched_setaffinity(0, {cpu})  # 0: the calling thread only, on Linux
    except (OSError, AttributeError):
        return None
    return cpu, cpus


def restore_cores(cpu: int, cpus: set[int]) -> None:
    """Give every thread still held to ``cpu`` (the loop's, and any started meanwhile) ``cpus``."""
    for thread in threading.enumerate():
        tid = thread.native_id
        with contextlib.suppress(OSError):
            if tid is not None and os.sched_getaffinity(tid) == {cpu}:
                os.sched_setaffinity(tid, cpus)


async def in_thread(fn: Callable[..., T], *args: Any, cpu: int | None = None) -> T:
    """Run ``fn`` in a daemon thread and await its result.

    Not ``asyncio.to_thread``: the default executor's threads are joined at exit, and a
    SIGTERM during the reload of a large site map must not wait for it to finish. With
    ``cpu``, the thread runs on that core only (a reload's: see ``share_one_core``).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {cpu})
        try:
            value, exc = fn(*args), None
        except BaseException as caught:  # handed to the awaiting task
            value, exc = None, caught
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, value, exc)

    threading.Thread(target=work, name=f"nearestd-{fn.__name__}", daemon=True).start()
    return await done


async def _guarded(coro: Coroutine[Any, Any, None], name: str) -> None:
    """Run a background task; log its failure instead of cancelling its siblings."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        LOG.exception("background task failed", extra={"task": name})


def release(old: list[object]) -> None:
    """Free an old world a piece at a time (worker thread).

    Dropping the last reference to a table of 100,000 devices frees them all in one C
    call that holds the GIL (measured: 50-80 ms, and a 100,000-prefix pytricia tree
    100-190 ms on a busy machine); so the large containers near the top of the old
    world are emptied a slice at a time and the prefix trees a prefix at a time, and
    the event loop gets the GIL back between pieces.
    """
    parts: list[list[Any]] = []
    tries: list[Any] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(o, 0) for o in old]
    old.clear()
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > RELEASE_DEPTH:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            items: list[Any] = [*obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = list(obj)
        elif type(obj).__module__.startswith("nearestd."):
            fields = getattr(obj, "__dict__", None)
            if fields is None:
                slots = getattr(type(obj), "__slots__", ())
                items = [getattr(obj, s, None) for s in slots]
            else:
                items = list(fields.values())
            stack.extend((x, depth + 1) for x in items if _worth_walking(x))
            continue
        elif type(obj).__name__ == "PyTricia":
            tries.append(obj)
            continue
        else:
            continue  # a library's object (a geometry, an array, an rtree): freed whole
        if len(items) >= RELEASE_CHUNK:
            # Kept alive here, so that freeing the container is cheap; freed a slice at
            # a time below. Only large containers among them are looked into.
            parts.append(items)
            stack.extend(
                (x, depth + 1)
                for x in items
                if isinstance(x, (dict, list, set)) and len(x) >= RELEASE_CHUNK
            )
        else:
            stack.extend((x, depth + 1) for x in items if _worth_walking(x))
    while seen:
        seen.pop()
    for tree in tries:
        # Listed a step at a time (``keys()`` is one C call: 0.2 s for 100,000 prefixes),
        # then removed, so that the tree is not iterated while it shrinks.
        prefixes = [prefix for prefix in tree]
        for prefix in prefixes:
            del tree[prefix]
    del tries
    for items in parts:
        while items:
            del items[-RELEASE_CHUNK // 8 :]


def _worth_walking(obj: Any) -> bool:
    """Return whether an object may hold a large part of a world (ours, a container, a trie)."""
    if isinstance(obj, (dict, list, tuple, set, frozenset)):
        return bool(obj)
    kind = type(obj)
    return kind.__module__.startswith("nearestd.") or kind.__name__ == "PyTricia"


async def serve(config_path: str, on_ready: Callable[[Daemon], None] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads. Return the exit status."""
    # Loading creates hundreds of thousands of objects and no garbage cycles worth a
    # pass over them: the collector would only add seconds to a large map's start-up.
    gc.disable()
    try:
        world = load_world(config_path, use_cache=True)
        daemon = Daemon(world, config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            LOG.error(
                "configuration problem", extra={"problem": problem, "_verbatim": ("problem",)}
            )
        return 2
    finally:
        # The site map and device table live until the next reload: keep the cyclic
        # collector from walking them (a full pass over 100,000 devices stalls for ~0.3 s).
        gc.freeze()
        gc.enable()
    daemon.freeze_gc = True
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_in_background)
    try:
        await daemon.start()
    except OSError as exc:
        LOG.error("cannot listen", extra={"error": str(exc)})
        await daemon.stop()
        return 1
    # Written once serving: a cold start answers as soon as the map is valid.
    daemon.save_map_cache(world)
    if on_ready is not None:
        on_ready(daemon)
    await daemon.wait_stopped()
    LOG.info("stopping")
    await daemon.stop()
    LOG.info("stopped")
    return 0
