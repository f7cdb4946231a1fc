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
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ifaddr
from zeroconf import (
    BadTypeInNameException,
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

from nearestd.adapters.component import Spawn, spawn_task
from nearestd.config import Config, DiscoveryConfig
from nearestd.core.discovery import (
    BASE_TYPES,
    SUBTYPE_FLAGS,
    SUBTYPES,
    AddressPolicy,
    Change,
    Merger,
    Parsed,
    ServiceKey,
    ServiceRecord,
    base_type,
    clean_text,
    host_of,
    split_txt,
)
from nearestd.core.quarantine import service_is_pinned, service_is_suspect

if TYPE_CHECKING:
    from nearestd.service import Service

LOG = logging.getLogger("nearestd.mdns")
RESOLVE_TIMEOUT_MS = 3000
# A cache-flush announcement leaves the old address valid for one more second (RFC 6762
# section 10.2): resolve again after it, so an address change does not keep both.
RESOLVE_AGAIN_AFTER = 1.2
UPKEEP_SECONDS = 0.25
TOUCH_SECONDS = 2.0
LOGGED_MAX = 20000
MAX_PENDING = 512
MAX_DEFERRED = 20000

IP_MULTICAST_ALL = 49  # Linux <linux/in.h>
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux <asm-generic/socket.h>
RECEIVE_BUFFER = 4 * 1024 * 1024
IPV6_MULTICAST_ALL = 29  # Linux <linux/in6.h>
InterfaceSpec = str | int | tuple[tuple[str, int, int], int]


class DiscoveryError(Exception):
    """Discovery cannot start as configured."""


@dataclass(frozen=True, slots=True)
class Link:
    """One configured entry of ``[discovery] interfaces``: its device and addresses."""

    label: str
    device: str | None
    specs: tuple[InterfaceSpec, ...]


def host_address_policy(links: list[Link] | None = None) -> AddressPolicy:
    """Return which device addresses to refuse, from this host's interfaces.

    Its own addresses; link-local ones unless the host has no routable address; loopback
    unless every browsed link is loopback.
    """
    own: set[str] = set()
    routable = False
    devices: dict[str, bool] = {}
    for adapter in ifaddr.get_adapters():
        loop = True
        for entry in adapter.ips:
            text = entry.ip if entry.is_IPv4 else entry.ip[0]
            try:
                addr = ipaddress.ip_address(str(text).split("%", 1)[0])
            except ValueError:
                continue
            own.add(str(addr))
            loop = loop and addr.is_loopback
            if not (addr.is_loopback or addr.is_link_local):
                routable = True
        devices[str(adapter.name)] = loop
    loopback_ok = bool(links) and all(
        link.device is not None and devices.get(link.device, False) for link in links or ()
    )
    return AddressPolicy(frozenset(own), link_local_ok=not routable, loopback_ok=loopback_ok)


def resolve_interfaces(names: list[str], ipv6: bool) -> list[Link]:
    """Turn ``[discovery] interfaces`` (names or addresses) into links to open."""
    adapters = ifaddr.get_adapters()
    links: list[Link] = []
    for entry in dict.fromkeys(names):
        try:
            ip = ipaddress.ip_address(entry.split("%", 1)[0])
        except ValueError:
            ip = None
        if ip is not None:
            owner = next(
                (a for a in adapters for i in a.ips if (i.ip if i.is_IPv4 else i.ip[0]) == str(ip)),
                None,
            )
            if owner is None:
                raise DiscoveryError(f"[discovery] interfaces: no interface has {entry!r}")
            if ip.version == 6 and not ipv6:
                raise DiscoveryError(
                    f"[discovery] interfaces: {entry!r} is IPv6 but [discovery] ipv6 is false"
                )
            spec: InterfaceSpec = str(ip) if ip.version == 4 else int(owner.index or 0)
            links.append(Link(entry, str(owner.name), (spec,)))
            continue
        adapter = next((a for a in adapters if a.nice_name == entry or a.name == entry), None)
        if adapter is None:
            raise DiscoveryError(f"[discovery] interfaces: no interface named {entry!r}")
        specs: list[InterfaceSpec] = [str(i.ip) for i in adapter.ips if i.is_IPv4]
        if ipv6 and adapter.index is not None:
            specs.append(int(adapter.index))
        if not specs:
            raise DiscoveryError(
                f"[discovery] interfaces: {entry!r} has no IPv4 address (and ipv6 is false)"
            )
        links.append(Link(entry, str(adapter.name), tuple(specs)))
    if not links:
        raise DiscoveryError("[discovery] interfaces: empty; there is no default interface")
    return links


class _Heard(RecordUpdateListener):
    """Notes every record heard on one link, so that answering devices stay."""

    def __init__(self, link: str, on_heard: Callable[[str, str], None]) -> None:
        self._link = link
        self._on_heard = on_heard

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            rec = update.new
            if rec.ttl == 0:
                continue  # a goodbye: the browser reports it
            alias = getattr(rec, "alias", None)
            try:
                self._on_heard(self._link, alias if isinstance(alias, str) else rec.name)
            except Exception:  # never let a peer's record reach python-zeroconf's dispatch
                LOG.exception("noting a heard record failed", extra={"record": escaped(rec.name)})

    def async_update_records_complete(self) -> None:
        return None


def escaped(text: str, limit: int = 200) -> str:
    """Return a peer's text for a log line: every control and non-ASCII character escaped."""
    return ascii(text[:limit])[1:-1]


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Make room for a burst of announcements (500 devices at once overflowed the default)."""
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):  # FORCE passes rmem_max, as root only
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
            return
        except OSError:
            continue


def open_link(link: Link, ipv6: bool) -> AsyncZeroconf:
    """Open python-zeroconf on one link's addresses, deaf to every other link."""
    aiozc = AsyncZeroconf(
        interfaces=list(link.specs),
        ip_version=IPVersion.All if ipv6 else IPVersion.V4Only,
    )
    # python-zeroconf receives multicast on one wildcard socket per instance. Measured on
    # the test LAN with one instance per link: by default each socket also got the other
    # link's datagrams (Linux IP_MULTICAST_ALL), and with IP_MULTICAST_ALL=0 alone both
    # links' datagrams went to one of the two sockets. Binding each to its device works.
    engine = aiozc.zeroconf.engine
    for sock in [getattr(engine, "_listen_socket", None), *getattr(engine, "_respond_sockets", [])]:
        if isinstance(sock, socket.socket):
            _grow_receive_buffer(sock)
    listen = getattr(engine, "_listen_socket", None)
    if not isinstance(listen, socket.socket):
        LOG.warning(
            "cannot reach python-zeroconf's multicast socket to bind it to its interface; "
            "with several links, one link's services may be seen on another",
            extra={"interface": link.label},
        )
    else:
        v4 = listen.family == socket.AF_INET
        with contextlib.suppress(OSError):
            if v4:
                listen.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            else:
                listen.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        if link.device:
            try:
                listen.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.device.encode())
            except OSError as exc:
                LOG.warning(
                    "cannot bind the mDNS socket to its interface; with several links, "
                    "one link's services may be seen on another",
                    extra={"interface": link.label, "error": str(exc)},
                )
    return aiozc


class MdnsDiscovery:
    """Browses mDNS on the configured interfaces and keeps the service's devices current."""

    name = "discovery"

    def __init__(
        self,
        service: Service,
        cfg: DiscoveryConfig,
        clock: Callable[[], float] = time.time,
        spawn: Spawn = spawn_task,
    ) -> None:
        self.service = service
        self._spawn_long = spawn
        self.cfg = cfg
        self.clock = clock
        self.merger = Merger(
            max_devices=cfg.max_devices,
            max_per_source=cfg.max_devices_per_source,
            suspect=self._suspect,
            pinned=self._pinned,
        )
        self.events: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()
        self.error: str | None = None
        self._logged: set[tuple[ServiceKey, str]] = set()
        # Services refused for what a peer sent (a name python-zeroconf rejects, ...), by
        # reason; each one counted and logged once.
        self.refused: Counter[str] = Counter()
        self._refused_seen: set[tuple[str, str, str]] = set()
        self._pending: dict[ServiceKey, asyncio.Task[None]] = {}
        self._again: set[ServiceKey] = set()
        self._later: set[ServiceKey] = set()
        self._deferred: dict[ServiceKey, tuple[str, str, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: dict[str, AsyncZeroconf] = {}
        self._listeners: dict[str, _Heard] = {}
        self._browsers: list[AsyncServiceBrowser] = []
        self._upkeep_task: asyncio.Task[None] | None = None
        self._overflow_logged = False
        self._touched = 0.0
        self._restart_lock = asyncio.Lock()
        # Restarts after a reload: not among the tasks _close() cancels.
        self._restarts: set[asyncio.Task[None]] = set()

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Open mDNS sockets on each configured link and browse; log and stay off on error."""
        loop = asyncio.get_running_loop()
        self.error = None
        try:
            links = await loop.run_in_executor(
                None, resolve_interfaces, list(self.cfg.interfaces), self.cfg.ipv6
            )
            self.merger.policy = await loop.run_in_executor(None, host_address_policy, links)
            for link in links:
                self._links[link.label] = open_link(link, self.cfg.ipv6)
        except (DiscoveryError, OSError, ValueError) as exc:
            self.error = str(exc)
            LOG.error("discovery not started", extra={"error": self.error})
            await self._close()
            return
        # One python-zeroconf per link: instance names are unique only per link, and one
        # shared cache would let a cache flush on one link erase a record from another.
        for label, aiozc in self._links.items():
            zc = aiozc.zeroconf
            self._listeners[label] = _Heard(label, self._on_heard)
            zc.async_add_listener(self._listeners[label], None)
            self._browsers += [
                AsyncServiceBrowser(zc, list(BASE_TYPES), handlers=[self._handler(label)]),
                AsyncServiceBrowser(zc, list(SUBTYPES), handlers=[self._flag_handler(label)]),
            ]
        self._upkeep_task = self._spawn_long(self._upkeep(), "mdns-upkeep")
        LOG.info(
            "discovery started",
            extra={"interfaces": ",".join(self._links), "types": len(BASE_TYPES)},
        )

    async def stop(self) -> None:
        """Stop browsing and close the sockets; the devices stay until the daemon exits."""
        for task in list(self._restarts):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close()

    async def _close(self) -> None:
        if self._upkeep_task is not None:
            self._upkeep_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep_task
            self._upkeep_task = None
        for task in list(self._tasks):
            task.cancel()
        for browser in self._browsers:
            with contextlib.suppress(Exception):
                await browser.async_cancel()
        self._browsers = []
        for link, aiozc in self._links.items():
            listener = self._listeners.pop(link, None)
            if listener is not None:
                aiozc.zeroconf.async_remove_listener(listener)
            await aiozc.async_close()
        self._links = {}
        self._pending.clear()
        self._again.clear()
        self._later.clear()
        self._deferred.clear()

    def _suspect(self, parsed: Parsed) -> bool:
        """Return whether a service claims a pinned identity from outside the pin's networks."""
        return service_is_suspect(parsed, self.service.sitemap)

    def _pinned(self, parsed: Parsed) -> bool:
        """Return whether a service matches a site-map pin (admitted even when full)."""
        return service_is_pinned(parsed, self.service.sitemap)

    def stats(self) -> dict[str, Any]:
        """Return counters for ``stats`` and the metrics adapter."""
        return {
            "running": bool(self._links),
            "interfaces": list(self._links),
            "error": self.error,
            "services": len(self.merger.services),
            "devices": len(self.merger),
            "events": dict(self.events),
            "txt_problems": dict(self.problems),
            "refused_over_max_devices": self.merger.refused,
            "services_refused": dict(self.refused + self.merger.refused_by),
            "resolves_deferred": len(self._deferred),
        }

    # ---- browser events --------------------------------------------------------------------
    def _handler(self, link: str) -> Callable[..., None]:
        def on_service(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            # An exception here would stop python-zeroconf's browser for good: the event
            # stays pending and fails again on every later packet.
            try:
                self._on_service(link, service_type, name, state_change)
            except Exception as exc:
                self._refuse(link, name, "unusable", f"{type(exc).__name__}: {exc}")

        return on_service

    def _flag_handler(self, link: str) -> Callable[..., None]:
        def on_subtype(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            flag = SUBTYPE_FLAGS.get(service_type.lower())
            if flag is not None:
                present = state_change is not ServiceStateChange.Removed
                try:
                    self._apply(self.merger.set_flag(link, name, flag, present), "updated")
                except Exception as exc:
                    self._refuse(link, name, "unusable", f"{type(exc).__name__}: {exc}")

        return on_subtype

    def _on_service(
        self, link: str, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        key = (link, base_type(service_type), name.lower())
        if state_change is ServiceStateChange.Removed:
            # Cancelling the resolve drops an answer that would land after the goodbye
            # (python-zeroconf #1048: Updated can follow Removed).
            pending = self._pending.pop(key, None)
            if pending is not None:
                pending.cancel()
            self._again.discard(key)
            self._deferred.pop(key, None)
            self.events["goodbye"] += 1
            self._apply(self.merger.remove(link, service_type, name), "removed")
            return
        self._schedule(link, service_type, name)
        if state_change is ServiceStateChange.Updated and key not in self._later:
            self._later.add(key)
            self._spawn(self._resolve_later(link, service_type, name, key))

    def _on_heard(self, link: str, name: str) -> None:
        revived = self.merger.hear(link, name, self.clock())
        if revived is not None:
            self.events["revived"] += 1
            self._schedule(link, *revived)

    def _refuse(self, link: str, name: str, reason: str, detail: str) -> None:
        """Count a service refused for what a peer sent; log it once, escaped."""
        mark = (link, reason, name)
        if mark in self._refused_seen:
            return
        if len(self._refused_seen) >= LOGGED_MAX:
            self._refused_seen.clear()
        self._refused_seen.add(mark)
        self.refused[reason] += 1
        LOG.warning(
            "mDNS service refused",
            extra={
                "interface": link,
                "service": escaped(name),
                "reason": reason,
                "detail": escaped(detail),
            },
        )

    def _info(self, link: str, type_: str, name: str) -> AsyncServiceInfo | None:
        """Return python-zeroconf's view of a service, or None (counted) for a name it rejects."""
        try:
            return AsyncServiceInfo(type_, name)
        except BadTypeInNameException as exc:
            self._refuse(link, name, "bad-name", str(exc) or "rejected by python-zeroconf")
        except Exception as exc:
            self._refuse(link, name, "unusable", f"{type(exc).__name__}: {exc}")
        return None

    # ---- resolving -------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule(self, link: str, type_: str, name: str) -> None:
        key = (link, base_type(type_), name.lower())
        if key in self._pending:
            self._again.add(key)
            return
        aiozc = self._links.get(link)
        if aiozc is None:
            return
        # An announcement usually carries SRV, TXT and addresses: take them from the
        # cache at once, so that neither a task nor a backlog of unresolvable names
        # (a flood) stands between a real device and the answers.
        info = self._info(link, type_, name)
        if info is None:
            return
        try:
            cached = info.load_from_cache(aiozc.zeroconf)
            if cached:
                self._accept(link, type_, name, key, info)
        except Exception as exc:  # never let it reach python-zeroconf's dispatch
            self._refuse(link, name, "unusable", f"{type(exc).__name__}: {exc}")
            return
        if cached:
            return
        if len(self._pending) >= MAX_PENDING:
            # A flood of names that never resolve must not pile up tasks (or queries):
            # defer the name, bounded, and resolve it when the backlog has drained.
            if key not in self._deferred:
                if len(self._deferred) >= MAX_DEFERRED:
                    self._deferred.pop(next(iter(self._deferred)))
                    self.events["resolve_dropped"] += 1
                self._deferred[key] = (link, type_, name)
            return
        self._pending[key] = self._spawn(self._resolve(link, type_, name, key))

    async def _resolve_later(self, link: str, type_: str, name: str, key: ServiceKey) -> None:
        try:
            await asyncio.sleep(RESOLVE_AGAIN_AFTER)
        finally:
            self._later.discard(key)
        if key in self.merger.services:
            self._schedule(link, type_, name)

    async def _resolve(self, link: str, type_: str, name: str, key: ServiceKey) -> None:
        try:
            while True:
                await self._resolve_once(link, type_, name, key)
                if key not in self._again:
                    return
                self._again.discard(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._refuse(link, name, "unusable", f"{type(exc).__name__}: {exc}")
        finally:
            if self._pending.get(key) is asyncio.current_task():
                del self._pending[key]

    async def _resolve_once(self, link: str, type_: str, name: str, key: ServiceKey) -> None:
        aiozc = self._links.get(link)
        if aiozc is None:
            return
        info = self._info(link, type_, name)
        if info is None:
            return
        ok = await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS)
        if not ok:
            self.events["resolve_timeout"] += 1
            return
        self._accept(link, type_, name, key, info)

    def _accept(
        self, link: str, type_: str, name: str, key: ServiceKey, info: AsyncServiceInfo
    ) -> None:
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
            interface=link,
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

    def _problem(self, key: ServiceKey, kind: str, detail: str) -> None:
        if (key, kind) in self._logged:
            return
        if len(self._logged) >= LOGGED_MAX:
            self._logged.clear()
        self._logged.add((key, kind))
        self.problems[kind] += 1
        LOG.warning(
            "broken TXT record; keeping what parsed",
            extra={"service": clean_text(key[2], 120), "problem": kind, "detail": detail},
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
            if result in ("added", "updated"):
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
        # Newest first: a flood defers thousands of names that never resolve, each a
        # 3 s timeout; a printer announced after it is resolved at the next tick instead
        # of behind all of them (measured: 3 of 12 missed a 30 s deadline, oldest first).
        while self._deferred and len(self._pending) < MAX_PENDING // 2:
            key = next(reversed(self._deferred))
            self._schedule(*self._deferred.pop(key))
        expire_after = float(self.cfg.expire_after)
        self._apply(self.merger.expire(now, expire_after), "expired")
        queries: dict[str, DNSOutgoing] = {}
        for link, _type, name in self.merger.due_probes(now, max(expire_after / 3.0, 0.5)):
            if link in self._links:
                out = queries.setdefault(link, DNSOutgoing(_FLAGS_QR_QUERY))
                out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
                self.events["probes"] += 1
        for link, out in queries.items():
            try:
                self._links[link].zeroconf.async_send(out)
            except Exception:  # a name that cannot be packed must not stop the upkeep
                LOG.exception("sending probes failed", extra={"interface": link})
        if now - self._touched >= TOUCH_SECONDS:
            self._touched = now
            for device_id, heard in self.merger.device_heard().items():
                self.service.table.touch(device_id, heard)

    def reconfigure(self, cfg: Config) -> None:
        """Follow a reload: new limits now; new links (or none) by a restart in the background."""
        if self.follow(cfg.discovery):
            task = self._spawn_long(self.restart(), "mdns-restart")
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    def follow(self, cfg: DiscoveryConfig) -> bool:
        """Take new limits; return whether the links changed (a restart is needed)."""
        restart = (
            cfg.interfaces != self.cfg.interfaces
            or cfg.ipv6 != self.cfg.ipv6
            or cfg.enabled != self.cfg.enabled
        )
        self.cfg = cfg
        self.merger.max_devices = cfg.max_devices
        self.merger.max_per_source = cfg.max_devices_per_source
        return restart

    async def restart(self) -> None:
        """Reopen the links after a reload; forget services of links no longer browsed."""
        async with self._restart_lock:
            await self._close()
            keep = set(self.cfg.interfaces) if self.cfg.enabled else set()
            self._apply(self.merger.drop_links(keep), "removed")
            if self.cfg.enabled:
                await self.start()
