"""MQTT: queries from applications, the retained device inventory, federation between daemons.

Theory of operation. One background task keeps one connection to the broker (MQTT 5,
clean start, a stable client id ``nearestd-<instance>``, will = retained ``offline``
on ``P/status/<instance>``). Every connection, first or after a loss, runs the same
steps: subscribe at QoS 1 to ``P/query``, ``P/query/<instance>``, ``P/devices/+`` and
``P/sync/<instance>`` (plus ``P/status/+`` with federation); publish a marker on the
sync topic, which comes back after every retained record the broker replays; clear
the retained records this instance published in an earlier life for devices it no
longer has; republish the whole inventory; and only then publish retained ``online``.
A requester that waits for ``online`` therefore loses no answers: the subscription is
in place before it. Requests sent while the daemon is disconnected are not queued
for it (clean start): requesters time out and retry, as request/response over MQTT
expects. A loss of the broker leads to reconnection with capped exponential backoff
and jitter; the sockets keep serving meanwhile, and each change of state is logged once.

MQTT clients are authenticated and authorised by the broker, so a request over MQTT is
trusted to name ``client_ip`` or ``zone`` (it must: the broker hides who asks).
With federation the query subscription is shared (``$share/nearestd/P/query``), so a
federation answers each query once; ``P/query/<instance>`` addresses one daemon.

Fair shares. The broker does not say which client published a request, so an *asker*
is known by where it wants the answer: the MQTT 5 Response Topic, else the 3.1.1
``reply_to``. Each asker has a token bucket (``[mqtt] rate``, ``burst``); a request over
it is dropped as it is read from the socket, before it is queued, and counted (no
reply: a rate-limited answer per request would let a flood double itself through the
broker; MQTT requesters time out and retry). Requests waiting to be answered are
bounded by ``max_queued``; beyond it they are dropped and counted too, so a flood
costs neither memory nor everyone else's answers. Half of that bound is kept for askers
answered recently (the last 4,096): a flood naming a fresh reply topic per request gets
a new bucket each time and so evades the rate, but it cannot crowd those askers out.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from nearest_wire import ErrorCode, WireError, error_reply
from nearest_wire.schema import request_id
from nearestd.adapters.component import Spawn, spawn_task
from nearestd.config import Config, MqttConfig
from nearestd.core import federation as fed
from nearestd.core.devices import Record
from nearestd.core.federation import Change, Federation, Inventory, RecordError
from nearestd.core.limits import RateLimiter, RecentKeys
from nearestd.core.mqtt_payload import (
    JSON,
    MSGPACK,
    TRANSPORT_KEYS,
    ReplyRoute,
    decode_request,
    encode_reply,
    malformed_code,
    route_v5,
    route_v311,
    topic_error,
)
from nearestd.service import Peer, Service

LOG = logging.getLogger("nearestd.mqtt")
CLIENT_LOG = logging.getLogger("nearestd.mqtt.client")


class _OncePerMinute(logging.Filter):
    """Let each distinct library message through at most once a minute (no log floods)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < 60.0:
            return False
        if len(self._last) > 256:
            self._last.clear()
        self._last[key] = now
        return True


CLIENT_LOG.addFilter(_OncePerMinute())
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
BACKOFF_REFUSED_MAX = 30.0
CONNECT_TIMEOUT = 5.0
SYNC_TIMEOUT = 3.0
PUBLISH_TIMEOUT = 5.0
STOP_TIMEOUT = 2.5  # within the daemon's shutdown grace
INVENTORY_PERIOD = 0.25
PUBLISH_BATCH = 256
MAX_REPLY_TASKS = 1024
# The longest the handling of incoming MQTT messages holds the loop before yielding.
RECORD_SLICE = 0.002
MAX_QUEUED = 20000  # every incoming message (records, status); requests have their own bound
MAX_ASKERS = 4096  # rate buckets held at most (LRU; see core.limits)
SHARE_GROUP = "nearestd"
# MQTT 5 CONNACK reason codes (and 3.1.1 return codes 4, 5) that mean "your credentials".
CREDENTIAL_CODES = frozenset({4, 5, 134, 135, 140})
SESSION_TAKEN_OVER = 142
RIVAL_SESSION = 30.0


class BrokerError(Exception):
    """The broker could not be used; ``kind`` is one of the logged states."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def _code_of(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    if rc is None:
        return None
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


def translate(exc: BaseException, connected: bool) -> BrokerError:
    """Turn an aiomqtt/paho/OS error into a BrokerError naming what went wrong."""
    if isinstance(exc, BrokerError):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MqttConnectError):
        code = _code_of(exc)
        if code in CREDENTIAL_CODES:
            return BrokerError("refused-credentials", text)
        return BrokerError("refused", text)
    cause = exc.__cause__
    if isinstance(exc, aiomqtt.MqttError) and isinstance(cause, aiomqtt.MqttCodeError):
        exc = cause
    if isinstance(exc, aiomqtt.MqttCodeError) and _code_of(exc) == SESSION_TAKEN_OVER:
        return BrokerError("lost", "session taken over")
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE" in text or "SSL" in text:
        return BrokerError("tls", text)
    if connected:
        return BrokerError("lost", text)
    return BrokerError("unreachable", text)


@dataclass(slots=True)
class Counters:
    """What the adapter has done, for ``stats`` and the metrics exporter."""

    connected: bool = False
    connections: int = 0
    received: int = 0
    replied: int = 0
    malformed: int = 0
    unanswerable: int = 0
    records_published: int = 0
    records_cleared: int = 0
    conflicts: int = 0
    internal_errors: int = 0
    rate_limited: int = 0
    dropped: int = 0
    dropped_other: int = 0


class Verdict(enum.Enum):
    """What admission says of a request, before it is queued."""

    REFUSED = "refused"  # over its asker's rate
    KNOWN = "known"  # admitted, from an asker answered recently
    NEW = "new"  # admitted, from an asker not answered recently


class Inbox(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue: admits requests by their asker's rate, bounds them, counts drops.

    aiomqtt puts each message in from paho's read callback, on the event loop, so the
    decision is made before a refused request costs any memory.
    """

    def __init__(
        self,
        request_topics: frozenset[str],
        admit: Callable[[aiomqtt.Message], Verdict],
        max_requests: int,
        max_others: int = 0,
    ) -> None:
        # Unbounded as an asyncio queue; each kind of message has its own bound below.
        super().__init__(0)
        self.max_others = max_others
        self.request_topics = request_topics
        self._admit = admit
        self.max_requests = max_requests
        self.requests = 0
        self.dropped = 0
        self.dropped_other = 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        """Queue a message, or drop it (counted) when over a rate or a bound."""
        if item.topic.value in self.request_topics:
            verdict = self._admit(item)
            if verdict is Verdict.REFUSED:
                return
            limit = self.max_requests if verdict is Verdict.KNOWN else self.max_requests // 2
            if self.requests >= limit:
                self.dropped += 1
                return
            self.requests += 1
        elif self.max_others and self.qsize() - self.requests >= self.max_others:
            self.dropped_other += 1
            return
        super().put_nowait(item)

    def _get(self) -> aiomqtt.Message:
        item: aiomqtt.Message = super()._get()
        if item.topic.value in self.request_topics:
            self.requests -= 1
        return item


class MqttAdapter:
    """Keeps the broker connection, answers queries, publishes and reads the inventory."""

    name = "mqtt"

    def __init__(
        self,
        service: Service,
        cfg: MqttConfig,
        config: Config,
        clock: Callable[[], float] = time.time,
        spawn: Spawn = spawn_task,
    ) -> None:
        self.service = service
        self._spawn = spawn
        self.cfg = cfg
        self.config = config
        self.clock = clock
        self.instance = socket.gethostname() if cfg.instance == "hostname" else cfg.instance
        self.prefix = cfg.topic_prefix
        self.host, self.port, self.tls = cfg.url.host, cfg.url.port, cfg.url.tls
        self.query_topic = f"{self.prefix}/query"
        self.direct_topic = f"{self.prefix}/query/{self.instance}"
        self.devices_prefix = f"{self.prefix}/devices/"
        self.bridge_prefix = f"{self.prefix}/bridge/"
        self.alive_prefix = f"{self.prefix}/alive/"
        self.alive_topic = f"{self.prefix}/alive/{self.instance}"
        self.status_prefix = f"{self.prefix}/status/"
        self.status_topic = f"{self.prefix}/status/{self.instance}"
        # Decode, answer and encode time, in the same histogram family as the sockets.
        self.latency = service.stats.latency.for_interface("mqtt")
        self.sync_topic = f"{self.prefix}/sync/{self.instance}"
        self.peer = Peer("mqtt", None, trusted=True, anonymous=True)
        self.federation = (
            Federation(self.instance, cfg.max_foreign, float(cfg.foreign_grace))
            if cfg.federate
            else None
        )
        self._expiry: asyncio.Task[None] | None = None
        self.inventory = Inventory()
        self.counters = Counters()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self.askers = RateLimiter(cfg.rate, cfg.burst, MAX_ASKERS)
        self.answered = RecentKeys(MAX_ASKERS)
        self._inbox: Inbox | None = None
        self._state: tuple[str, str] = ("", "")
        self._syncing = False
        self._synced = asyncio.Event()
        self._own_retained: dict[str, bytes] = {}
        self._generation = -1
        self._refused_logged: set[str] = set()
        # Tells our own ``online`` from another process's on the same status topic.
        self.session = secrets.token_hex(8)
        self._rival_session: str | None = None
        self._rival = False
        # Built once, in a worker thread: loading the CA store takes about 0.2 s.
        self._tls: ssl.SSLContext | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the connection task; the broker need not be up."""
        self._stopping.clear()
        self._task = self._spawn(self._run(), "mqtt")
        if self.federation is not None:
            self._expiry = self._spawn(self._expire(), "mqtt-expiry")

    async def stop(self) -> None:
        """Publish ``offline``, disconnect cleanly and stop."""
        self._stopping.set()
        expiry, self._expiry = self._expiry, None
        if expiry is not None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for t in list(self._reply_tasks):
            t.cancel()

    def stats(self) -> dict[str, Any]:
        """Return the adapter's figures for ``stats`` and the metrics families."""
        c = self.counters
        return {
            "connected": c.connected,
            "reconnects": max(0, c.connections - 1),
            "received": c.received,
            "replied": c.replied,
            "malformed": c.malformed,
            "unanswerable": c.unanswerable,
            "records_published": c.records_published,
            "records_cleared": c.records_cleared,
            "federated_devices": len(self.federation.served()) if self.federation else 0,
            "federated_refused": self.federation.refused if self.federation else 0,
            "federated_stale": self.federation.stale_count() if self.federation else 0,
            "origins_silent": len(self.federation.silent) if self.federation else 0,
            "federated_expired": self.federation.expired if self.federation else 0,
            "federated_other_site": self.federation.other_site if self.federation else 0,
            "federated_legacy_records": self.federation.legacy if self.federation else 0,
            "federation_conflicts": c.conflicts,
            "origins_online": len(self.federation.origins_online()) if self.federation else 0,
            "internal_errors": c.internal_errors,
            "requests_rate_limited": c.rate_limited,
            "requests_dropped": c.dropped + (self._inbox.dropped if self._inbox else 0),
            "requests_queued": self._inbox.requests if self._inbox else 0,
            "askers": len(self.askers),
            "messages_dropped": c.dropped_other + (self._inbox.dropped_other if self._inbox else 0),
        }

    def _set_state(self, state: str, detail: str = "") -> None:
        """Log a change of connection state once, not once per retry."""
        if self._state == (state, detail):
            return
        self._state = (state, detail)
        extra = {"broker": f"{self.host}:{self.port}", "instance": self.instance}
        if detail:
            extra["detail"] = detail[:200]
        if state == "connected":
            LOG.info("mqtt connected", extra={**extra, "reconnects": self.stats()["reconnects"]})
        elif state == "refused-credentials":
            LOG.error(
                "mqtt broker refused the credentials; check [mqtt] username and password_file",
                extra={**extra, "username": self.cfg.username or "(none)"},
            )
        elif state == "password-file":
            LOG.error("mqtt password_file cannot be read", extra=extra)
        elif state == "lost":
            LOG.warning("mqtt connection lost; reconnecting", extra=extra)
        elif state == "tls":
            LOG.error(
                "mqtt TLS failed; check the broker's certificate and [mqtt] ca_file", extra=extra
            )
        elif state == "stopped":
            LOG.info("mqtt disconnected", extra=extra)
        else:
            LOG.warning(f"mqtt broker {state}; retrying", extra=extra)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            connected_before = self.counters.connections
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = translate(exc, self.counters.connections > connected_before)
                self._set_state(err.kind, _stable_detail(err))
            finally:
                self.counters.connected = False
                self._client = None
                if self.federation is not None:
                    self._apply(self.federation.link_down("broker", self.clock()))
            if self._stopping.is_set():
                break
            # A rival daemon with our client id kicks us off as soon as we are connected: then
            # reset the backoff only after a session that lasted, so the two do not duel at speed.
            lasted = time.monotonic() - started >= RIVAL_SESSION
            if self.counters.connections > connected_before and (not self._rival or lasted):
                attempt = 0
            slow = self._state[0].startswith("refused") or self._rival
            cap = BACKOFF_REFUSED_MAX if slow else BACKOFF_MAX
            delay = min(cap, BACKOFF_MIN * 2**attempt) * random.uniform(0.5, 1.0)
            attempt = min(attempt + 1, 16)
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        self._set_state("stopped")

    def _password(self) -> str | None:
        if not self.cfg.password_file:
            return None
        path = self.config.resolve(self.cfg.password_file)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise BrokerError("password-file", f"{path}: {exc}") from None

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        cafile = str(self.config.resolve(self.cfg.ca_file)) if self.cfg.ca_file else None
        try:
            return ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError("tls", f"cannot load ca_file: {exc}") from None

    def _new_client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
        props.UserProperty = [("session", self.session)]
        will = aiomqtt.Will(self.status_topic, fed.OFFLINE, qos=1, retain=True, properties=props)
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.cfg.username or None,
            password=self._password(),
            identifier=f"nearestd-{self.instance}",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=True,
            keepalive=self.cfg.keepalive,
            timeout=CONNECT_TIMEOUT,
            tls_context=self._tls,
            # Without it a QoS 1 exchange stalls on Nagle + delayed ACK (about 40 ms).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            max_queued_incoming_messages=MAX_QUEUED,
            queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", self._new_inbox),
            logger=CLIENT_LOG,
        )
        # Many publishes in flight are by design here (inventory batches, QoS 1 replies).
        client.pending_calls_threshold = MAX_REPLY_TASKS + PUBLISH_BATCH * 2
        return client

    def _new_inbox(self, maxsize: int = 0) -> Inbox:
        if self._inbox is not None:  # the previous session's drops stay counted
            self.counters.dropped += self._inbox.dropped
            self.counters.dropped_other += self._inbox.dropped_other
        topics = frozenset((self.query_topic, self.direct_topic))
        # Records and statuses are not requests: a retained replay of every foreign device
        # arrives at once on each connection, and a record lost here would not come back
        # until the device changes. Their bound follows the federation's cap instead.
        others = maxsize + 2 * self.cfg.max_foreign if self.federation is not None else maxsize
        self._inbox = Inbox(topics, self._admit, self.cfg.max_queued, others)
        return self._inbox

    def _admit(self, message: aiomqtt.Message) -> Verdict:
        """Say whether a request's asker may ask now (a refusal is counted as rate-limited)."""
        try:
            asker = getattr(message.properties, "ResponseTopic", None)
            if not isinstance(asker, str):
                asker = self._reply_to(message.payload, message.properties)
            known = asker in self.answered
            granted = self.askers.take(asker, 1, self.clock())
        except Exception:
            # Raised inside paho's read callback it would end the session: admit the
            # request instead, and let answering it find what is wrong.
            self.counters.internal_errors += 1
            return Verdict.NEW
        if granted == 1:
            return Verdict.KNOWN if known else Verdict.NEW
        self.counters.rate_limited += 1
        return Verdict.REFUSED

    def _reply_to(self, payload: Any, props: Properties | None) -> str:
        """Return a 3.1.1 request's ``reply_to`` ("" when it names none: those share a bucket)."""
        if not isinstance(payload, bytes):
            return ""
        ctype = getattr(props, "ContentType", None) if props is not None else None
        try:
            obj = decode_request(payload, ctype, self.cfg.max_payload)
        except WireError:
            return ""
        reply_to = obj.get("reply_to")
        return reply_to if isinstance(reply_to, str) else ""

    async def _session(self) -> None:
        if self.tls and self._tls is None:
            self._tls = await asyncio.to_thread(self._tls_context)
        client = self._new_client()
        async with client:
            self._client = client
            self.counters.connections += 1
            receiver = asyncio.create_task(self._receive(client), name="mqtt-receive")
            stopper: asyncio.Task[Any] = asyncio.create_task(
                self._stopping.wait(), name="mqtt-stop"
            )
            keeper: asyncio.Task[None] | None = None
            try:
                announce = asyncio.create_task(self._announce(client), name="mqtt-announce")
                done, _ = await asyncio.wait(
                    {receiver, announce, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                if announce in done:
                    announce.result()
                    keeper = asyncio.create_task(self._keep_inventory(client), name="mqtt-inv")
                    done, _ = await asyncio.wait(
                        {receiver, keeper, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    announce.cancel()
                for task in done:
                    if task is not stopper:
                        task.result()  # raises what ended the session
                if self._stopping.is_set():
                    with contextlib.suppress(Exception):
                        await client.publish(
                            self.status_topic, fed.OFFLINE, qos=1, retain=True, timeout=1.0
                        )
            finally:
                self.counters.connected = False
                tasks: list[asyncio.Task[Any]] = [receiver, stopper]
                if keeper is not None:
                    tasks.append(keeper)
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _announce(self, client: aiomqtt.Client) -> None:
        """Subscribe, sweep our stale records, republish the inventory, then say online."""
        self._syncing = True
        self._synced.clear()
        self._own_retained = {}
        self._rival_session = None
        sites = self._interest()
        if self.federation is not None:
            self.federation.sites = sites
            self.federation.max_devices = self._foreign_cap(sites)
            self.federation.begin_resync()
        query = f"$share/{SHARE_GROUP}/{self.query_topic}" if self.federation else self.query_topic
        opts = SubscribeOptions(qos=1)
        # Our own sites' records only (and the legacy one-level layout, for one version):
        # a daemon, and the bridge in front of it, carry no other site's inventory.
        devices = fed.interest(self.prefix, sites)
        topics: list[tuple[str, SubscribeOptions]] = [
            (self.sync_topic, opts),
            *((t, opts) for t in devices),
            (query, opts),
            (self.direct_topic, opts),
        ]
        # Our own status too: finding another process's ``online`` there reveals a rival.
        status = f"{self.status_prefix}+" if self.federation else self.status_topic
        topics.append((status, opts))
        if self.federation is not None:
            topics.append((f"{self.bridge_prefix}+", opts))
            topics.append((f"{self.alive_prefix}+", SubscribeOptions(qos=0)))
        await client.subscribe(topics, timeout=PUBLISH_TIMEOUT)
        await client.publish(self.sync_topic, b"sync", qos=1, timeout=PUBLISH_TIMEOUT)
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._synced.wait(), SYNC_TIMEOUT)
        self._syncing = False
        if self.federation is not None:
            now = self.clock()
            self._apply(self.federation.end_resync(now))
            self._apply(self.federation.link_up("broker", now))
        else:
            await client.unsubscribe(
                [*devices, self.sync_topic, self.status_topic], timeout=PUBLISH_TIMEOUT
            )
        self._drop_unconfirmed()
        # What the broker still holds from us counts as published: only changes go out, so a
        # reconnection sends no burst across a bridge, and records of devices gone are cleared.
        self.inventory = Inventory(published=dict(self._own_retained))
        self._generation = self.service.table.local_generation
        await self._publish_inventory(client)
        if self._rival_session is not None and not self._rival:
            self._rival = True
            LOG.error(
                "mqtt: another daemon seems to use this instance name (its status was online "
                "when we connected); instance names must be unique",
                extra={"instance": self.instance, "client_id": f"nearestd-{self.instance}"},
            )
        # Connected from here on: a requester may act on ``online`` before its PUBACK is back.
        self.counters.connected = True
        self._set_state("connected")
        online = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        online.UserProperty = [("session", self.session)]
        await client.publish(self.status_topic, fed.ONLINE, qos=1, retain=True, properties=online)

    def _interest(self) -> frozenset[str]:
        """Return the sites whose records this daemon needs: those of its site maps.

        A foreign device can be placed, and so answered, only on a site whose map this
        daemon has; with ``allow_other_sites`` the operator gives it the neighbours' maps.
        """
        return frozenset(self.service.sitemap.projections)

    def _foreign_cap(self, sites: frozenset[str]) -> int:
        """Return the cap on foreign devices: per site served, never above the overall cap."""
        return min(self.cfg.max_foreign, self.cfg.max_foreign_per_site * max(1, len(sites)))

    async def _expire(self) -> None:
        """Drop foreign devices stale for longer than the grace, whether connected or not."""
        assert self.federation is not None
        while True:
            wake = self.federation.next_wakeup()
            delay = 1.0 if wake is None else min(1.0, max(0.05, wake - self.clock()))
            await asyncio.sleep(delay)
            self._apply(self.federation.tick(self.clock()))

    def _public_records(self) -> list[Record]:
        svc = self.service
        return [
            r for r in svc.table.records() if fed.is_local(r.device) and svc.is_public(r.device.id)
        ]

    async def _keep_inventory(self, client: aiomqtt.Client) -> None:
        beat = float(self.cfg.heartbeat)
        payload = f"{beat:g}".encode()
        next_beat = 0.0
        while True:
            if beat > 0 and time.monotonic() >= next_beat:
                # Lets the others tell a silent path from a quiet one (docs/sites.md).
                next_beat = time.monotonic() + beat
                await client.publish(self.alive_topic, payload, qos=0)
            await asyncio.sleep(INVENTORY_PERIOD)
            self.askers.prune(self.clock())
            # Only this daemon's own devices are published, and only their leaving can
            # uncover a shadowed foreign one: a burst of foreign records costs no pass here.
            gen = self.service.table.local_generation
            if gen != self._generation:
                self._generation = gen
                if self.federation is not None:
                    self._restore_shadowed()
                await self._publish_inventory(client)

    async def _publish_inventory(self, client: aiomqtt.Client) -> None:
        changed, gone = self.inventory.diff(self._public_records(), self.instance)
        await self._publish_records(client, changed, gone)
        self.inventory.mark(changed, gone)

    async def _publish_records(
        self, client: aiomqtt.Client, changed: list[tuple[str, bytes]], gone: list[str]
    ) -> None:
        msgs = [(level, payload) for level, payload in changed] + [(level, b"") for level in gone]
        for i in range(0, len(msgs), PUBLISH_BATCH):
            batch = msgs[i : i + PUBLISH_BATCH]
            await asyncio.gather(
                *(
                    client.publish(
                        self.devices_prefix + level,
                        payload,
                        qos=1,
                        retain=True,
                        timeout=PUBLISH_TIMEOUT,
                    )
                    for level, payload in batch
                )
            )
        self.counters.records_published += len(changed)
        self.counters.records_cleared += len(gone)

    # ---- incoming ----------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        query, direct = self.query_topic, self.direct_topic
        slice_end = time.perf_counter() + RECORD_SLICE
        async for message in client.messages:
            # A burst of records (a retained replay, a bridge coming back) is worked through
            # in slices: the queue's get() does not yield while it holds messages, and the
            # sockets' queries must not wait behind thousands of records.
            if time.perf_counter() >= slice_end:
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + RECORD_SLICE
            topic = message.topic.value
            payload = message.payload
            if not isinstance(payload, bytes):
                payload = b"" if payload is None else str(payload).encode()
            try:
                if topic in (query, direct):
                    started = time.perf_counter()
                    out = self.answer(payload, message.properties)
                    self.latency.observe(time.perf_counter() - started)
                    if out is not None:
                        await self._reply(client, out, min(message.qos, 1))
                elif topic.startswith(self.devices_prefix):
                    self._on_record(topic[len(self.devices_prefix) :], payload)
                elif topic.startswith(self.alive_prefix):
                    if self.federation is not None:
                        origin = topic[len(self.alive_prefix) :]
                        self._apply(self.federation.on_heartbeat(origin, payload, self.clock()))
                elif topic.startswith(self.bridge_prefix):
                    self._on_bridge(topic[len(self.bridge_prefix) :], payload)
                elif topic == self.status_topic:
                    self._on_own_status(message)
                elif topic.startswith(self.status_prefix):
                    if self.federation is not None:
                        origin = topic[len(self.status_prefix) :]
                        self._apply(self.federation.on_status(origin, payload, self.clock()))
                elif topic == self.sync_topic:
                    self._synced.set()
            except BrokerError:
                raise
            except Exception:
                # A bug must cost one message, never the subscription.
                self.counters.internal_errors += 1
                if self.counters.internal_errors <= 10:
                    LOG.exception("mqtt message handling failed", extra={"topic": topic[:200]})

    async def _reply(
        self, client: aiomqtt.Client, out: tuple[str, bytes, Properties], qos: int
    ) -> None:
        topic, body, props = out
        if qos == 0:
            try:
                await client.publish(topic, body, qos=0, properties=props)
            except aiomqtt.MqttError as exc:
                raise translate(exc, connected=True) from None
            self.counters.replied += 1
            return
        # A QoS 1 reply waits for the broker's PUBACK: do not hold the next request for it.
        if len(self._reply_tasks) >= MAX_REPLY_TASKS:
            await asyncio.wait(self._reply_tasks, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._publish_reply(client, topic, body, props))
        self._reply_tasks.add(task)
        task.add_done_callback(self._reply_tasks.discard)

    async def _publish_reply(
        self, client: aiomqtt.Client, topic: str, body: bytes, props: Properties
    ) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, body, qos=1, properties=props, timeout=PUBLISH_TIMEOUT)
            self.counters.replied += 1

    def answer(
        self, payload: bytes, props: Properties | None
    ) -> tuple[str, bytes, Properties] | None:
        """Answer one request payload; return (topic, payload, properties) or None if unanswerable."""
        self.counters.received += 1
        ctype = getattr(props, "ContentType", None) if props is not None else None
        rtopic = getattr(props, "ResponseTopic", None) if props is not None else None
        is_msgpack = ctype == MSGPACK
        route: ReplyRoute | None = None
        if rtopic is not None:
            route = route_v5(rtopic, getattr(props, "CorrelationData", None), self.prefix)
            if route is None:
                return self._unanswerable(f"response topic: {topic_error(rtopic, self.prefix)}")
        now = self.clock()
        try:
            obj = decode_request(payload, ctype, self.cfg.max_payload)
        except WireError as exc:
            self.counters.malformed += 1
            self.service.stats.queries[(self.peer.interface, "invalid", str(exc.code))] += 1
            if route is None:
                return self._unanswerable(exc.message)
            reply = error_reply(None, exc.code, exc.message)
        else:
            if route is None:
                route, why = route_v311(obj, self.prefix)
                if route is None:
                    self.counters.malformed += 1
                    self.service.stats.queries[(self.peer.interface, "invalid", "bad-request")] += 1
                    return self._unanswerable(why or "no reply address")
            else:
                why = None
            if why is not None:
                self.counters.malformed += 1
                self.service.stats.queries[(self.peer.interface, "invalid", "bad-request")] += 1
                reply = error_reply(request_id(obj), ErrorCode.BAD_REQUEST, why)
            else:
                answer = self.service.handle(obj, self.peer, now, extra_keys=TRANSPORT_KEYS)
                # Only admin peers get a reply that comes later (reload); MQTT's never is one.
                assert isinstance(answer, dict)
                reply = answer
                if not reply.get("ok") and malformed_code(reply["error"]["code"]):
                    self.counters.malformed += 1
            if route.has_echo:
                reply["correlation"] = route.echo
        self.answered.note(route.topic)
        out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        out.ContentType = MSGPACK if is_msgpack else JSON
        if route.correlation_data is not None:
            out.CorrelationData = route.correlation_data
        return route.topic, encode_reply(reply, is_msgpack), out

    def _unanswerable(self, why: str) -> tuple[str, bytes, Properties] | None:
        self.counters.unanswerable += 1
        LOG.debug("mqtt request without a usable reply address", extra={"detail": why[:200]})
        return None

    def _on_own_status(self, message: aiomqtt.Message) -> None:
        """Notice a rival: on a reconnection, our status must be ours (or gone), not another's.

        Our ``online`` and our will carry this process's session id. When another process
        with the same client id takes the session over, its own will or ``online`` is what
        the broker holds for us when we come back. (On the first connection, another
        session's status is just our previous life's.)
        """
        if not (self._syncing and message.retain) or self.counters.connections < 2:
            return
        pairs = getattr(message.properties, "UserProperty", None) or []
        session = dict(p for p in pairs if isinstance(p, tuple) and len(p) == 2).get("session")
        if session != self.session:
            self._rival_session = str(session)

    def _on_bridge(self, link: str, payload: bytes) -> None:
        """A bridge's notification: ``1`` the link to the hub is up, ``0`` it is down."""
        if self.federation is None or not link or payload not in (b"0", b"1"):
            return
        now = self.clock()
        name = f"bridge:{link}"
        if payload == b"0":
            LOG.warning("mqtt bridge down; foreign devices are stale", extra={"bridge": link[:64]})
            self._apply(self.federation.link_down(name, now))
        else:
            self._apply(self.federation.link_up(name, now))

    def _on_record(self, level: str, payload: bytes) -> None:
        if self._syncing and payload and self._is_own(payload):
            self._own_retained[level] = payload
        if self.federation is None:
            return
        try:
            changes = self.federation.on_record(level, payload, self.clock())
        except RecordError as exc:
            if level not in self._refused_logged and len(self._refused_logged) < 1000:
                self._refused_logged.add(level)
                LOG.warning(
                    "federated device record refused",
                    extra={"topic": (self.devices_prefix + level)[:200], "detail": str(exc)},
                )
            return
        self._apply(changes)

    def _is_own(self, payload: bytes) -> bool:
        # Cheap pre-check before parsing: records hold "origin":"<instance>".
        return self.instance.encode() in payload and fed.record_origin(payload) == self.instance

    def _apply(self, changes: list[Change]) -> None:
        now = self.clock()
        table = self.service.table
        for ch in changes:
            rec = table.get(ch.device_id)
            if ch.device is not None:
                if rec is not None and fed.is_local(rec.device):
                    # A local device with the same id wins; the foreign one stays shadowed.
                    self.counters.conflicts += 1
                    continue
                self.service.upsert_device(ch.device, now)
            elif (
                rec is not None
                and rec.device.source == fed.SOURCE
                and rec.device.origin == ch.origin
            ):
                self.service.remove_device(ch.device_id)

    def _drop_unconfirmed(self) -> None:
        """Remove federated devices the broker did not confirm (e.g. restored from a snapshot)."""
        served = {(d.id, d.origin) for d in self.federation.served()} if self.federation else set()
        table = self.service.table
        gone = [
            r.device.id
            for r in table.records()
            if r.device.source == fed.SOURCE and (r.device.id, r.device.origin) not in served
        ]
        for device_id in gone:
            self.service.remove_device(device_id)

    def _restore_shadowed(self) -> None:
        """Serve a foreign device again once the local device that shadowed it is gone."""
        assert self.federation is not None
        table = self.service.table
        missing = [
            Change(d.id, d.origin or "", d)
            for d in self.federation.served()
            if table.get(d.id) is None
        ]
        if missing:
            self._apply(missing)

    def reconfigure(self, cfg: Config) -> None:
        """Warn when a reload changes [mqtt]: the connection keeps its settings until a restart."""
        self.config = cfg
        if cfg.mqtt != self.cfg:
            LOG.warning("mqtt settings changed; they take effect after a restart")


def _stable_detail(err: BrokerError) -> str:
    # Connection-refused texts carry no varying parts; keep the first clause only.
    return err.detail.split(" (", 1)[0][:200]
