"""The operators' web view: aiohttp on the daemon's loop, pages from core.webpages, live by SSE.

Read-only. Pages are rendered on the loop from the service's table (a floor's devices
come from a per-floor grouping rebuilt once per table generation, so a page of a
100,000-device map does not scan them all). A watcher notices a new table
generation (or quarantine change) within ``WATCH_PERIOD``, renders the live regions
of every page that has an open event stream, and sends each stream only the regions
that changed; ``live.js`` swaps them in. Nothing here logs a request: a lookup's
address reaches only the location log (op ``admin.locate``), through the service.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any

from aiohttp import web

from nearest_wire import WireError
from nearest_wire.schema import KINDS, MAX_K, check_ip
from nearestd.config import Config, WebConfig
from nearestd.core.devices import Record
from nearestd.core.floorplan import Atlas, cost_parts, floor_marks
from nearestd.core.webpages import (
    Answer,
    floor_page,
    floor_regions,
    index_page,
    lists,
    lists_page,
    locate_page,
    summary,
)
from nearestd.loader import web_token
from nearestd.service import Service

LOG = logging.getLogger("nearestd.web")
WATCH_PERIOD = 0.2
KEEPALIVE = 15.0
MAX_STREAMS = 64
STREAM_QUEUE = 8
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
STATIC = {"web.css": "text/css", "live.js": "text/javascript"}
Floor = tuple[str, str, int]
# A page whose parts are kept live: ("index",), ("devices",) or ("floor", s, b, l, device).
Topic = tuple[Any, ...]


@dataclass(slots=True, eq=False)
class _Stream:
    topic: Topic
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE))


class WebView:
    """The web component: serves the pages and keeps open ones current."""

    name = "web"

    def __init__(
        self, service: Service, cfg: Config, clock: Callable[[], float] = time.time
    ) -> None:
        assert cfg.web is not None
        self.service = service
        self.web: WebConfig = cfg.web
        self.token = web_token(cfg)
        self.clock = clock
        self.address = ""
        self.counters: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._streams: set[_Stream] = set()
        self._last: dict[Topic, dict[str, str]] = {}
        self._seen = ""
        self._floors_gen = -1
        self._floors: dict[Floor, list[Record]] = {}
        self._atlas: tuple[int, Atlas] | None = None
        self._push_cost = 0.0
        self._static = {
            name: (resources.files("nearestd.adapters") / "web_static" / name).read_bytes()
            for name in STATIC
        }

    # ---- component --------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on ``[web] listen`` and start the watcher; OSError if the port is taken."""
        app = web.Application(middlewares=[self._guard], client_max_size=4096)
        app.on_response_prepare.append(self._headers)
        app.router.add_get("/", self._index)
        app.router.add_get("/devices", self._lists)
        app.router.add_get("/floors/{site}/{building}/{level}", self._floor)
        app.router.add_get("/locate", self._locate)
        app.router.add_get("/events/{tail:.*}", self._events)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/favicon.ico", self._no_icon)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.web.listen.host, self.web.listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.address = self.web.listen
        self._watcher = asyncio.ensure_future(self._watch())
        self._watcher.set_name("web-watch")
        LOG.info("web view listening", extra={"listen": self.web.listen})

    async def stop(self) -> None:
        """Close the event streams, the listener and the watcher."""
        for stream in list(self._streams):
            with contextlib.suppress(asyncio.QueueFull):
                stream.queue.put_nowait(None)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None

    def reconfigure(self, cfg: Config) -> None:
        """Take a new token; a new ``listen`` needs a restart (said in the log)."""
        if cfg.web is None:
            LOG.warning("web view: [web] removed; it stops at the next restart")
            return
        if cfg.web.listen != self.web.listen:
            LOG.warning(
                "web view: listen changed; the new address is used after a restart",
                extra={"listen": self.web.listen},
            )
        self.token = web_token(cfg)
        self.web = cfg.web
        self._atlas = None  # the old site map's zones go with it

    def stats(self) -> Mapping[str, Any]:
        """Return requests by outcome and the open event streams."""
        c = self.counters
        return MappingProxyType(
            {
                "requests": c["requests"],
                "unauthorised": c["unauthorised"],
                "events": c["events"],
                "streams_dropped": c["streams_dropped"],
                "streams": len(self._streams),
            }
        )

    # ---- guard ------------------------------------------------------------------------
    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.token is not None and not self._authorised(request.headers.get("Authorization")):
            self.counters["unauthorised"] += 1
            resp: web.StreamResponse = web.Response(
                status=401, text="401: this view needs the bearer token\n"
            )
            resp.headers.add("WWW-Authenticate", 'Bearer realm="nearestd"')
            resp.headers.add("WWW-Authenticate", 'Basic realm="nearestd"')
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                resp = exc
            self.counters["requests"] += 1
        return resp

    @staticmethod
    async def _headers(request: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers.setdefault("Cache-Control", "no-store")

    def _authorised(self, header: str | None) -> bool:
        assert self.token is not None
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        offered = value.strip()
        if scheme.lower() == "basic":
            # A browser's own password prompt: any user name, the token as the password.
            try:
                offered = base64.b64decode(offered, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(offered.encode(), self.token.encode())

    # ---- data -------------------------------------------------------------------------
    def version(self) -> str:
        """Return a value that changes whenever anything a page shows may have changed."""
        t = self.service.table
        return (
            f"{t.generation}.{t.quarantined_total}.{len(t.quarantine)}.{id(self.service.sitemap):x}"
        )

    @property
    def atlas(self) -> Atlas:
        """Return the floors of the current site map (built once per map)."""
        key = id(self.service.sitemap)
        if self._atlas is None or self._atlas[0] != key:
            self._atlas = (key, Atlas.of(self.service.sitemap))
        return self._atlas[1]

    def floor_records(self, floor: Floor) -> list[Record]:
        """Return the records placed on a floor (grouped once per table generation)."""
        table = self.service.table
        if table.generation != self._floors_gen:
            groups: dict[Floor, list[Record]] = {}
            for r in table.records():
                p = r.placement
                if p is not None:
                    groups.setdefault((p.site, p.building, p.level), []).append(r)
            self._floors = groups
            self._floors_gen = table.generation
        return self._floors.get(floor, [])

    def _marks(self, floor: Floor) -> list[Any]:
        svc = self.service
        return floor_marks(
            self.floor_records(floor), svc.table.quarantine.values(), svc.sitemap, *floor
        )

    def regions(self, topic: Topic) -> dict[str, str]:
        """Return the live parts of a page, keyed ``svg:<mark key>`` or ``html:<region>``."""
        svc = self.service
        if topic[0] == "index":
            return {
                "html:summary": summary(
                    self.atlas, svc.table.records(), svc.table.quarantine.values()
                )
            }
        if topic[0] == "devices":
            u, q = lists(svc.table.records(), svc.table.quarantine.values())
            return {"html:unlocated": u, "html:quarantined": q}
        _, site, building, level, device_id = topic
        floor = (site, building, level)
        selected = svc.table.get(device_id) if device_id else None
        return floor_regions(self._marks(floor), self.atlas, *floor, selected, device_id)

    def _floor_of(self, request: web.Request) -> Floor:
        m = request.match_info
        try:
            level = int(m["level"])
        except ValueError:
            raise web.HTTPNotFound(text="404: the level must be an integer\n") from None
        floor = (m["site"], m["building"], level)
        if not self.atlas.floor_zones(*floor):
            raise web.HTTPNotFound(text="404: no zone of the site maps is on that floor\n")
        return floor

    # ---- pages ------------------------------------------------------------------------
    @staticmethod
    def _html(body: str, status: int = 200) -> web.Response:
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")

    async def _index(self, request: web.Request) -> web.Response:
        svc = self.service
        return self._html(
            index_page(
                self.atlas, svc.table.records(), svc.table.quarantine.values(), self.version()
            )
        )

    async def _lists(self, request: web.Request) -> web.Response:
        svc = self.service
        return self._html(
            lists_page(svc.table.records(), svc.table.quarantine.values(), self.version())
        )

    async def _floor(self, request: web.Request) -> web.Response:
        floor = self._floor_of(request)
        device_id = request.query.get("device") or None
        selected = self.service.table.get(device_id) if device_id else None
        html = floor_page(
            self.atlas, *floor, self._marks(floor), selected, device_id, self.version()
        )
        return self._html(html)

    async def _locate(self, request: web.Request) -> web.Response:
        svc = self.service
        q = request.query
        ip, kind, k_text = q.get("ip", "").strip(), q.get("kind", "printer"), q.get("k", "3")
        version = self.version()

        def refuse(message: str, status: int) -> web.Response:
            page = locate_page(self.atlas, ip[:64], kind if kind in KINDS else "printer",
                               3, None, [], [], message, version)  # fmt: skip
            return self._html(page, status)

        if not ip:
            return refuse("Type an address to see where it is placed and what it is answered.", 200)
        if kind not in KINDS:
            return refuse("kind: expected printer or scanner", 400)
        try:
            k = int(k_text)
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_K:
            return refuse(f"k: expected an integer from 1 to {MAX_K}", 400)
        try:
            ip = check_ip(ip, "ip", None)
            zone, hits = svc.explain(ip, kind, k, self.clock())
        except WireError as exc:
            return refuse(exc.message, 400 if str(exc.code) == "bad-request" else 404)
        answers = []
        for rec, hit in hits:
            if rec.placement is not None:
                answers.append(Answer(rec, *cost_parts(hit, rec.placement, zone, svc.ranking)))
        floor = (zone.site, zone.building, zone.level)
        page = locate_page(
            self.atlas, ip, kind, k, zone, answers, self._marks(floor), None, version
        )
        return self._html(page)

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._static[name],
            content_type=STATIC[name],
            charset="utf-8",
            headers={"Cache-Control": "max-age=300"},
        )

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    # ---- live -------------------------------------------------------------------------
    def _topic(self, request: web.Request) -> Topic:
        tail = request.match_info["tail"].strip("/")
        if tail == "":
            return ("index",)
        if tail == "devices":
            return ("devices",)
        parts = tail.split("/")
        if len(parts) == 4 and parts[0] == "floors":
            try:
                floor = (parts[1], parts[2], int(parts[3]))
            except ValueError:
                raise web.HTTPNotFound() from None
            if self.atlas.floor_zones(*floor):
                return ("floor", *floor, request.query.get("device") or None)
        raise web.HTTPNotFound(text="404: no such page to follow\n")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        topic = self._topic(request)
        if len(self._streams) >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text="503: too many open pages\n")
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        stream = _Stream(topic)
        self._streams.add(stream)
        try:
            version = self.version()
            current = self.regions(topic)
            self._last.setdefault(topic, current)
            first = b"retry: 1000\n\n"
            if request.query.get("v") != version:
                # The page is older than the table: send it everything once.
                first += _event(current, {}, version)
            await resp.write(first)
            while True:
                try:
                    msg = await asyncio.wait_for(stream.queue.get(), KEEPALIVE)
                except TimeoutError:
                    msg = b": keepalive\n\n"
                if msg is None:
                    break
                await resp.write(msg)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(stream)
        return resp

    async def _watch(self) -> None:
        while True:
            # Under constant churn every pass regroups the table (about 0.1 s for 100,000
            # devices): wait four times what the last pass cost, so the view takes at most
            # a fifth of the loop while still updating well within a second.
            await asyncio.sleep(max(WATCH_PERIOD, 4 * self._push_cost))
            t0 = time.perf_counter()
            try:
                self._push()
            except Exception:
                LOG.exception("web view: live update failed")
            self._push_cost = time.perf_counter() - t0

    def _push(self) -> None:
        """Send each open stream the regions of its page that changed since the last look."""
        version = self.version()
        if version == self._seen:
            return
        self._seen = version
        topics = {s.topic for s in self._streams}
        for topic in list(self._last):
            if topic not in topics:
                del self._last[topic]
        for topic in topics:
            new = self.regions(topic)
            old = self._last.get(topic, {})
            self._last[topic] = new
            gone = {key: "" for key in old if key not in new}
            changed = {key: v for key, v in new.items() if old.get(key) != v}
            if not changed and not gone:
                continue
            msg = _event(changed, gone, version)
            for stream in [s for s in self._streams if s.topic == topic]:
                try:
                    stream.queue.put_nowait(msg)
                    self.counters["events"] += 1
                except asyncio.QueueFull:
                    # A reader this far behind gets nothing more; its browser reconnects and
                    # is sent the whole page's parts then.
                    self.counters["streams_dropped"] += 1
                    self._streams.discard(stream)
                    with contextlib.suppress(asyncio.QueueEmpty):
                        stream.queue.get_nowait()
                    stream.queue.put_nowait(None)


def _event(changed: Mapping[str, str], gone: Mapping[str, str], version: str) -> bytes:
    svg: dict[str, str] = {}
    html: dict[str, str] = {}
    for key, value in (*changed.items(), *gone.items()):
        kind, _, name = key.partition(":")
        (svg if kind == "svg" else html)[name] = value
    data = json.dumps({"svg": svg, "html": html, "version": version}, separators=(",", ":"))
    return f"event: regions\ndata: {data}\n\n".encode()
