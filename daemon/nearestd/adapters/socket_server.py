"""TCP and Unix stream sockets speaking length-prefixed MessagePack frames.

``asyncio.Protocol`` rather than streams: replies are computed synchronously as frames
arrive, which keeps pipelined requests in order and costs about half as much per
request. Limits: frame size (an oversized header gets ``too-large`` and the
connection closes, since the stream cannot be resynchronised), open connections
(the one over the cap gets ``unavailable`` and is closed), idle and slow-frame
deadlines (checked by one sweep, not a timer per connection), and backpressure (a
peer that does not read its replies stops being read).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import resource
import socket
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from nearest_wire import ErrorCode, FrameDecoder, FrameTooLarge, error_reply
from nearest_wire.fast import FastFrameEncoder
from nearestd.config import Cidr, Config, DaemonConfig, SocketUrl
from nearestd.core.limits import ConnectionSlots, source_key
from nearestd.core.netset import NetSet, normalise_peer
from nearestd.logs import client_label
from nearestd.service import ADMIN_PEER, UNIX_PEER, Peer, Reply, Service, wall_clock

LOG = logging.getLogger("nearestd.socket")
# One encoder for every reply (the loop is single-threaded): msgspec's, the same bytes as
# msgpack's Packer in half the time.
_encode = FastFrameEncoder().encode
# A connection's output budget: replies are answered while the bytes it has not read stay
# under this; then it is neither answered nor read until it catches up.
WRITE_HIGH = 256 * 1024
ADMIN_MAX_CONNECTIONS = 16
ACCEPT_BURST = 128
SHARE_WARNING_EVERY = 60.0
# At shutdown, how long requests already received may take to be answered.
DRAIN_SECONDS = 1.0
# Descriptors beyond the connection caps: listening sockets, mDNS, the broker, files.
FD_MARGIN = 256


class Connections:
    """Open connections over every socket, for the cap and the deadline sweep."""

    def __init__(self, limits: DaemonConfig, clock: Callable[[], float]) -> None:
        # The [daemon] limits at start: sockets and their caps stay until a restart.
        self.limits = limits
        self.clock = clock
        self.open: set[QueryProtocol] = set()
        # Admin connections have a small cap of their own, so a flood of query
        # connections never locks the operator out.
        self.admin_open = 0
        self.slots = ConnectionSlots(
            limits.max_connections, limits.max_connections_per_source, limits.reserved_connections
        )
        self.refused = 0
        self.refused_per_source = 0
        self._warned_at = float("-inf")
        self._warned_count = 0
        self.closed_idle = 0
        self.closed_slow = 0
        self.too_large = 0

    def add(self, conn: QueryProtocol) -> str | None:
        """Count a new connection in and return None, or return which cap refuses it."""
        if conn.interface == "admin":
            if self.admin_open >= ADMIN_MAX_CONNECTIONS:
                return "full"
            self.admin_open += 1
        else:
            why = self.slots.admit(conn.source, conn.slot_trusted)
            if why is not None:
                return why
        self.open.add(conn)
        return None

    def warn_share(self, ip: str | None, log_ip: str) -> None:
        """Log a source refused over its share, at most once a minute (a flood logs little)."""
        now = self.clock()
        if now - self._warned_at < SHARE_WARNING_EVERY:
            return
        LOG.warning(
            "connections refused: one source holds its share",
            extra={
                "client": client_label(ip, log_ip),
                "max_connections_per_source": self.slots.per_source,
                "refused_since_last_warning": self.refused_per_source - self._warned_count,
            },
        )
        self._warned_at = now
        self._warned_count = self.refused_per_source

    def forget(self, conn: QueryProtocol) -> None:
        """Count a closed connection out (idempotent)."""
        if conn in self.open:
            self.open.discard(conn)
            if conn.interface == "admin":
                self.admin_open -= 1
            else:
                self.slots.release(conn.source, conn.slot_trusted)

    def sweep(self) -> None:
        """Close idle connections and those whose frame is too slow to arrive."""
        now = self.clock()
        for conn in list(self.open):
            if conn.waiting:
                continue  # not idle: the daemon is working on its request (a reload)
            if (
                conn.frame_started is not None
                and now - conn.frame_started > self.limits.frame_timeout
            ):
                self.closed_slow += 1
                conn.abort("frame not completed in time")
            elif now - conn.last_activity > self.limits.idle_timeout:
                self.closed_idle += 1
                conn.abort("idle")


class QueryProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        service: Service,
        conns: Connections,
        interface: str,
        peer_for: Callable[[Any], Peer],
    ) -> None:
        self.service = service
        self.conns = conns
        self.interface = interface
        self.peer_for = peer_for
        self.decoder = FrameDecoder(conns.limits.max_frame)
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.last_activity = conns.clock()
        self.frame_started: float | None = None
        self.latency = service.stats.latency.for_interface(interface)
        self._closing = False
        self._pending: deque[bytes | FrameTooLarge] = deque()
        self._write_paused = False
        self._backlog_paused = False
        self._scheduled = False
        self._eof = False
        self._limited = False
        self._prepaid = 0
        # A reply that comes later (reload): the frames after it wait, so replies keep order.
        self._waiting: asyncio.Future[Reply] | None = None
        # What the connection slots and the rate limiter count this client by.
        self.source = interface
        self.slot_trusted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Accept the connection, or refuse it when a cap is reached."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = self.peer_for(transport.get_extra_info("peername"))
        if peer.ip is not None:
            self.source = source_key(peer.ip)
            self.slot_trusted = peer.trusted
        why = self.conns.add(self)
        if why is not None:
            self.conns.refused += 1
            if why == "per-source":
                self.conns.refused_per_source += 1
                self.conns.warn_share(peer.ip, self.service.cfg.privacy.log_ip)
            self._closing = True
            transport.write(_refusal(why))
            transport.close()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        self.peer = peer
        # Trusted peers ask on behalf of many clients; Unix sockets are guarded by permissions.
        self._limited = peer.ip is not None and not peer.trusted

    def data_received(self, data: bytes) -> None:
        """Queue every complete frame and answer up to ``max_in_flight`` of them now."""
        if self._closing or self.peer is None or self.transport is None:
            return
        now = self.conns.clock()
        self.last_activity = now
        items = self.decoder.feed(data)
        if items:
            self._pending.extend(items)
        # The frame deadline times the frame in progress: a read that completed frames
        # started a new one, so a steady stream cut mid-frame by every read is on time.
        if not self.decoder.pending:
            self.frame_started = None
        elif items or self.frame_started is None:
            self.frame_started = now
        if not self._scheduled:
            self._answer()

    def _answer(self) -> None:
        """Answer a batch of queued frames; yield to other connections when more wait.

        Each reply counts against the connection's output budget before the next is
        computed: once the replies it has not read reach ``WRITE_HIGH`` bytes, the batch
        stops there and the rest waits (unread) until the peer catches up.
        """
        self._scheduled = False
        transport = self.transport
        peer = self.peer
        if (
            self._closing
            or transport is None
            or peer is None
            or self._write_paused
            or self._waiting is not None
        ):
            return
        pending = self._pending
        n = min(len(pending), self.conns.limits.max_in_flight)
        if n == 0:
            return
        service = self.service
        wall = wall_clock()
        # Tokens taken for frames a batch left unanswered pay for the next batch first.
        granted = min(n, self._prepaid)
        if self._limited and peer.ip is not None:
            if n > granted:
                granted += service.limiter.take(self.source, n - granted, wall)
        else:
            granted = n
        out: list[bytes] = []
        close = False
        handle_payload = service.handle_payload
        observe = self.latency.observe
        popleft = pending.popleft
        append = out.append
        budget = WRITE_HIGH - transport.get_write_buffer_size()
        answered = 0
        for i in range(n):
            if budget <= 0 and i:  # at least one: the write then pauses a full buffer
                break
            answered += 1
            item = popleft()
            if isinstance(item, FrameTooLarge):
                self.conns.too_large += 1
                service.stats.queries[(self.interface, "invalid", str(ErrorCode.TOO_LARGE))] += 1
                out.append(
                    _encode(
                        error_reply(
                            None,
                            ErrorCode.TOO_LARGE,
                            f"frame of {item.declared} bytes exceeds the limit of {item.limit} bytes",
                        )
                    )
                )
                close = True
                break
            try:
                if i < granted:
                    started = perf_counter()
                    reply = handle_payload(item, peer, wall)
                    if type(reply) is not dict:
                        self._wait_for(reply)  # type: ignore[arg-type]
                        break
                    frame = _encode(reply)
                    observe(perf_counter() - started)
                else:
                    frame = _encode(service.rate_limited_reply(item, peer))
            except Exception:
                LOG.exception(
                    "internal error answering a request", extra={"interface": self.interface}
                )
                frame = _encode(error_reply(None, ErrorCode.INTERNAL, "internal error"))
            append(frame)
            budget -= len(frame)
        self._prepaid = max(0, granted - answered) if self._limited else 0
        if out:
            transport.write(b"".join(out))
        if self._waiting is not None:
            if not self._backlog_paused:
                self._backlog_paused = True
                transport.pause_reading()
            return
        if close:
            pending.clear()
            self._closing = True
            transport.close()
            return
        if pending:
            # Stop reading until the backlog is answered: memory stays at one read's worth,
            # and other connections get their turn between batches.
            if not self._backlog_paused:
                self._backlog_paused = True
                transport.pause_reading()
            if not self._write_paused:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._answer)
            return
        if self._backlog_paused:
            self._backlog_paused = False
            if not self._write_paused:
                transport.resume_reading()
        if self._eof:
            self._closing = True
            transport.close()

    @property
    def waiting(self) -> bool:
        """Return whether a reply that comes later is awaited (a reload under way)."""
        return self._waiting is not None

    def _wait_for(self, reply: Awaitable[Reply]) -> None:
        """Send a reply that comes later when it comes, then answer the frames after it."""
        waiting = asyncio.ensure_future(reply)
        self._waiting = waiting
        waiting.add_done_callback(self._deferred_done)

    def _deferred_done(self, waiting: asyncio.Future[Reply]) -> None:
        self._waiting = None
        self.last_activity = self.conns.clock()
        transport = self.transport
        if waiting.cancelled() or transport is None or self._closing or transport.is_closing():
            return
        exc = waiting.exception()
        if exc is not None:
            LOG.error(
                "internal error answering a request",
                extra={"interface": self.interface, "error": repr(exc)},
            )
            transport.write(_encode(error_reply(None, ErrorCode.INTERNAL, "internal error")))
        else:
            transport.write(_encode(waiting.result()))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._answer)
        if not self._pending and self._backlog_paused and not self._write_paused:
            self._backlog_paused = False
            transport.resume_reading()

    def eof_received(self) -> bool:
        """Answer what the peer sent before its half-close, then close."""
        self._eof = True
        return bool(self._pending) or self._waiting is not None

    def finish(self) -> None:
        """Stop reading; close once every request already received is answered (shutdown)."""
        transport = self.transport
        if transport is None or self._closing or transport.is_closing():
            return
        transport.pause_reading()
        self._backlog_paused = False
        self._eof = True  # as after a half-close: answer what is queued, then close
        if not self._pending and self._waiting is None:
            self._closing = True
            transport.close()
        elif not self._scheduled and not self._write_paused:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._answer)

    def pause_writing(self) -> None:
        """Stop reading from (and answering) a peer that does not read its replies."""
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """Read and answer again once the peer has caught up."""
        self._write_paused = False
        if self.transport is None or self._closing:
            return
        if self._pending:
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._answer)
        else:
            self._backlog_paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self.conns.forget(self)

    def abort(self, why: str) -> None:
        """Close the connection now."""
        LOG.debug("closing connection", extra={"interface": self.interface, "reason": why})
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        self.conns.forget(self)


def _netset(cidrs: list[Cidr]) -> NetSet:
    return NetSet(c.network for c in cidrs)


class SocketServers:
    """Every listening socket of the daemon: the query sockets and the admin socket."""

    name = "connections"

    def __init__(self, service: Service, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        limits = service.cfg.daemon
        self.conns = Connections(limits, clock)
        self.servers: list[asyncio.AbstractServer] = []
        self.unix_paths: list[Path] = []
        self.addresses: list[str] = []
        _ensure_fd_room(limits.max_connections + ADMIN_MAX_CONNECTIONS + FD_MARGIN)
        self.allow = _netset(limits.allow)
        self.trusted = _netset(limits.trusted_peers)

    async def start(self) -> None:
        """Listen on ``[daemon] listen`` and the admin socket; raise OSError if one cannot be."""
        cfg = self.service.cfg
        for url in cfg.daemon.listen:
            self.addresses.append(await self.listen(url))
        if cfg.daemon.admin_socket:
            self.addresses.append(
                await self.listen_admin(
                    cfg.resolve(cfg.daemon.admin_socket),
                    cfg.daemon.admin_mode,
                    cfg.daemon.admin_group,
                )
            )

    async def stop(self) -> None:
        """Stop accepting; answer what was received (up to ``DRAIN_SECONDS``), then close."""
        await self.stop_accepting()
        await self.drain(DRAIN_SECONDS)

    def reconfigure(self, cfg: Config) -> None:
        """Follow a reload: who may query and who is trusted (sockets stay where they are)."""
        self.set_policy(cfg.daemon.allow, cfg.daemon.trusted_peers)

    def stats(self) -> dict[str, Any]:
        """Return open connections, refusals and deadline closes, and the event loop's tasks."""
        return self.connections_view()

    def connections_view(self) -> dict[str, Any]:
        """Return open connections, refusals and deadline closes, and the event loop's tasks."""
        c = self.conns
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # no running loop (a test calling in directly)
            tasks = 0
        return {
            "open": len(c.open) - c.admin_open,
            "admin_open": c.admin_open,
            "refused_at_cap": c.refused,
            "refused_per_source": c.refused_per_source,
            "untrusted_sources": c.slots.sources,
            "closed_idle": c.closed_idle,
            "closed_slow": c.closed_slow,
            "frames_too_large": c.too_large,
            "tasks": tasks,
            "fds": _open_fds(),
        }

    def set_policy(self, allow: list[Cidr], trusted: list[Cidr]) -> None:
        """Replace who may query and who is trusted (after a reload)."""
        self.allow = _netset(allow)
        self.trusted = _netset(trusted)
        d = self.service.cfg.daemon
        self.conns.slots.configure(
            self.conns.limits.max_connections, d.max_connections_per_source, d.reserved_connections
        )

    def _tcp_peer(self, peername: Any) -> Peer:
        ip = normalise_peer(str(peername[0])) if peername else "0.0.0.0"
        return Peer("tcp", ip, trusted=self.trusted.contains(ip), allowed=self.allow.contains(ip))

    async def listen(self, url: SocketUrl) -> str:
        """Start serving on a tcp:// or unix:// URL; return the bound address."""
        loop = asyncio.get_running_loop()
        cfg = self.service.cfg
        if url.unix:
            path = cfg.resolve(url.path)
            sock = _unix_socket(path, cfg.daemon.socket_mode, "")
            server = await loop.create_unix_server(
                lambda: QueryProtocol(self.service, self.conns, "unix", lambda _: UNIX_PEER),
                sock=sock,
            )
            self.servers.append(server)
            self.unix_paths.append(path)
            return f"unix://{path}"
        server = await loop.create_server(
            lambda: QueryProtocol(self.service, self.conns, "tcp", self._tcp_peer),
            url.host,
            url.port,
            reuse_address=True,
            # asyncio accepts up to ``backlog`` connections per wake-up; a smaller burst
            # keeps a connection flood from stalling requests already being served.
            backlog=ACCEPT_BURST,
        )
        self.servers.append(server)
        addr = server.sockets[0].getsockname()
        return (
            f"tcp://{addr[0]}:{addr[1]}" if ":" not in addr[0] else f"tcp://[{addr[0]}]:{addr[1]}"
        )

    async def listen_admin(self, path: Path, mode: int, group: str) -> str:
        """Start the admin socket (owner-only unless a group is configured)."""
        loop = asyncio.get_running_loop()
        sock = _unix_socket(path, mode, group)
        server = await loop.create_unix_server(
            lambda: QueryProtocol(self.service, self.conns, "admin", lambda _: ADMIN_PEER),
            sock=sock,
        )
        self.servers.append(server)
        self.unix_paths.append(path)
        return f"unix://{path}"

    async def stop_accepting(self) -> None:
        """Stop listening; open connections keep being served until closed."""
        for server in self.servers:
            server.close()
        for path in self.unix_paths:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    async def drain(self, timeout: float) -> None:
        """Give open connections until ``timeout`` to finish, then close them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for conn in list(self.conns.open):
            conn.finish()
        while self.conns.open and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns.open):
            conn.abort("shutdown")


def _ensure_fd_room(wanted: int) -> None:
    """Raise the soft open-file limit so the connection caps, not EMFILE, refuse clients.

    Out of descriptors, accept() fails for every socket alike, the Unix and admin sockets
    too, and the reserve for trusted clients would mean nothing.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        LOG.warning(
            "the open-file limit is below max_connections plus a margin; "
            "connections beyond it fail for every client alike",
            extra={"limit": target, "wanted": wanted},
        )


def _refusal(why: str) -> bytes:
    """Return the ``unavailable`` frame that tells a refused connection which cap it met."""
    if why == "per-source":
        text = "too many connections from this address; close some or try again later"
    else:
        text = "too many connections; try again later"
    return _encode(error_reply(None, ErrorCode.UNAVAILABLE, text))


def _unix_socket(path: Path, mode: int, group: str) -> socket.socket:
    """Bind a Unix socket with its final permissions from the start (no open window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
        else:
            raise OSError(f"{path} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        mode |= 0o060
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _open_fds() -> int:
    """Return how many file descriptors the process holds (-1 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
