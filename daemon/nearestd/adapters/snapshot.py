"""Warm restart: the discovered-device inventory, saved in ``state_dir`` and read at start.

The file is replaced atomically (temporary file, fsync, rename, fsync of the
directory), at most once per debounce period after a change, and once more at
shutdown. Restored devices are marked stale: they are answered at once, and lose
the mark when discovery hears of them again; those it does not hear of within
``[discovery] expire_after`` are dropped here. This module is the only writer under
``state_dir`` besides the compiled site map (nearestd.mapcache); nothing about clients is ever written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from nearestd.adapters.component import Spawn, spawn_task
from nearestd.config import Config
from nearestd.core.inventory import (
    MAX_BYTES,
    InventoryError,
    Saved,
    decode_inventory,
    encode_inventory,
)
from nearestd.core.model import Device, DeviceState
from nearestd.service import Service

LOG = logging.getLogger("nearestd.snapshot")
FILE_NAME = "inventory.json"
DEBOUNCE = 2.0
# Federated devices come back from the broker's retained records at a restart; the snapshot
# only bridges a broker that is down then. Their changes are written less often, so a burst
# of foreign records is not encoded again every two seconds.
FOREIGN_DEBOUNCE = 15.0
REFRESH = 60.0
CHECK_EVERY = 0.5
FLUSH_SECONDS = 1.0
# Restored devices keep a state only when it makes them unavailable: a printer last
# seen stopped must not be answered as nearest before it says otherwise.
_KEPT_STATES = (DeviceState.STOPPED, DeviceState.UNREACHABLE)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file whole."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def restored(device: Device) -> Device:
    """Return a device as it is served after a restart: stale, state unknown unless unavailable."""
    state = device.state if device.state in _KEPT_STATES else DeviceState.UNKNOWN
    return replace(device, stale=True, state=state)


class InventorySnapshots:
    """Saves and restores the non-static devices of a service's table."""

    name = "inventory"

    def __init__(
        self,
        service: Service,
        clock: Callable[[], float] = time.time,
        debounce: float = DEBOUNCE,
        refresh: float = REFRESH,
        spawn: Spawn = spawn_task,
    ) -> None:
        self.service = service
        self._spawn = spawn
        self.clock = clock
        self.debounce = debounce
        self.refresh = refresh
        self.restored = 0
        self.expired = 0
        self.writes_ok = 0
        self.writes_failed = 0
        self.last_write = 0.0
        self._saved_generation: int | None = None
        self._saved_local: int | None = None
        self._saved_newest = 0.0
        self._changed_at: float | None = None
        self._last_error = ""
        self._ready = False
        # The upkeep task and the shutdown flush must not write the same temp file at once.
        self._writing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # ---- component -----------------------------------------------------------------------
    async def start(self) -> None:
        """Restore the saved devices (stale), then keep the file current in the background."""
        self.restore(self.clock())
        self._task = self._spawn(self.run(), "snapshots")

    async def stop(self) -> None:
        """Stop the upkeep and write what changed since the last write (bounded in time)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await asyncio.wait_for(self.flush(), FLUSH_SECONDS)
        except Exception:
            LOG.exception("inventory snapshot not written at shutdown")

    def reconfigure(self, cfg: Config) -> None:
        """Nothing to follow: the path and ``expire_after`` are read from the service's config."""

    def stats(self) -> dict[str, Any]:
        """Return the snapshot file and its restore, write and expiry figures."""
        return {
            "file": str(self.path),
            "restored": self.restored,
            "writes_ok": self.writes_ok,
            "writes_failed": self.writes_failed,
            "last_write": self.last_write,
            "stale_expired": self.expired,
        }

    @property
    def path(self) -> Path:
        """Return the snapshot file of the current config."""
        cfg = self.service.cfg
        return cfg.resolve(cfg.daemon.state_dir) / FILE_NAME

    # ---- start -------------------------------------------------------------------------
    def restore(self, now: float) -> int:
        """Read the snapshot and add its devices as stale; return how many. Never raises."""
        path = self.path
        try:
            with path.open("rb") as f:
                data = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            LOG.info("no inventory snapshot", extra={"path": str(path)})
            self._ready = True
            return 0
        except OSError as exc:
            LOG.warning(
                "inventory snapshot unreadable; starting empty",
                extra={"path": str(path), "error": exc.strerror or str(exc)},
            )
            self._ready = True
            return 0
        try:
            saved = decode_inventory(data)
        except InventoryError as exc:
            LOG.warning(
                "inventory snapshot ignored", extra={"path": str(path), "problem": str(exc)}
            )
            self._ready = True
            return 0
        table = self.service.table
        n = 0
        for item in saved:
            existing = table.get(item.device.id)
            if item.device.source == "static" or existing is not None:
                continue
            try:
                self.service.upsert_device(restored(item.device), min(item.last_seen, now))
            except Exception:
                LOG.exception("restored device refused", extra={"device": item.device.id})
                continue
            n += 1
        self.restored = n
        self._ready = True
        LOG.info("inventory restored", extra={"path": str(path), "devices": n, "stale": n})
        return n

    # ---- saving ------------------------------------------------------------------------
    def collect(self) -> list[Saved]:
        """Return the devices worth saving: every one not declared by a site map."""
        return [Saved(r.device, r.last_seen) for r in self.service.table.dynamic_records()]

    def _newest(self) -> float:
        return max((r.last_seen for r in self.service.table.dynamic_records()), default=0.0)

    def due(self, now: float) -> bool:
        """Return whether a write is due: a change a debounce period old, or old last-seen times."""
        if not self._ready:
            return False
        table = self.service.table
        if table.generation != self._saved_generation:
            if self._changed_at is None:
                self._changed_at = now
            own = table.local_generation != self._saved_local
            return now - self._changed_at >= (self.debounce if own else FOREIGN_DEBOUNCE)
        return self._newest() - self._saved_newest >= self.refresh

    async def write(self) -> bool:
        """Save the inventory now (file I/O off the event loop); return whether it worked."""
        async with self._writing:
            return await self._write()

    async def _write(self) -> bool:
        generation = self.service.table.generation
        local = self.service.table.local_generation
        saved = self.collect()
        newest = max((s.last_seen for s in saved), default=0.0)
        now = self.clock()
        path = self.path
        try:
            await asyncio.to_thread(_encode_and_write, path, saved, now)
        except OSError as exc:
            self.writes_failed += 1
            error = exc.strerror or str(exc)
            if error != self._last_error:
                LOG.error(
                    "cannot write inventory snapshot", extra={"path": str(path), "error": error}
                )
            self._last_error = error
            self._changed_at = now
            return False
        if self._last_error:
            LOG.info("inventory snapshot written again", extra={"path": str(path)})
        self._last_error = ""
        self.writes_ok += 1
        self.last_write = now
        self._saved_generation = generation
        self._saved_local = local
        self._saved_newest = newest
        self._changed_at = None
        LOG.debug("inventory snapshot written", extra={"devices": len(saved)})
        return True

    def expire_stale(self, now: float) -> list[str]:
        """Drop restored devices that discovery has not confirmed within ``expire_after``."""
        expire_after = float(self.service.cfg.discovery.expire_after)
        gone = [
            r.device.id
            for r in self.service.table.dynamic_records()
            if r.device.stale and now - r.last_seen >= expire_after
        ]
        for device_id in gone:
            self.service.remove_device(device_id)
        if gone:
            self.expired += len(gone)
            LOG.info("stale devices expired", extra={"devices": len(gone)})
        return gone

    async def run(self) -> None:
        """Write after changes, debounced; expire unconfirmed stale devices. Runs until cancelled."""
        while True:
            await asyncio.sleep(CHECK_EVERY)
            now = self.clock()
            try:
                self.expire_stale(now)
                if self.due(now):
                    await self.write()
            except Exception:
                LOG.exception("inventory snapshot upkeep failed")

    async def flush(self) -> None:
        """Write now if anything changed since the last write (at shutdown)."""
        if self._ready and (
            self.service.table.generation != self._saved_generation
            or self._newest() > self._saved_newest
        ):
            await self.write()


def _encode_and_write(path: Path, saved: list[Saved], now: float) -> None:
    write_atomically(path, encode_inventory(saved, now))
