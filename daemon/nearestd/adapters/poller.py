"""The poller: asks printers (IPP) and scanners (eSCL) whether they can serve, and how full.

Every discovered device whose URI or endpoints name ipp/ipps (printers) or http(s) eSCL
roots (scanners) is polled; a static device from a site map only when its ``poll``
property, or else ``[poller] static``, says so. Each device has its own due time:
the first poll is spread over one interval, later ones follow
``core.state.next_delay`` (interval +/- jitter, doubling per failure up to
``max_backoff``), so a cycle over many devices is a trickle, not a burst. The pool's
``concurrency`` threads bound the polls in flight; each poll, connection to last byte,
has the configured timeout; replies are read up to ``max_response`` bytes. TLS
certificates are not checked: these are status reads of printers that mostly have
self-signed ones.

Where the work runs, and why (measured in ``make bench``): the exchange itself (connect,
TLS handshake, request, bounded read, decoding into an immutable ``Live``) runs in a
small thread pool, because its syscalls and handshakes cost far more than its Python
and, on the event loop, they delayed queries (an ipps cycle doubled the query p99).
The threads touch nothing shared: they put results on a queue, which the loop empties
every quarter second (so a poll costs the loop no wakeup of its own), and hands them to
``Service.set_live`` at once: the answer cache keeps who is answered and in what order,
and only a change that can alter that (availability, place, the state tie-break)
invalidates it, so a new supply level or state reason costs no cached answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import queue
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httptools

from nearestd.adapters.component import Spawn, spawn_task
from nearestd.config import Config, PollerConfig
from nearestd.core.discovery import AddressPolicy, address_refusal
from nearestd.core.ipp import IppDecodeError, decode_response, encode_get_printer_attributes
from nearestd.core.model import DeviceState
from nearestd.core.schedule import PollSchedule
from nearestd.core.state import (
    MAX_ESCL_BYTES,
    PRINTER_ATTRIBUTES,
    Live,
    PollTarget,
    StatusError,
    poll_target,
    printer_live,
    scanner_live,
    unreachable,
    uri_host,
)

if TYPE_CHECKING:
    from nearestd.service import Service

LOG = logging.getLogger("nearestd.poller")
TICK_SECONDS = 0.25
# Poll results are applied in batches, since each change empties the answer cache. A
# change of what can be answered (availability, placement) goes in the next tick's batch;
# one that only reorders ties or shows (idle/processing, reasons, supplies) may wait.
USER_AGENT = "nearestd-poller"
# The status line and headers together, at most.
MAX_HEAD = 16384
MAX_HEADERS = 64
# Every reason a poll can fail for; they are the unreachable reasons and the metric labels.
ERROR_KINDS = (
    "timeout",
    "connection-refused",
    "connect-error",
    "tls-error",
    "http-error",
    "bad-response",
    "too-large",
    "refused-address",
)


class PollFailure(Exception):
    """A poll did not yield a usable status; ``kind`` is one of ERROR_KINDS."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def insecure_tls_context() -> ssl.SSLContext:
    """Return a TLS client context that accepts self-signed certificates (status reads only)."""
    # Not create_default_context(): it loads the system's CA store (about 0.2 s on the
    # event loop) for a context that verifies nothing.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Workers:
    """Daemon threads that run jobs from a queue: a poll stuck in connect() cannot delay exit.

    (A ThreadPoolExecutor's threads are joined when the interpreter exits, and a connect
    to a powered-off host on the LAN blocks for seconds.)
    """

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._count = count
        for i in range(count):
            threading.Thread(target=self._loop, name=f"poll-{i}", daemon=True).start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job for the next free thread."""
        self._jobs.put(job)

    def shutdown(self) -> None:
        """Let each thread end after its current job; jobs not started yet are dropped."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in range(self._count):
            self._jobs.put(None)


class Poller:
    """Polls every pollable device on its own schedule and hands results to the service."""

    name = "poller"

    def __init__(
        self,
        service: Service,
        cfg: PollerConfig,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        spawn: Spawn = spawn_task,
    ) -> None:
        self.service = service
        self._spawn = spawn
        self.cfg = cfg
        self._clock = clock
        self._rand = rand
        # The decisions (who is due, backoff, heard-again) live in the core.
        self.plan = PollSchedule(cfg.interval, cfg.max_backoff, cfg.jitter)
        self._generation = -1
        self._tls = insecure_tls_context()
        self._pool: Workers | None = None
        self._open = OpenSockets()
        self._runner: asyncio.Task[None] | None = None
        self.restarting: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self.polls = 0
        self.errors: Counter[str] = Counter()
        self.transitions = 0
        self.poll_seconds = 0.0
        self._pending: dict[str, Live] = {}
        self._results: queue.SimpleQueue[tuple[str, Live | None, str, str, float]] = (
            queue.SimpleQueue()
        )
        # Which addresses are never polled (loopback, this host's own, ...); set at start.
        self._policy = AddressPolicy(loopback_ok=True)
        self.refused: Counter[str] = Counter()
        self._refused_ids: set[str] = set()

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread pool and the schedule."""
        if self._runner is not None or not self.cfg.enabled:
            return
        self._policy = await asyncio.get_running_loop().run_in_executor(None, self.address_policy)
        self._pool = Workers(self.cfg.concurrency)
        self.plan.started_at = self._clock()
        self._runner = self._spawn(self._run(), "poller")
        LOG.info(
            "poller started",
            extra={"interval_s": self.cfg.interval, "concurrency": self.cfg.concurrency},
        )

    async def stop(self) -> None:
        """Cancel the schedule (and a restart under way); wake and drop the polls in flight."""
        restarting, self.restarting = self.restarting, None
        if restarting is not None and restarting is not asyncio.current_task():
            restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await restarting
        await self._halt()

    async def _halt(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        if self._pool is not None:
            self._pool.shutdown()
            # Wake the polls blocked in a socket, so that no thread outlives the stop.
            self._open.abort_all()
            self._pool = None
        self._runner = None
        self.plan.in_flight.clear()
        self._results = queue.SimpleQueue()

    def address_policy(self) -> AddressPolicy:
        """Return the addresses never polled: this host's own and loopback, unless allowed."""
        if self.cfg.poll_this_host:
            return AddressPolicy(link_local_ok=True, loopback_ok=True)
        from nearestd.adapters.mdns import host_address_policy

        return host_address_policy()

    def refusal(self, address: str) -> str | None:
        """Return why an address is never polled, or None."""
        return address_refusal(address, self._policy)

    def forget(self) -> None:
        """Drop every live state found so far: with the poller off, states are unknown."""
        for device_id in list(self.service.live):
            self.service.set_live(device_id, None)
        self.plan = PollSchedule(self.cfg.interval, self.cfg.max_backoff, self.cfg.jitter)
        self._generation = -1

    def reconfigure(self, cfg: Config) -> None:
        """Follow a reload; a change of ``enabled`` or ``concurrency`` restarts in the background."""
        if self.follow(cfg.poller):
            self.restarting = self._spawn(self._restart(), "poller-restart")

    async def _restart(self) -> None:
        await self._halt()
        if self.cfg.enabled:
            await self.start()
        else:
            self.forget()

    def follow(self, cfg: PollerConfig) -> bool:
        """Take a new config; return whether the poller must be restarted."""
        restart = (cfg.enabled, cfg.concurrency) != (self.cfg.enabled, self.cfg.concurrency)
        if cfg.static != self.cfg.static:
            self._generation = -1  # which static devices are polled changed
        self.cfg = cfg
        self.plan.interval, self.plan.max_backoff = cfg.interval, cfg.max_backoff
        self.plan.jitter = cfg.jitter
        return restart

    # ---- schedule ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                now = self._clock()
                self.collect()
                if self._pending:
                    self.apply_pending()
                self.schedule(now)
            except Exception:
                LOG.exception("poll scheduling failed")
            await asyncio.sleep(TICK_SECONDS)

    def sync_targets(self, now: float) -> None:
        """Follow the device table: new devices get a due time, gone ones are dropped."""
        table = self.service.table
        # Only a change of this daemon's own devices' addresses matters here (federated
        # devices are not polled, and a poll result changes a device's state, not its reach).
        if table.reach_generation == self._generation:
            return
        self._generation = table.reach_generation
        targets: dict[str, PollTarget] = {}
        static_poll = self.service.sitemap.static_poll
        for rec in table.records():
            # The cheap test first: a large map's static devices are mostly not polled.
            if rec.device.source == "static" and not static_poll.get(
                rec.device.id, self.cfg.static
            ):
                continue
            target = poll_target(rec.device)
            if target is None:
                continue
            device_id = rec.device.id
            host = uri_host(target.url) or ""
            why = self.refusal(host)
            if why is not None and why != "not-an-address":  # a host name: checked at connect
                if device_id not in self._refused_ids and len(self._refused_ids) < 65536:
                    self._refused_ids.add(device_id)
                    self.refused[why] += 1
                    LOG.warning(
                        "device not polled: refused address",
                        extra={"device": device_id, "reason": why},
                    )
                continue
            targets[device_id] = target
        dropped = [d for d in self.plan.targets if d not in targets]
        self.plan.follow(targets, now, self._rand())
        for device_id in dropped:
            if device_id in self.service.live:  # no longer polled: its state is unknown
                self.service.set_live(device_id, None)

    def heard_again(self, now: float) -> None:
        """Ask at once (once per failure streak) a failing device discovery hears from again."""
        table = self.service.table
        for device_id in [d for d, at in self.plan.heard_at_failure.items() if at != math.inf]:
            rec = table.get(device_id)
            if rec is not None:
                self.plan.heard(device_id, rec.last_seen, now)

    def schedule(self, now: float) -> int:
        """Start a poll for every device that is due; return how many were started."""
        self.sync_targets(now)
        self.heard_again(now)
        due = self.plan.take_due(now)
        for device_id, target in due:
            self._submit(device_id, target)
        return len(due)

    async def poll_all(self) -> None:
        """Poll every pollable device once now, and wait for all of them (tests, bench)."""
        self.sync_targets(self._clock())
        for device_id, target in self.plan.take_all():
            self._submit(device_id, target)
        while self.plan.in_flight:
            await asyncio.sleep(0.01)
            self.collect()
        self.apply_pending()

    # ---- one poll ------------------------------------------------------------------------
    def _submit(self, device_id: str, target: PollTarget) -> None:
        """Hand one poll to the pool; its result comes back through ``collect``."""
        if self._pool is None:
            self.plan.in_flight.discard(device_id)
            return
        request_id = next(self._ids) % 0x7FFFFFFF or 1
        self._pool.submit(lambda: self._work(device_id, target, request_id))

    def _work(self, device_id: str, target: PollTarget, request_id: int) -> None:
        """Poll one device; runs in a pool thread and only puts its result on the queue."""
        started = time.monotonic()
        live: Live | None = None
        failure = detail = ""
        try:
            live = fetch_live(
                target,
                request_id,
                self.cfg.timeout,
                self.cfg.max_response,
                self._tls,
                self._open,
                self.refusal,
            )
        except PollFailure as exc:
            failure, detail = exc.kind, str(exc)
        except Exception as exc:  # a bug here must not lose the device's schedule
            failure, detail = "bad-response", f"{type(exc).__name__}: {exc}"
        self._results.put((device_id, live, failure, detail, time.monotonic() - started))

    def collect(self) -> int:
        """Take the finished polls' results (on the loop): schedule, account, queue to apply."""
        n = 0
        while True:
            try:
                device_id, live, failure, detail, elapsed = self._results.get_nowait()
            except queue.Empty:
                return n
            n += 1
            self.polls += 1
            self.poll_seconds += elapsed
            rec = self.service.table.get(device_id)
            failures = self.plan.on_result(
                device_id,
                not failure,
                self._clock(),
                self._rand(),
                last_seen=rec.last_seen if rec is not None else 0.0,
            )
            if failure:
                self.errors[failure] += 1
                previous = self._pending.get(device_id) or self.service.live.get(device_id)
                live = unreachable(previous, failure)
                if failures == 1:
                    LOG.info(
                        "device not answering",
                        extra={"device": device_id, "reason": failure, "detail": detail[:200]},
                    )
            if device_id not in self.plan.targets or live is None:
                continue
            self._pending[device_id] = live

    def apply_pending(self) -> None:
        """Hand the poll results gathered since the last batch to the service."""
        pending, self._pending = self._pending, {}
        for device_id, live in pending.items():
            self._apply(device_id, live)

    def _apply(self, device_id: str, live: Live) -> None:
        before = self.service.live.get(device_id)
        result = self.service.set_live(device_id, live)
        if result in ("added", "updated") and (
            before is None
            or (before.state, before.accepting_jobs) != (live.state, live.accepting_jobs)
        ):
            self.transitions += 1
            LOG.info(
                "device state",
                extra={
                    "device": device_id,
                    "state": str(live.state),
                    "accepting": live.accepting_jobs,
                    "reasons": ",".join(live.reasons) or "none",
                },
            )

    # ---- figures -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Return the poller's figures for ``stats`` and the metrics adapter."""
        census = self.service.census(time.time())
        running = self.cfg.enabled and self._runner is not None
        by_state = dict(census.polled_by_state) if running else {}
        supplies: dict[str, dict[str, int]] = {}
        for device_id, name, level in census.supplies:
            supplies.setdefault(device_id, {})[name] = level
        return {
            "enabled": running,
            "devices_polled": sum(by_state.values()),
            "devices_by_state": by_state,
            "devices_unreachable": by_state.get(str(DeviceState.UNREACHABLE), 0),
            "in_flight": len(self.plan.in_flight),
            "polls_total": self.polls,
            "poll_errors_total": {kind: self.errors.get(kind, 0) for kind in ERROR_KINDS},
            "poll_seconds_total": round(self.poll_seconds, 6),
            "state_changes_total": self.transitions,
            "refused_targets": dict(self.refused),
            "supply_levels": supplies,
        }


def fetch_live(
    target: PollTarget,
    request_id: int,
    timeout: float,
    limit: int,
    tls: ssl.SSLContext,
    open_sockets: OpenSockets | None = None,
    refuse: Callable[[str], str | None] | None = None,
) -> Live:
    """Poll one device (blocking, in a worker thread) and decide its live state.

    Runs off the event loop: connecting, TLS handshakes and the syscalls of a poll cost
    far more than its Python, and there they would delay queries. It touches nothing
    shared: bytes in, an immutable ``Live`` out.
    """
    deadline = time.monotonic() + timeout
    if target.protocol == "ipp":
        body = encode_get_printer_attributes(
            target.printer_uri, request_id, PRINTER_ATTRIBUTES, user="nearestd"
        )
        data = exchange("POST", target.url, body, limit, deadline, tls, open_sockets, refuse)
        try:
            reply = decode_response(data)
        except IppDecodeError as exc:
            raise PollFailure("bad-response", str(exc)) from None
        if not reply.ok:
            raise PollFailure("bad-response", f"IPP status 0x{reply.status:04x}")
        if reply.request_id != request_id:
            raise PollFailure("bad-response", "IPP request-id does not match")
        return printer_live(reply.printer)
    data = exchange(
        "GET", target.url, None, min(limit, MAX_ESCL_BYTES), deadline, tls, open_sockets, refuse
    )
    try:
        return scanner_live(data)
    except StatusError as exc:
        raise PollFailure("bad-response", str(exc)) from None


class OpenSockets:
    """The sockets of polls in flight, so that stopping can wake the threads blocked in them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()

    def add(self, sock: socket.socket) -> None:
        """Note a socket a poll is using."""
        with self._lock:
            self._socks.add(sock)

    def discard(self, sock: socket.socket) -> None:
        """Forget a socket a poll is done with."""
        with self._lock:
            self._socks.discard(sock)

    def abort_all(self) -> None:
        """Shut every noted socket down: its blocked reads and writes return at once."""
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def exchange(
    method: str,
    url: str,
    body: bytes | None,
    limit: int,
    deadline: float,
    tls: ssl.SSLContext,
    open_sockets: OpenSockets | None = None,
    refuse: Callable[[str], str | None] | None = None,
) -> bytes:
    """Send one HTTP/1.1 request and read its reply by ``deadline``; errors are PollFailure.

    A redirect is never followed (any status but 200 fails the poll); ``refuse`` says
    which resolved addresses must not be connected to.
    """
    try:
        return _http(method, url, body, limit, deadline, tls, open_sockets or OpenSockets(), refuse)
    except PollFailure:
        raise
    except TimeoutError:
        raise PollFailure("timeout", "no complete reply in time") from None
    except ConnectionRefusedError as exc:
        raise PollFailure("connection-refused", str(exc)) from None
    except ssl.SSLError as exc:
        raise PollFailure("tls-error", str(exc)) from None
    except ValueError as exc:
        raise PollFailure("http-error", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise PollFailure("connect-error", f"{type(exc).__name__}: {exc}") from None


def _connect(
    host: str,
    port: int,
    deadline: float,
    open_sockets: OpenSockets,
    refuse: Callable[[str], str | None] | None = None,
) -> socket.socket:
    """Connect to the first address of host that answers and is not refused, by the deadline."""
    error: OSError | PollFailure = OSError(f"no address for {host!r}")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        why = refuse(str(addr[0])) if refuse is not None else None
        if why is not None:
            error = PollFailure("refused-address", f"{host} is at a {why} address")
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock = socket.socket(family, kind, proto)
        open_sockets.add(sock)
        try:
            sock.settimeout(left)
            sock.connect(addr)
            return sock
        except OSError as exc:
            open_sockets.discard(sock)
            sock.close()
            if isinstance(exc, (ConnectionRefusedError, TimeoutError)):
                raise
            error = exc
    raise error


def _http(
    method: str,
    url: str,
    body: bytes | None,
    limit: int,
    deadline: float,
    tls: ssl.SSLContext,
    open_sockets: OpenSockets,
    refuse: Callable[[str], str | None] | None = None,
) -> bytes:
    # One request per connection; the reply is framed by httptools (llhttp, Node's HTTP/1.1
    # parser): Content-Length, chunked and close-delimited. This bounds the head, the header
    # count, the body and every read by the deadline.
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    # An IPv6 zone is written %25 in a URI (RFC 6874) and % to the resolver.
    host = (parts.hostname or "").replace("%25", "%")
    port = parts.port or (443 if secure else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # The URL comes from a device's advertisement: nothing in it may end a header line.
    if not _TOKEN.fullmatch(path) or not _TOKEN.fullmatch(parts.netloc):
        raise PollFailure("http-error", "the device's URL has a space or control character")
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Accept-Encoding: identity\r\nConnection: close\r\n"
    )
    if body is not None:
        head += f"Content-Type: application/ipp\r\nContent-Length: {len(body)}\r\n"
    request = (head + "\r\n").encode("ascii") + (body or b"")
    sock = _connect(host, port, deadline, open_sockets, refuse)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            raw = sock
            sock = tls.wrap_socket(
                raw, server_hostname=host.split("%", 1)[0], do_handshake_on_connect=False
            )
            open_sockets.discard(raw)
            open_sockets.add(sock)
            sock.do_handshake()
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(request)
        return _read_reply(sock, deadline, limit)
    finally:
        open_sockets.discard(sock)
        sock.close()


_TOKEN = re.compile(r"[\x21-\x7e]+")


class _Reply:
    """What httptools reports of one reply, checked as it comes: status, head, body."""

    __slots__ = (
        "body",
        "complete",
        "error",
        "framed",
        "head_bytes",
        "headers",
        "limit",
        "parser",
        "status",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.body = bytearray()
        self.status = 0
        self.headers = 0
        self.head_bytes = 0
        self.framed = False
        self.complete = False
        self.error: PollFailure | None = None
        self.parser: httptools.HttpResponseParser | None = None

    def fail(self, kind: str, detail: str) -> None:
        if self.error is None:
            self.error = PollFailure(kind, detail)

    def on_message_begin(self) -> None:
        # A 1xx reply comes before the real one and is skipped whole.
        self.headers = self.head_bytes = 0
        self.framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.headers > MAX_HEADERS:
            self.fail("http-error", f"more than {MAX_HEADERS} header lines")
        elif self.head_bytes > MAX_HEAD:
            self.fail("http-error", f"a reply head over {MAX_HEAD} bytes")
        lower = name.lower()
        if lower == b"content-length":
            self.framed = True
            if value.strip().isdigit() and int(value) > self.limit:
                self.fail("too-large", f"{int(value)} bytes announced")
        elif lower == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
        if self.parser is not None:
            self.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > self.limit:
            self.fail("too-large", f"more than {self.limit} bytes")
        elif self.error is None:
            self.body += data

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.complete = True


def _read_reply(sock: socket.socket, deadline: float, limit: int) -> bytes:
    """Read one reply's body: status 200 only, at most ``limit`` bytes, by the deadline."""
    reader = ReplyReader(limit)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data = sock.recv(65536)
            body = reader.feed(data) if data else reader.end()
            if body is not None:
                return body
    finally:
        reader.close()


class ReplyReader:
    """One HTTP/1.1 reply, fed as it arrives (sans-I/O); errors are PollFailure.

    Status 200 only (a redirect is never followed: the device answers at its own address
    or not); the head at most MAX_HEAD bytes and MAX_HEADERS lines; the body at most
    ``limit`` bytes, framed by Content-Length, chunked, or the connection's end.
    """

    def __init__(self, limit: int) -> None:
        self.reply = _Reply(limit)
        self._parser = httptools.HttpResponseParser(self.reply)
        # The parser holds the reply and the reply the parser: ``close`` breaks the cycle.
        self.reply.parser = self._parser
        self._fed = 0

    def close(self) -> None:
        """Let go of the parser (the reply's reference to it is a cycle)."""
        self.reply.parser = None

    def feed(self, data: bytes) -> bytes | None:
        """Take the next bytes of the reply; return its body once it is complete."""
        reply = self.reply
        self._fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise PollFailure("http-error", "the device switched protocols") from None
        except httptools.HttpParserError as exc:
            raise PollFailure("http-error", f"bad HTTP reply: {exc}") from None
        if reply.error is not None:
            raise reply.error
        if reply.status >= 200 and reply.status != 200:
            raise PollFailure("http-error", f"HTTP {reply.status}")
        if reply.complete:
            return bytes(reply.body)
        if reply.status < 200 and self._fed > MAX_HEAD:
            raise PollFailure("http-error", f"a reply head over {MAX_HEAD} bytes")
        return None

    def end(self) -> bytes:
        """The connection closed: return a body that ends there, or fail."""
        reply = self.reply
        # Without a length or chunking, the body ends where the connection does.
        if reply.status == 200 and not reply.framed and reply.error is None:
            return bytes(reply.body)
        raise PollFailure("http-error", "connection closed before the end of the reply")
