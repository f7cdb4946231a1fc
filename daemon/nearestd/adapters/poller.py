"""The poller: asks printers (IPP) and scanners (eSCL) whether they can serve, and how full.

Every device whose URI or endpoints name ipp/ipps (printers) or http(s) eSCL roots
(scanners) is polled, discovered and static alike. Each device has its own due time:
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
every quarter second (so a poll costs the loop no wakeup of its own). The loop hands
them to ``Service.set_live`` in batches, since every change empties the answer cache: a
change of what can be answered (availability) or of where a device is goes in the next
tick's batch; one that only reorders ties or what is shown (idle/processing, reasons,
supplies) waits up to ``LAZY_APPLY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import queue
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nearestd.config import PollerConfig
from nearestd.core.discovery import AddressPolicy, address_refusal
from nearestd.core.ipp import IppDecodeError, decode_response, encode_get_printer_attributes
from nearestd.core.model import DeviceState
from nearestd.core.state import (
    MAX_ESCL_BYTES,
    PRINTER_ATTRIBUTES,
    Live,
    PollTarget,
    StatusError,
    first_delay,
    next_delay,
    overlay,
    poll_target,
    printer_live,
    scanner_live,
    unreachable,
    uri_host,
)

if TYPE_CHECKING:
    from nearestd.app import Daemon
    from nearestd.service import Service

LOG = logging.getLogger("nearestd.poller")
TICK_SECONDS = 0.25
# Poll results are applied in batches, since each change empties the answer cache. A
# change of what can be answered (availability, placement) goes in the next tick's batch;
# one that only reorders ties or shows (idle/processing, reasons, supplies) may wait.
LAZY_APPLY_SECONDS = 5.0
USER_AGENT = "nearestd-poller"
MAX_LINE = 8192
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

    def __init__(
        self,
        service: Service,
        cfg: PollerConfig,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.service = service
        self.cfg = cfg
        self._clock = clock
        self._rand = rand
        self._targets: dict[str, PollTarget] = {}
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._in_flight: set[str] = set()
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
        self.last_poll_s = 0.0
        self._pending: dict[str, Live] = {}
        self._urgent = False
        self._results: queue.SimpleQueue[tuple[str, Live | None, str, str, float]] = (
            queue.SimpleQueue()
        )
        self._applied_at = 0.0
        self._started_at = 0.0
        # When discovery last heard of each failing device, as of its last failed poll.
        self._heard: dict[str, float] = {}
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
        self._started_at = self._clock()
        self._runner = asyncio.ensure_future(self._run())
        self._runner.set_name("poller")
        LOG.info(
            "poller started",
            extra={"interval_s": self.cfg.interval, "concurrency": self.cfg.concurrency},
        )

    async def stop(self) -> None:
        """Cancel the schedule; wake and drop the polls in flight."""
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
        self._in_flight.clear()
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
        self._targets.clear()
        self._due.clear()
        self._failures.clear()
        self._generation = -1

    def reconfigure(self, cfg: PollerConfig) -> bool:
        """Take a new config; return whether the poller must be restarted."""
        restart = (cfg.enabled, cfg.concurrency) != (self.cfg.enabled, self.cfg.concurrency)
        self.cfg = cfg
        return restart

    # ---- schedule ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                now = self._clock()
                self.collect()
                if self._urgent or (self._pending and now - self._applied_at >= LAZY_APPLY_SECONDS):
                    self.apply_pending()
                    self._applied_at = now
                self.schedule(now)
            except Exception:
                LOG.exception("poll scheduling failed")
            await asyncio.sleep(TICK_SECONDS)

    def sync_targets(self, now: float) -> None:
        """Follow the device table: new devices get a due time, gone ones are dropped."""
        table = self.service.table
        if table.generation == self._generation:
            return
        self._generation = table.generation
        seen: set[str] = set()
        for rec in table.records():
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
            seen.add(device_id)
            old = self._targets.get(device_id)
            if old != target:
                # At start, first polls are spread over an interval; later, a new device or
                # one at a new address is asked soon.
                starting = old is None and now - self._started_at < self.cfg.interval
                self._targets[device_id] = target
                self._failures.pop(device_id, None)
                self._due[device_id] = now + first_delay(
                    self.cfg.interval if starting else min(self.cfg.interval, 2.0),
                    self._rand(),
                )
        for device_id in list(self._targets):
            if device_id not in seen:
                del self._targets[device_id]
                self._due.pop(device_id, None)
                self._failures.pop(device_id, None)
                self._heard.pop(device_id, None)

    def _heard_again(self, now: float) -> None:
        """Ask at once (once per failure streak) a failing device discovery hears from again."""
        for device_id, heard in self._heard.items():
            rec = self.service.table.get(device_id)
            if rec is not None and rec.last_seen > heard:
                self._due[device_id] = min(now, self._due.get(device_id, now))
                self._heard[device_id] = math.inf

    def schedule(self, now: float) -> int:
        """Start a poll for every device that is due; return how many were started."""
        self.sync_targets(now)
        if self._heard:
            self._heard_again(now)
        started = 0
        for device_id, due in self._due.items():
            if due > now or device_id in self._in_flight:
                continue
            self._submit(device_id, self._targets[device_id])
            started += 1
        return started

    async def poll_all(self) -> None:
        """Poll every pollable device once now, and wait for all of them (tests, bench)."""
        self.sync_targets(self._clock())
        for device_id, target in list(self._targets.items()):
            if device_id not in self._in_flight:
                self._submit(device_id, target)
        while self._in_flight:
            await asyncio.sleep(0.01)
            self.collect()
        self.apply_pending()

    # ---- one poll ------------------------------------------------------------------------
    def _submit(self, device_id: str, target: PollTarget) -> None:
        """Hand one poll to the pool; its result comes back through ``collect``."""
        if self._pool is None:
            return
        self._in_flight.add(device_id)
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
            self._in_flight.discard(device_id)
            self.polls += 1
            self.poll_seconds += elapsed
            self.last_poll_s = elapsed
            if failure:
                self.errors[failure] += 1
                previous = self._pending.get(device_id) or self.service.live.get(device_id)
                live = unreachable(previous, failure)
                failures = self._failures.get(device_id, 0) + 1
                self._failures[device_id] = failures
                if failures == 1:
                    rec = self.service.table.get(device_id)
                    self._heard[device_id] = rec.last_seen if rec is not None else 0.0
                    LOG.info(
                        "device not answering",
                        extra={"device": device_id, "reason": failure, "detail": detail[:200]},
                    )
            else:
                failures = 0
                self._failures.pop(device_id, None)
                self._heard.pop(device_id, None)
            if device_id not in self._targets or live is None:
                continue
            self._pending[device_id] = live
            if not self._urgent:
                self._urgent = self._matters(device_id, live)
            self._due[device_id] = self._clock() + next_delay(
                failures, self.cfg.interval, self.cfg.max_backoff, self._rand(), self.cfg.jitter
            )

    def _matters(self, device_id: str, live: Live) -> bool:
        """Return whether a result changes what can be answered, or where the device is."""
        rec = self.service.table.get(device_id)
        if rec is None:
            return False
        new = overlay(rec.device, live)
        old = rec.device
        return (new.available, new.geo, new.location_text, new.uuid) != (
            old.available,
            old.geo,
            old.location_text,
            old.uuid,
        )

    def apply_pending(self) -> None:
        """Hand the poll results gathered since the last batch to the service."""
        pending, self._pending = self._pending, {}
        self._urgent = False
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
            "in_flight": len(self._in_flight),
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


class _Conn:
    """A socket read through a buffer, every read bounded by a deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
        self.buf += chunk

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n", 0, MAX_LINE + 1)
            if end >= 0:
                out = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return out
            if len(self.buf) > MAX_LINE:
                raise PollFailure("http-error", f"a header line longer than {MAX_LINE} bytes")
            if self.eof:
                raise PollFailure("http-error", "connection closed in the headers")
            self._fill()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise PollFailure("http-error", "connection closed in the body")
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self, limit: int) -> bytes:
        while not self.eof:
            if len(self.buf) > limit:
                raise PollFailure("too-large", f"more than {limit} bytes")
            self._fill()
        if len(self.buf) > limit:
            raise PollFailure("too-large", f"more than {limit} bytes")
        return bytes(self.buf)


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
    # A minimal HTTP/1.1 client: one request per connection, Content-Length, chunked or
    # close-delimited replies, every read bounded in size and by the deadline.
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    # An IPv6 zone is written %25 in a URI (RFC 6874) and % to the resolver.
    host = (parts.hostname or "").replace("%25", "%")
    port = parts.port or (443 if secure else 80)
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
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: {USER_AGENT}\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n"
        )
        if body is not None:
            head += f"Content-Type: application/ipp\r\nContent-Length: {len(body)}\r\n"
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(head.encode("latin-1") + b"\r\n" + (body or b""))
        conn = _Conn(sock, deadline)
        status, headers = _read_head(conn)
        while status == 100:
            status, headers = _read_head(conn)
        if status != 200:
            raise PollFailure("http-error", f"HTTP {status}")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return _read_chunked(conn, limit)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if length < 0 or length > limit:
                raise PollFailure("too-large", f"{length} bytes announced")
            return conn.exactly(length)
        return conn.rest(limit)
    finally:
        open_sockets.discard(sock)
        sock.close()


def _read_head(conn: _Conn) -> tuple[int, dict[str, str]]:
    """Read a status line and headers; return the status and the headers by lower-case name."""
    line = conn.line()
    fields = line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].isdigit():
        raise PollFailure("http-error", f"not an HTTP/1.x status line: {line[:60]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        raw = conn.line()
        if raw in (b"\r\n", b"\n"):
            return int(fields[1]), headers
        name, sep, value = raw.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    raise PollFailure("http-error", f"more than {MAX_HEADERS} header lines")


def _read_chunked(conn: _Conn, limit: int) -> bytes:
    """Read a chunked body up to ``limit`` bytes."""
    data = bytearray()
    while True:
        size_line = conn.line()
        size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
        if size == 0:
            for _ in range(MAX_HEADERS):
                if conn.line() in (b"\r\n", b"\n"):
                    return bytes(data)
            raise PollFailure("http-error", "endless chunked trailer")
        if len(data) + size > limit:
            raise PollFailure("too-large", f"more than {limit} bytes")
        data += conn.exactly(size)
        conn.exactly(2)


def attach_poller(daemon: Daemon) -> Poller:
    """Register the poller's start, stop and reload hooks with the daemon."""
    poller = Poller(daemon.service, daemon.service.cfg.poller)
    daemon.service.extra_stats["poller"] = poller.stats

    async def start(_: Daemon) -> None:
        await poller.start()

    async def stop(_: Daemon) -> None:
        await poller.stop()

    def reload(d: Daemon) -> None:
        if poller.reconfigure(d.service.cfg.poller):

            async def restart() -> None:
                await poller.stop()
                if poller.cfg.enabled:
                    await poller.start()
                else:
                    poller.forget()

            poller.restarting = asyncio.ensure_future(restart())

    daemon.starters.append(start)
    daemon.stoppers.append(stop)
    daemon.reload_hooks.append(reload)
    return poller
