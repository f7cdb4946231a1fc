"""Wires the service and its adapters together on one event loop; signals; readiness."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nearestd.adapters.component import Component
from nearestd.adapters.metrics import MetricsExporter, read_sections
from nearestd.adapters.snapshot import InventorySnapshots
from nearestd.adapters.socket_server import Limits, SocketServers
from nearestd.adapters.systemd import Notifier, status_line
from nearestd.config import Config, ConfigError
from nearestd.loader import World, load_world
from nearestd.service import Service

LOG = logging.getLogger("nearestd")
TICK_SECONDS = 0.5
SHUTDOWN_GRACE = 3.0
# SIGTERM to exit stays under 5 s even when an adapter hangs in its stop hook.
STOP_BUDGET = 3.5


def new_key() -> bytes:
    """Return a fresh random 256-bit pseudonym key."""
    return secrets.token_bytes(32)


class Daemon:
    """The running daemon: the service, its sockets and its background tasks."""

    def __init__(self, world: World, config_path: str) -> None:
        self.config_path = config_path
        self.world = world
        self.service = Service(world.config, world.sitemap, time.time(), new_key)
        self.service.reloader = self.reload
        d = world.config.daemon
        self.sockets = SocketServers(
            self.service,
            Limits(
                d.max_connections,
                d.max_frame,
                d.idle_timeout,
                d.frame_timeout,
                d.max_in_flight,
                max_per_source=d.max_connections_per_source,
                reserved=d.reserved_connections,
            ),
            time.monotonic,
        )
        self.addresses: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload = 0.0
        # Adapters register start and stop hooks here (discovery, MQTT, metrics, ...).
        self.starters: list[Callable[[Daemon], Awaitable[None]]] = []
        self.stoppers: list[Callable[[Daemon], Awaitable[None]]] = []
        self.reload_hooks: list[Callable[[Daemon], None]] = []
        # Edges built as components (adapters/component.py): started in order, stopped in reverse.
        self.components: list[Component] = []
        self.last_reload_ok = True
        self._reloading: asyncio.Future[None] | None = None
        self._reload_again = False
        self.notifier = Notifier.from_environment()
        self.snapshots = InventorySnapshots(self.service)
        self.metrics = MetricsExporter(self.service, self.stats_sections)
        self.service.extra_stats["operations"] = self.operations_stats
        self.components.append(self.metrics)
        if world.config.discovery.enabled:
            from nearestd.adapters.mdns import attach_mdns

            attach_mdns(self)
        from nearestd.adapters.poller import attach_poller

        self.poller = attach_poller(self)
        if world.config.mqtt is not None:
            from nearestd.adapters.mqtt import attach_mqtt

            attach_mqtt(self)
        if world.config.dnssd is not None:
            from nearestd.adapters.dnssd import DnssdServer

            self.components.append(DnssdServer(self.service, world.config.dnssd))
        if world.config.web is not None:
            from nearestd.adapters.web import WebView

            self.components.append(WebView(self.service, world.config))

    def stats_sections(self) -> dict[str, Any]:
        """Return every stats section (the service's and each component's) for the metrics."""
        return read_sections(self.service.extra_stats)

    def operations_stats(self) -> dict[str, Any]:
        """Return reload, snapshot and supervision figures for ``nearestctl stats``."""
        snaps = self.snapshots
        return {
            "reloads_ok": self.reloads_ok,
            "reloads_failed": self.reloads_failed,
            "last_reload_ok": self.last_reload_ok,
            "last_reload": self.last_reload or self.service.stats.started,
            "inventory_file": str(snaps.path),
            "inventory_restored": snaps.restored,
            "inventory_writes_ok": snaps.writes_ok,
            "inventory_writes_failed": snaps.writes_failed,
            "inventory_last_write": snaps.last_write,
            "stale_expired": snaps.expired,
            "systemd_notify": self.notifier.enabled,
            "metrics": f"http://{self.metrics.address}/metrics" if self.metrics.address else "",
        }

    @property
    def config(self) -> Config:
        """Return the current config."""
        return self.service.cfg

    async def start(self) -> None:
        """Open the sockets and start the background tasks."""
        cfg = self.world.config
        self.snapshots.restore(time.time())
        for url in cfg.daemon.listen:
            if url.startswith("unix://"):
                url = f"unix://{cfg.resolve(url[7:])}"
            self.addresses.append(await self.sockets.listen(url))
        if cfg.daemon.admin_socket:
            self.addresses.append(
                await self.sockets.listen_admin(
                    cfg.resolve(cfg.daemon.admin_socket),
                    int(cfg.daemon.admin_mode, 8),
                    cfg.daemon.admin_group,
                )
            )
        self._spawn(self._ticker(), "ticker")
        self._spawn(self.snapshots.run(), "snapshots")
        for starter in self.starters:
            await starter(self)
        for component in self.components:
            await component.start()
            self.service.extra_stats[component.name] = component.stats
        LOG.info(
            "serving",
            extra={
                "listen": ",".join(self.addresses),
                "zones": len(self.service.sitemap.zones),
                "devices": len(self.service.table),
            },
        )
        if self.notifier.enabled:
            self._spawn(
                self.notifier.keepalive(lambda: status_line(self.service, time.time())), "watchdog"
            )
            self.notifier.ready(status_line(self.service, time.time()))

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        self._tasks.append(asyncio.ensure_future(coro))
        self._tasks[-1].set_name(name)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.service.tick(time.time())
                self.sockets.conns.sweep()
            except Exception:
                LOG.exception("tick failed")

    def reload(self) -> list[str]:
        """Load the config and site maps again; switch only if all of it is valid."""
        try:
            world = load_world(self.config_path, use_cache=True)
        except ConfigError as exc:
            return self._refuse(exc.problems)
        self.save_map_cache(world)
        return self._switch(world)

    def save_map_cache(self, world: World) -> None:
        """Write the compiled site map in a worker thread, if the world was not read from it."""
        save = world.save_cache
        if save is None:
            return

        async def run() -> None:
            try:
                await asyncio.to_thread(save)
            except Exception:
                LOG.exception("site map cache not written")

        with contextlib.suppress(RuntimeError):  # no running loop: nothing to write it on
            asyncio.get_running_loop()
            self._spawn(run(), "map-cache")

    def reload_in_background(self) -> None:
        """Reload for SIGHUP: parse in a worker thread so that queries go on, switch on the loop."""
        self._reload_again = True
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.ensure_future(self._reload_off_loop())
            self._tasks.append(self._reloading)

    async def _reload_off_loop(self) -> None:
        while self._reload_again:
            self._reload_again = False
            seen = self.reloads_ok + self.reloads_failed
            try:
                world = await asyncio.to_thread(load_world, self.config_path, True)
            except ConfigError as exc:
                self._refuse(exc.problems)
                continue
            except Exception:
                LOG.exception("reload failed")
                continue
            if self.reloads_ok + self.reloads_failed != seen:
                # Another reload finished while this one parsed: read the files again.
                self._reload_again = True
                continue
            self.save_map_cache(world)
            self._switch(world)

    def _refuse(self, problems: list[str]) -> list[str]:
        self.reloads_failed += 1
        self.last_reload_ok = False
        for problem in problems:
            LOG.error("reload refused", extra={"problem": problem})
        return problems

    def _switch(self, world: World) -> list[str]:
        self.world = world
        self.service.apply(world.config, world.sitemap)
        self.sockets.set_policy(world.config.daemon.allow, world.config.daemon.trusted_peers)
        for component in self.components:
            try:
                component.reconfigure(world.config)
            except Exception:
                LOG.exception("component reconfigure failed", extra={"component": component.name})
        for hook in self.reload_hooks:
            try:
                hook(self)
            except Exception:
                # The new configuration is in force; one adapter failing to follow must
                # not leave the others (or the counters) behind.
                LOG.exception("reload hook failed")
        self.reloads_ok += 1
        self.last_reload_ok = True
        self.last_reload = time.time()
        self.notifier.status(status_line(self.service, time.time()))
        LOG.info(
            "reloaded",
            extra={"zones": len(world.sitemap.zones), "devices": len(self.service.table)},
        )
        return []

    def request_stop(self) -> None:
        """Ask the daemon to shut down."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Wait until a stop is requested."""
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop accepting, finish what is in flight, stop the adapters."""
        self.notifier.stopping()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_BUDGET
        await self.sockets.stop_accepting()
        try:
            await asyncio.wait_for(self.snapshots.flush(), 1.0)
        except Exception:
            LOG.exception("inventory snapshot not written at shutdown")
        for component in reversed(self.components):
            try:
                grace = min(SHUTDOWN_GRACE, deadline - loop.time())
                await asyncio.wait_for(component.stop(), max(0.1, grace))
            except Exception:
                LOG.exception("component stop failed", extra={"component": component.name})
        for stopper in reversed(self.stoppers):
            try:
                grace = min(SHUTDOWN_GRACE, deadline - loop.time())
                await asyncio.wait_for(stopper(self), max(0.1, grace))
            except Exception:
                LOG.exception("adapter stop failed")
        await self.sockets.drain(max(0.1, min(1.0, deadline - loop.time())))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


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
            LOG.error("configuration problem", extra={"problem": problem})
        return 2
    finally:
        # The site map and device table live until the next reload: keep the cyclic
        # collector from walking them (a full pass over 100,000 devices stalls for ~0.3 s).
        gc.freeze()
        gc.enable()
    daemon.reload_hooks.append(_refreeze)
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


def _refreeze(daemon: Daemon) -> None:
    """After a reload: collect the old world's cycles, then freeze the new one."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
