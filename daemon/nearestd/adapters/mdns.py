"""The mDNS adapter: python-zeroconf's asyncio browser feeding the discovery core.

Browses the base types for data and the ``_universal``/``_print``/``_cups`` subtypes for
flags, resolves each instance (from the cache when the announcement carried everything),
and hands the services to :class:`~nearestd.core.discovery.Merger`, whose device changes
go to the service. A record listener notes every record heard, so a device that keeps
answering stays; a silent one is asked directly once or twice and leaves after
``expire_after``, since python-zeroconf itself would keep its records for over an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ifaddr
from zeroconf import (
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf._dns import DNSQuestion
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_SRV

from nearestd.config import DiscoveryConfig
from nearestd.core.discovery import (
    BASE_TYPES,
    SUBTYPE_FLAGS,
    SUBTYPES,
    Change,
    Merger,
    ServiceRecord,
    base_type,
    clean_text,
    host_of,
    split_txt,
)

if TYPE_CHECKING:
    from nearestd.app import Daemon
    from nearestd.service import Service

LOG = logging.getLogger("nearestd.mdns")
RESOLVE_TIMEOUT_MS = 3000
# A cache-flush announcement leaves the old address valid for one more second (RFC 6762
# section 10.2): resolve again after it, so an address change does not keep both.
RESOLVE_AGAIN_AFTER = 1.2
UPKEEP_SECONDS = 0.25
TOUCH_SECONDS = 2.0
LOGGED_MAX = 20000

InterfaceSpec = str | int | tuple[tuple[str, int, int], int]


class DiscoveryError(Exception):
    """Discovery cannot start as configured."""


def resolve_interfaces(names: list[str], ipv6: bool) -> list[InterfaceSpec]:
    """Turn ``[discovery] interfaces`` (names or addresses) into python-zeroconf's form."""
    adapters = ifaddr.get_adapters()
    out: list[InterfaceSpec] = []
    for entry in names:
        try:
            ip = ipaddress.ip_address(entry.split("%", 1)[0])
        except ValueError:
            ip = None
        if ip is not None:
            if ip.version == 4:
                out.append(str(ip))
                continue
            if not ipv6:
                raise DiscoveryError(
                    f"[discovery] interfaces: {entry!r} is IPv6 but [discovery] ipv6 is false"
                )
            index = next(
                (
                    a.index
                    for a in adapters
                    for i in a.ips
                    if not i.is_IPv4 and isinstance(i.ip, tuple) and i.ip[0] == str(ip)
                ),
                None,
            )
            if index is None:
                raise DiscoveryError(f"[discovery] interfaces: no interface has {entry!r}")
            out.append(int(index))
            continue
        adapter = next((a for a in adapters if a.nice_name == entry or a.name == entry), None)
        if adapter is None:
            raise DiscoveryError(f"[discovery] interfaces: no interface named {entry!r}")
        v4 = [str(i.ip) for i in adapter.ips if i.is_IPv4]
        out.extend(v4)
        if ipv6 and adapter.index is not None:
            out.append(int(adapter.index))
        elif not v4:
            raise DiscoveryError(
                f"[discovery] interfaces: {entry!r} has no IPv4 address (and ipv6 is false)"
            )
    if not out:
        raise DiscoveryError("[discovery] interfaces: empty; there is no default interface")
    return out


class _Heard(RecordUpdateListener):
    """Notes every record heard, so that answering devices stay."""

    def __init__(self, on_heard: Callable[[str], None]) -> None:
        self._on_heard = on_heard

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            rec = update.new
            alias = getattr(rec, "alias", None)
            self._on_heard(alias if isinstance(alias, str) else rec.name)

    def async_update_records_complete(self) -> None:
        return None


class MdnsDiscovery:
    """Browses mDNS on the configured interfaces and keeps the service's devices current."""

    def __init__(
        self,
        service: Service,
        cfg: DiscoveryConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.cfg = cfg
        self.clock = clock
        self.merger = Merger(max_devices=cfg.max_devices)
        self.events: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()
        self.error: str | None = None
        self._logged: set[tuple[str, str]] = set()
        self._epoch: dict[tuple[str, str], int] = {}
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._again: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._aiozc: AsyncZeroconf | None = None
        self._browsers: list[AsyncServiceBrowser] = []
        self._listener = _Heard(self._on_heard)
        self._upkeep_task: asyncio.Task[None] | None = None
        self._overflow_logged = False
        self._touched = 0.0

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Open the mDNS sockets and start browsing; log and stay off on a bad config."""
        loop = asyncio.get_running_loop()
        try:
            interfaces = await loop.run_in_executor(
                None, resolve_interfaces, list(self.cfg.interfaces), self.cfg.ipv6
            )
            self._aiozc = AsyncZeroconf(
                interfaces=interfaces,
                ip_version=IPVersion.All if self.cfg.ipv6 else IPVersion.V4Only,
            )
        except (DiscoveryError, OSError, ValueError) as exc:
            self.error = str(exc)
            LOG.error("discovery not started", extra={"error": self.error})
            return
        zc = self._aiozc.zeroconf
        zc.async_add_listener(self._listener, None)
        self._browsers = [
            AsyncServiceBrowser(zc, list(BASE_TYPES), handlers=[self._on_service]),
            AsyncServiceBrowser(zc, list(SUBTYPES), handlers=[self._on_subtype]),
        ]
        self._upkeep_task = asyncio.create_task(self._upkeep(), name="mdns-upkeep")
        LOG.info(
            "discovery started",
            extra={"interfaces": ",".join(map(str, interfaces)), "types": len(BASE_TYPES)},
        )

    async def stop(self) -> None:
        """Stop browsing and close the sockets; the devices stay until the daemon exits."""
        if self._upkeep_task is not None:
            self._upkeep_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep_task
        for task in list(self._tasks):
            task.cancel()
        for browser in self._browsers:
            with contextlib.suppress(Exception):
                await browser.async_cancel()
        self._browsers = []
        if self._aiozc is not None:
            self._aiozc.zeroconf.async_remove_listener(self._listener)
            await self._aiozc.async_close()
            self._aiozc = None

    def stats(self) -> dict[str, Any]:
        """Return counters for ``stats`` and the metrics adapter."""
        return {
            "running": self._aiozc is not None,
            "error": self.error,
            "services": len(self.merger.services),
            "devices": len(self.merger),
            "events": dict(self.events),
            "txt_problems": dict(self.problems),
            "refused_over_max_devices": self.merger.refused,
        }

    # ---- browser events --------------------------------------------------------------------
    def _on_service(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        key = (base_type(service_type), name.lower())
        if state_change is ServiceStateChange.Removed:
            self._epoch[key] = self._epoch.get(key, 0) + 1
            pending = self._pending.pop(key, None)
            if pending is not None:
                pending.cancel()
            self.events["goodbye"] += 1
            self._apply(self.merger.remove(service_type, name), "removed")
            return
        self._schedule(service_type, name)
        if state_change is ServiceStateChange.Updated:
            self._spawn(self._resolve_later(service_type, name, key, self._epoch.get(key, 0)))

    def _on_subtype(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        flag = SUBTYPE_FLAGS.get(service_type.lower())
        if flag is None:
            return
        present = state_change is not ServiceStateChange.Removed
        self._apply(self.merger.set_flag(name, flag, present), "updated")

    def _on_heard(self, name: str) -> None:
        self.merger.hear(name, self.clock())

    # ---- resolving -------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule(self, type_: str, name: str) -> None:
        key = (base_type(type_), name.lower())
        if key in self._pending:
            self._again.add(key)
            return
        self._pending[key] = self._spawn(self._resolve(type_, name, key))

    async def _resolve_later(self, type_: str, name: str, key: tuple[str, str], epoch: int) -> None:
        await asyncio.sleep(RESOLVE_AGAIN_AFTER)
        if self._epoch.get(key, 0) == epoch and key in self.merger.services:
            self._schedule(type_, name)

    async def _resolve(self, type_: str, name: str, key: tuple[str, str]) -> None:
        try:
            while True:
                epoch = self._epoch.get(key, 0)
                await self._resolve_once(type_, name, key, epoch)
                if key not in self._again:
                    return
                self._again.discard(key)
        except Exception:
            LOG.exception("resolve failed", extra={"service": clean_text(name, 80)})
        finally:
            if self._pending.get(key) is asyncio.current_task():
                del self._pending[key]

    async def _resolve_once(self, type_: str, name: str, key: tuple[str, str], epoch: int) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        info = AsyncServiceInfo(type_, name)
        ok = await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS)
        if self._epoch.get(key, 0) != epoch:
            return  # a goodbye arrived while resolving (python-zeroconf #1048)
        if not ok:
            self.events["resolve_timeout"] += 1
            return
        strings, wire_problems = split_txt(info.text or b"")
        record = ServiceRecord(
            type=type_,
            name=name,
            host=host_of(info.server),
            port=int(info.port or 0),
            addresses=tuple(info.parsed_scoped_addresses()),
            txt=tuple(strings),
            txt_problems=tuple(wire_problems),
            priority=int(info.priority or 0),
        )
        changes, parsed = self.merger.upsert(record, self.clock())
        if parsed is None:
            if self.merger.refused and not self._overflow_logged:
                self._overflow_logged = True
                LOG.warning(
                    "discovered devices at [discovery] max_devices; new ones are ignored",
                    extra={"max_devices": self.merger.max_devices},
                )
            return
        for kind, detail in parsed.problems:
            self._problem(key, kind, detail)
        self._apply(changes, "updated")

    def _problem(self, key: tuple[str, str], kind: str, detail: str) -> None:
        if (key[1], kind) in self._logged:
            return
        if len(self._logged) >= LOGGED_MAX:
            self._logged.clear()
        self._logged.add((key[1], kind))
        self.problems[kind] += 1
        LOG.warning(
            "broken TXT record; keeping what parsed",
            extra={"service": clean_text(key[1], 120), "problem": kind, "detail": detail},
        )

    def _apply(self, changes: list[Change], why: str) -> None:
        now = self.clock()
        for change in changes:
            if change.device is None:
                if self.service.remove_device(change.device_id):
                    self.events[why] += 1
                    LOG.info("device gone", extra={"device": change.device_id, "why": why})
                continue
            result = self.service.upsert_device(change.device, now)
            if result != "unchanged":
                self.events[result] += 1
                LOG.info(
                    f"device {result}",
                    extra={"device": change.device_id, "uri": change.device.uri},
                )

    # ---- upkeep ----------------------------------------------------------------------------
    async def _upkeep(self) -> None:
        while True:
            await asyncio.sleep(UPKEEP_SECONDS)
            try:
                self.tick(self.clock())
            except Exception:
                LOG.exception("discovery upkeep failed")

    def tick(self, now: float) -> None:
        """Expire silent services and ask the quiet ones whether they are still there."""
        expire_after = float(self.cfg.expire_after)
        self._apply(self.merger.expire(now, expire_after), "expired")
        probes = self.merger.due_probes(now, max(expire_after / 3.0, 0.5))
        aiozc = self._aiozc
        if probes and aiozc is not None:
            out = DNSOutgoing(_FLAGS_QR_QUERY)
            for _type, name in probes:
                out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
            aiozc.zeroconf.async_send(out)
            self.events["probes"] += len(probes)
        if now - self._touched >= TOUCH_SECONDS:
            self._touched = now
            for device_id, heard in self.merger.device_heard().items():
                self.service.table.touch(device_id, heard)

    def reconfigure(self, cfg: DiscoveryConfig) -> bool:
        """Take new limits; return whether the interfaces changed (a restart is needed)."""
        restart = cfg.interfaces != self.cfg.interfaces or cfg.ipv6 != self.cfg.ipv6
        self.cfg = cfg
        self.merger.max_devices = cfg.max_devices
        return restart


def attach_mdns(daemon: Daemon) -> MdnsDiscovery:
    """Register discovery's start, stop and reload hooks with the daemon."""
    discovery = MdnsDiscovery(daemon.service, daemon.service.cfg.discovery)
    daemon.service.extra_stats["discovery"] = discovery.stats

    async def start(_: Daemon) -> None:
        await discovery.start()

    async def stop(_: Daemon) -> None:
        await discovery.stop()

    def reload(d: Daemon) -> None:
        cfg = d.service.cfg.discovery
        if discovery.reconfigure(cfg):

            async def restart() -> None:
                await discovery.stop()
                if cfg.enabled:
                    await discovery.start()

            discovery._spawn(restart())

    daemon.starters.append(start)
    daemon.stoppers.append(stop)
    daemon.reload_hooks.append(reload)
    return discovery
