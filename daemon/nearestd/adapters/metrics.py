"""Prometheus metrics: a snapshot built on the event loop, served from the exporter's thread.

At each scrape the exporter thread asks the event loop for a snapshot (plain frozen
tuples, built by ``snapshot_families``) and turns it into metric families; it never
touches the service itself. If the loop does not answer within a second (it is stuck),
the last snapshot is served and ``nearest_metrics_snapshot_age_seconds`` grows.

Adapters add sections through ``Service.extra_stats``: each is a function returning
a map, called on the loop at scrape time. A section that is absent or fails is left
out. Keys of the known sections (discovery, mqtt, poller, security, connections,
operations) are exported as ``SPECS`` says; any other key of a section ``S`` by these
rules:

* a boolean or number ``K`` becomes ``nearest_S_K``: a counter if ``K`` ends in
  ``_total`` or is one of ``COUNTER_KEYS``, else a gauge;
* a map ``K`` of label value to number becomes ``nearest_S_K{LABEL=...}``, the label
  named by ``LABELS`` (``by_X`` keys are labelled ``X``), counters by the same rule;
* a map ``by_X`` of label value to a map of numbers becomes one family per inner key.

Label values must look like names (a letter first, no ``:``, no long hex run), so an
address or a pseudonym can never become one; other values are folded into ``other``.
No label carries an IP address, pseudonym, URI or device id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import platform
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from nearestd import __version__

if TYPE_CHECKING:
    from nearestd.app import Daemon

LOG = logging.getLogger("nearestd.metrics")
SNAPSHOT_TIMEOUT = 1.0
MAX_LABEL_VALUES = 64
MAX_EXTRA_FAMILIES = 128
SAFE_VALUE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,47}")
HEX_RUN = re.compile(r"[0-9A-Fa-f]{12,}")  # a hash or pseudonym
LABEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
SAFE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
COUNTER_KEYS = frozenset(
    (
        "added",
        "dropped",
        "errors",
        "events",
        "expired",
        "failures",
        "malformed",
        "messages",
        "polls",
        "published",
        "purged",
        "queries",
        "received",
        "reconnects",
        "refused",
        "rejected",
        "removed",
        "sent",
        "updated",
    )
)
LABELS = {"events": "event", "errors": "error", "refused": "reason", "dropped": "reason"}


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as plain data: built on the loop, read by the exporter thread.

    ``samples`` hold (label values, value); for a histogram the value is
    (cumulative (upper bound, count) pairs, sum).
    """

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    samples: tuple[tuple[tuple[str, ...], Any], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every family at one moment, and when that moment was."""

    taken: float
    families: tuple[Family, ...]


def label_value(value: Any) -> str:
    """Return a value fit to be a label, or ``other`` (addresses never pass)."""
    text = str(value)
    return text if SAFE_VALUE.fullmatch(text) and not HEX_RUN.search(text) else "other"


def _name(text: str) -> str | None:
    name = re.sub(r"[^a-z0-9_]+", "_", str(text).lower()).strip("_")
    return name if SAFE_NAME.fullmatch(name) else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _counter_key(key: str) -> tuple[str, bool]:
    """Return (base name, is counter) for an extra-stats key."""
    if key.endswith("_total"):
        return key[: -len("_total")], True
    return key, key in COUNTER_KEYS or key.split("_")[-1] in COUNTER_KEYS


def _labelled(items: Mapping[Any, Any]) -> list[tuple[str, float]]:
    """Return (label value, number) pairs, unsafe or surplus values folded into ``other``."""
    out: dict[str, float] = {}
    for raw, value in items.items():
        n = _num(value)
        if n is None:
            continue
        label = label_value(raw)
        if label not in out and len(out) >= MAX_LABEL_VALUES:
            label = "other"
        out[label] = out.get(label, 0.0) + n
    return sorted(out.items())


@dataclass(frozen=True, slots=True)
class Spec:
    """How one key of a known ``extra_stats`` section is exported.

    ``kind`` is counter or gauge; "flag" exports 1 for a truthy value (an error text, say)
    and 0 otherwise; "skip" drops the key.
    """

    name: str
    kind: str
    help: str
    label: str = ""


_SKIP = Spec("", "skip", "")
SPECS: dict[str, dict[str, Spec]] = {
    "discovery": {
        "running": Spec(
            "nearest_discovery_browser_running", "gauge", "Whether the mDNS browsers are running."
        ),
        "error": Spec(
            "nearest_discovery_browser_failed",
            "flag",
            "Whether the mDNS browsers failed to start or stopped on an error.",
        ),
        "interfaces": _SKIP,
        "services": Spec(
            "nearest_discovery_services", "gauge", "DNS-SD service instances currently seen."
        ),
        "devices": Spec(
            "nearest_discovery_devices", "gauge", "Devices currently known from mDNS discovery."
        ),
        "events": Spec(
            "nearest_discovery_events", "counter", "mDNS browser events, by event.", "event"
        ),
        "txt_problems": Spec(
            "nearest_discovery_txt_problems",
            "counter",
            "Problems found in advertised TXT records, by problem.",
            "problem",
        ),
        "refused_over_max_devices": Spec(
            "nearest_discovery_refused_over_max_devices",
            "counter",
            "Announcements refused because the discovered-device cap was reached.",
        ),
    },
    "mqtt": {
        "connected": Spec(
            "nearest_mqtt_connected", "gauge", "Whether the MQTT client is connected to the broker."
        ),
        "reconnects": Spec(
            "nearest_mqtt_reconnects", "counter", "Reconnections to the MQTT broker."
        ),
        "received": Spec(
            "nearest_mqtt_requests_received", "counter", "Requests received on the query topic."
        ),
        "replied": Spec("nearest_mqtt_replies", "counter", "Replies published to requests."),
        "malformed": Spec(
            "nearest_mqtt_requests_malformed", "counter", "Malformed requests on the query topic."
        ),
        "unanswerable": Spec(
            "nearest_mqtt_requests_unanswerable",
            "counter",
            "Requests that could not be answered (no usable response topic).",
        ),
        "records_published": Spec(
            "nearest_mqtt_device_records_published", "counter", "Retained device records published."
        ),
        "records_cleared": Spec(
            "nearest_mqtt_device_records_cleared", "counter", "Retained device records cleared."
        ),
        "federated_devices": Spec(
            "nearest_mqtt_federated_devices", "gauge", "Devices served from other instances."
        ),
        "federated_refused": Spec(
            "nearest_mqtt_federated_records_refused",
            "counter",
            "Device records from other instances refused (invalid, or over the cap).",
        ),
        "federation_conflicts": Spec(
            "nearest_mqtt_federation_conflicts",
            "counter",
            "Device records claimed by more than one instance.",
        ),
        "origins_online": Spec(
            "nearest_mqtt_federation_origins_online", "gauge", "Other instances seen online."
        ),
    },
    "security": {
        "requests_refused": Spec(
            "nearest_security_requests_refused",
            "counter",
            "Requests refused (forbidden), by interface.",
            "interface",
        ),
        "requests_rate_limited": Spec(
            "nearest_security_requests_rate_limited",
            "counter",
            "Requests refused by the rate limiter, by interface.",
            "interface",
        ),
        "requests_malformed": Spec(
            "nearest_security_requests_malformed",
            "counter",
            "Malformed requests (bad request, version or size), by interface.",
            "interface",
        ),
        "devices_quarantined": Spec(
            "nearest_security_devices_quarantined", "gauge", "Devices held in quarantine now."
        ),
        "devices_quarantined_total": Spec(
            "nearest_security_quarantines", "counter", "Devices ever put in quarantine."
        ),
        "rate_limiter_clients": Spec(
            "nearest_security_rate_limiter_clients",
            "gauge",
            "Client addresses tracked by the rate limiter.",
        ),
        "rate_limiter_evicted": Spec(
            "nearest_security_rate_limiter_evicted",
            "counter",
            "Client addresses evicted from the rate limiter's table.",
        ),
        "pseudonym_spikes": Spec(
            "nearest_security_pseudonym_spikes",
            "counter",
            "Times one client asked more often than the spike threshold.",
        ),
    },
    "poller": {
        "enabled": Spec("nearest_poller_enabled", "gauge", "Whether IPP/eSCL polling runs."),
        "devices_polled": Spec("nearest_poller_devices", "gauge", "Devices being polled."),
        "devices_by_state": _SKIP,  # nearest_devices{kind,state} has them
        "devices_unreachable": Spec(
            "nearest_poller_devices_unreachable", "gauge", "Polled devices that do not answer."
        ),
        "in_flight": Spec("nearest_poller_in_flight", "gauge", "Polls under way."),
        "polls_total": Spec("nearest_poller_polls", "counter", "Polls made."),
        "poll_errors_total": Spec(
            "nearest_poller_errors", "counter", "Failed polls, by kind of error.", "error"
        ),
        "poll_seconds_total": Spec(
            "nearest_poller_poll_seconds", "counter", "Time spent polling, in seconds."
        ),
        "state_changes_total": Spec(
            "nearest_poller_state_changes", "counter", "Device state changes found by polling."
        ),
        "supply_levels": _SKIP,  # per device: no device ids in labels
    },
    # Exported above under their own names; this section is for ``nearestctl stats``.
    "operations": {
        key: _SKIP
        for key in (
            "reloads_ok",
            "reloads_failed",
            "last_reload_ok",
            "last_reload",
            "inventory_file",
            "inventory_restored",
            "inventory_writes_ok",
            "inventory_writes_failed",
            "inventory_last_write",
            "stale_expired",
            "systemd_notify",
            "metrics",
        )
    },
    # The socket counters are exported from the socket servers directly (see below).
    "connections": {
        "open": _SKIP,
        "refused_at_cap": _SKIP,
        "closed_idle": _SKIP,
        "closed_slow": _SKIP,
        "frames_too_large": _SKIP,
        "fds": _SKIP,
        "tasks": Spec("nearest_event_loop_tasks", "gauge", "Tasks on the daemon's event loop."),
    },
}


def _spec_for(section: str, prefix: str, raw_key: Any, value: Any) -> Spec | None:
    """Return the export rule of one key: the section's table, else the generic rules."""
    known = SPECS.get(section, {}).get(str(raw_key))
    if known is not None:
        return known
    key = _name(raw_key)
    if key is None:
        return None
    base, counter = _counter_key(key)
    kind = "counter" if counter else "gauge"
    if isinstance(value, Mapping):
        label = key[3:] if key.startswith("by_") else LABELS.get(key, "type")
        if not LABEL_NAME.fullmatch(label):
            label = "type"
        return Spec(f"nearest_{prefix}_{base}", kind, f"{section} {raw_key} by {label}", label)
    return Spec(f"nearest_{prefix}_{base}", kind, f"{section} {raw_key}")


def extra_families(section: str, data: Any) -> list[Family]:
    """Return the families of one ``extra_stats`` section, by the rules in the module doc."""
    prefix = _name(section)
    if prefix is None or not isinstance(data, Mapping):
        return []
    out: list[Family] = []
    for raw_key, value in data.items():
        spec = _spec_for(section, prefix, raw_key, value)
        if spec is None or spec.kind == "skip":
            continue
        if spec.kind == "flag":
            out.append(Family(spec.name, "gauge", spec.help, (), (((), float(bool(value))),)))
            continue
        n = _num(value)
        if n is not None and not spec.label:
            out.append(Family(spec.name, spec.kind, spec.help, (), (((), n),)))
            continue
        if not isinstance(value, Mapping) or not spec.label:
            continue
        nested = [v for v in value.values() if isinstance(v, Mapping)]
        if nested and str(raw_key).startswith("by_"):
            inner: dict[str, dict[str, Any]] = {}
            for outer, sub in value.items():
                if isinstance(sub, Mapping):
                    for ik, iv in sub.items():
                        iname = _name(ik)
                        if iname is not None:
                            inner.setdefault(iname, {})[outer] = iv
            for iname, by_label in sorted(inner.items()):
                ibase, icounter = _counter_key(iname)
                out.append(
                    Family(
                        f"nearest_{prefix}_{ibase}",
                        "counter" if icounter else "gauge",
                        f"{section} {iname} by {spec.label}",
                        (spec.label,),
                        tuple(((lv,), v) for lv, v in _labelled(by_label)),
                    )
                )
            continue
        out.append(
            Family(
                spec.name,
                spec.kind,
                spec.help,
                (spec.label,),
                tuple(((lv,), v) for lv, v in _labelled(value)),
            )
        )
    return out


def snapshot_families(daemon: Daemon, now: float) -> tuple[Family, ...]:
    """Return every family, read from the daemon; call on the event loop only."""
    service = daemon.service
    stats = service.stats
    fams: list[Family] = [
        Family(
            "nearest_build_info",
            "gauge",
            "Version of nearestd and of the Python running it.",
            ("version", "python_version"),
            (((__version__, platform.python_version()), 1.0),),
        ),
        Family(
            "nearest_start_time_seconds",
            "gauge",
            "When the daemon started, seconds since the epoch.",
            (),
            (((), stats.started),),
        ),
        Family(
            "nearest_queries",
            "counter",
            "Requests answered, by interface, op and result (ok or an error code).",
            ("interface", "op", "result"),
            tuple(
                ((label_value(i), label_value(o), label_value(r)), float(n))
                for (i, o, r), n in sorted(stats.queries.items())
            ),
        ),
        Family(
            "nearest_query_duration_seconds",
            "histogram",
            "Time to decode, answer and encode one request, by interface.",
            ("interface",),
            tuple(
                ((label_value(i),), (h.cumulative(), h.total))
                for i, h in sorted(stats.latency.by_interface.items())
            ),
        ),
    ]
    by_kind_state: Counter[tuple[str, str]] = Counter()
    by_site: Counter[tuple[str, str]] = Counter()
    unlocated: Counter[str] = Counter()
    for rec in service.table.records():
        kind = str(rec.device.kind)
        state = "stale" if rec.device.stale else str(rec.device.state)
        by_kind_state[(kind, state)] += 1
        if rec.placement is None:
            unlocated[kind] += 1
        else:
            by_site[(rec.placement.site, kind)] += 1
    zones_by_site: Counter[str] = Counter(z.site for z in service.sitemap.zones.values())
    kinds = ("printer", "scanner")
    fams += [
        Family(
            "nearest_devices",
            "gauge",
            "Known devices by kind and state (stale: restored, not yet rediscovered).",
            ("kind", "state"),
            tuple(((k, s), float(n)) for (k, s), n in sorted(by_kind_state.items())),
        ),
        Family(
            "nearest_devices_unlocated",
            "gauge",
            "Devices no rule could place: listed, never answered as nearest.",
            ("kind",),
            tuple(((k,), float(unlocated[k])) for k in kinds),
        ),
        Family(
            "nearest_site_devices",
            "gauge",
            "Located devices per site and kind.",
            ("site", "kind"),
            tuple(((label_value(s), k), float(n)) for (s, k), n in sorted(by_site.items())),
        ),
        Family(
            "nearest_site_zones",
            "gauge",
            "Zones per site in the loaded site maps.",
            ("site",),
            tuple(((label_value(s),), float(n)) for s, n in sorted(zones_by_site.items())),
        ),
        Family(
            "nearest_subnet_prefixes",
            "gauge",
            "Subnet prefixes that locate clients.",
            (),
            (((), float(len(service.sitemap.prefixes))),),
        ),
        Family(
            "nearest_location_log_entries",
            "gauge",
            "Entries held in the in-memory location log.",
            (),
            (((), float(len(service.log))),),
        ),
        Family(
            "nearest_location_log_purged",
            "counter",
            "Location-log entries purged at the end of their retention.",
            (),
            (((), float(service.log.purged)),),
        ),
        Family(
            "nearest_location_log_dropped",
            "counter",
            "Location-log entries dropped because the log was full.",
            (),
            (((), float(service.log.dropped)),),
        ),
        Family(
            "nearest_config_reloads",
            "counter",
            "Reloads of the configuration and site maps, by result.",
            ("result",),
            (
                (("success",), float(daemon.reloads_ok)),
                (("failure",), float(daemon.reloads_failed)),
            ),
        ),
        Family(
            "nearest_config_last_reload_successful",
            "gauge",
            "Whether the last reload succeeded (1 before any reload).",
            (),
            (((), float(getattr(daemon, "last_reload_ok", True))),),
        ),
        Family(
            "nearest_config_last_reload_success_timestamp_seconds",
            "gauge",
            "When the configuration in use was loaded, seconds since the epoch.",
            (),
            (((), daemon.last_reload or stats.started),),
        ),
        Family(
            "nearest_discovery_enabled",
            "gauge",
            "Whether mDNS discovery is enabled in the configuration.",
            (),
            (((), float(service.cfg.discovery.enabled)),),
        ),
        Family(
            "nearest_mqtt_enabled",
            "gauge",
            "Whether an [mqtt] section configures MQTT (its state: nearest_mqtt_connected).",
            (),
            (((), float(service.cfg.mqtt is not None)),),
        ),
    ]
    conns = daemon.sockets.conns
    fams += [
        Family(
            "nearest_connections_open",
            "gauge",
            "Open client connections over every socket.",
            (),
            (((), float(len(conns.open))),),
        ),
        Family(
            "nearest_connections_refused",
            "counter",
            "Connections refused because the connection cap was reached.",
            (),
            (((), float(conns.refused)),),
        ),
        Family(
            "nearest_connections_closed",
            "counter",
            "Connections closed by the daemon, by reason.",
            ("reason",),
            ((("idle",), float(conns.closed_idle)), (("slow_frame",), float(conns.closed_slow))),
        ),
        Family(
            "nearest_frames_too_large",
            "counter",
            "Frames refused for announcing more than the frame limit.",
            (),
            (((), float(conns.too_large)),),
        ),
    ]
    snaps = getattr(daemon, "snapshots", None)
    if snaps is not None:
        fams += [
            Family(
                "nearest_inventory_snapshot_writes",
                "counter",
                "Writes of the warm-restart inventory snapshot, by result.",
                ("result",),
                (
                    (("success",), float(snaps.writes_ok)),
                    (("failure",), float(snaps.writes_failed)),
                ),
            ),
            Family(
                "nearest_inventory_restored_devices",
                "gauge",
                "Devices restored (as stale) from the snapshot at start.",
                (),
                (((), float(snaps.restored)),),
            ),
            Family(
                "nearest_inventory_stale_expired",
                "counter",
                "Restored devices dropped because discovery did not confirm them in time.",
                (),
                (((), float(snaps.expired)),),
            ),
        ]
    fams.append(supply_family(service.table.records()))
    taken = {f.name for f in fams}
    extras = 0
    for section, fn in list(service.extra_stats.items()):
        try:
            data = fn()
        except Exception:
            LOG.exception("metrics section failed", extra={"section": section})
            continue
        for fam in extra_families(section, data):
            if fam.name in taken or extras >= MAX_EXTRA_FAMILIES:
                continue
            taken.add(fam.name)
            fams.append(fam)
            extras += 1
    return tuple(fams)


DEVICE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
IPV4_RUN = re.compile(r"\d{1,3}(?:[.\-_]\d{1,3}){3}")
MAX_SUPPLY_SERIES = 2000
MAX_SUPPLIES_PER_DEVICE = 16
MAX_SUPPLY_NAME = 64


def device_label(device_id: str) -> str:
    """Return a device id fit to be a label, or ``other`` (an id that holds an address)."""
    if DEVICE_LABEL.fullmatch(device_id) and not IPV4_RUN.search(device_id):
        return device_id
    return "other"


def supply_label(name: str) -> str:
    """Return a supply's name as the device reports it (as stats show it), or ``other``.

    Label values may hold any text (the exposition format escapes what it must), so the
    name is not rewritten; one too long, with control characters, or holding what could
    be an address or a hash is folded into ``other``.
    """
    if (
        0 < len(name) <= MAX_SUPPLY_NAME
        and name.isprintable()
        and not IPV4_RUN.search(name)
        and not HEX_RUN.search(name)
        and name.count(":") < 2
    ):
        return name
    return "other"


def supply_family(records: Any) -> Family:
    """Return supply levels per device id and supply: bounded by the device count."""
    samples: dict[tuple[str, str], float] = {}
    for rec in records:
        supplies = getattr(rec.device, "supplies", ())
        if not supplies:
            continue
        dev = device_label(rec.device.id)
        if dev == "other":
            continue
        for supply in supplies[:MAX_SUPPLIES_PER_DEVICE]:
            if supply.level is None or len(samples) >= MAX_SUPPLY_SERIES:
                continue
            name = supply_label(supply.name)
            samples.setdefault((dev, name), float(supply.level))
    return Family(
        "nearest_device_supply_level_percent",
        "gauge",
        "Supply level a polled device reports, in percent, by device id and supply name "
        f"(at most {MAX_SUPPLY_SERIES} series).",
        ("device", "supply"),
        tuple(sorted(samples.items())),
    )


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def to_metric(fam: Family) -> Metric:
    """Return the prometheus-client family of a plain one."""
    labels = list(fam.labels)
    if fam.kind == "counter":
        counter = CounterMetricFamily(fam.name, fam.help, labels=labels)
        for values, v in fam.samples:
            counter.add_metric(list(values), v)
        return counter
    if fam.kind == "histogram":
        hist = HistogramMetricFamily(fam.name, fam.help, labels=labels)
        for values, (buckets, total) in fam.samples:
            hist.add_metric(list(values), [(_le(b), float(n)) for b, n in buckets], total)
        return hist
    gauge = GaugeMetricFamily(fam.name, fam.help, labels=labels)
    for values, v in fam.samples:
        gauge.add_metric(list(values), v)
    return gauge


class SnapshotCollector:
    """A prometheus-client collector that serves snapshots fetched from the event loop."""

    def __init__(
        self,
        build: Callable[[], Snapshot],
        loop: asyncio.AbstractEventLoop,
        timeout: float = SNAPSHOT_TIMEOUT,
    ) -> None:
        self._build = build
        self._loop = loop
        self._timeout = timeout
        self._lock = threading.Lock()
        self._last = Snapshot(0.0, ())
        self.fallbacks = 0

    def latest(self) -> Snapshot:
        """Return a fresh snapshot from the loop, or the last one if the loop is stuck."""
        fut: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def fill() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._build())
                except Exception as exc:
                    fut.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(fill)
            snap = fut.result(self._timeout)
        except Exception:
            fut.cancel()
            with self._lock:
                self.fallbacks += 1
                return self._last
        with self._lock:
            self._last = snap
        return snap

    def collect(self) -> Iterator[Metric]:
        """Yield every family of the latest snapshot."""
        snap = self.latest()
        for fam in snap.families:
            try:
                metric = to_metric(fam)
            except (ValueError, TypeError):
                # One bad family (say, an adapter's odd name) must not fail the whole page.
                LOG.exception("metric family skipped", extra={"family": fam.name})
                continue
            yield metric
        age = GaugeMetricFamily(
            "nearest_metrics_snapshot_age_seconds",
            "Age of the snapshot served; grows while the event loop is stuck.",
        )
        age.add_metric([], max(0.0, time.time() - snap.taken) if snap.taken else math.nan)
        yield age
        fallbacks = CounterMetricFamily(
            "nearest_metrics_snapshot_fallbacks",
            "Scrapes served an older snapshot because the event loop did not answer in time.",
        )
        fallbacks.add_metric([], float(self.fallbacks))
        yield fallbacks


def split_listen(listen: str) -> tuple[str, int]:
    """Return (host, port) of a ``HOST:PORT`` or ``[V6]:PORT`` listen value."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsExporter:
    """The HTTP endpoint on ``[metrics] listen``, with a registry of its own."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry()
        self.address = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.collector: SnapshotCollector | None = None
        self._listen = daemon.service.cfg.metrics.listen
        daemon.reload_hooks.append(self._on_reload)
        daemon.service.extra_stats["operations"] = self.operations_view

    def operations_view(self) -> dict[str, Any]:
        """Return reload, snapshot and supervision figures for ``nearestctl stats``."""
        d = self.daemon
        snaps = d.snapshots
        return {
            "reloads_ok": d.reloads_ok,
            "reloads_failed": d.reloads_failed,
            "last_reload_ok": d.last_reload_ok,
            "last_reload": d.last_reload or d.service.stats.started,
            "inventory_file": str(snaps.path),
            "inventory_restored": snaps.restored,
            "inventory_writes_ok": snaps.writes_ok,
            "inventory_writes_failed": snaps.writes_failed,
            "inventory_last_write": snaps.last_write,
            "stale_expired": snaps.expired,
            "systemd_notify": d.notifier.enabled,
            "metrics": f"http://{self.address}/metrics" if self.address else "",
        }

    def _on_reload(self, daemon: Daemon) -> None:
        wanted = daemon.service.cfg.metrics.listen
        if wanted != self._listen:
            LOG.warning(
                "metrics listen changed; it takes effect at the next restart",
                extra={"listening": self._listen or "off", "configured": wanted or "off"},
            )

    def build(self) -> Snapshot:
        """Return a snapshot of the daemon now (event loop only)."""
        now = time.time()
        return Snapshot(now, snapshot_families(self.daemon, now))

    async def start(self) -> None:
        """Bind ``[metrics] listen`` and serve from a thread; nothing when it is empty."""
        listen = self._listen
        if not listen:
            return
        host, port = split_listen(listen)
        self.collector = SnapshotCollector(self.build, asyncio.get_running_loop())
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        thread.name = "metrics-http"
        bound = [str(part) for part in server.server_address]
        self.address = (
            f"[{bound[0]}]:{bound[1]}" if ":" in str(bound[0]) else f"{bound[0]}:{bound[1]}"
        )
        LOG.info("metrics listening", extra={"listen": f"http://{self.address}/metrics"})

    async def stop(self) -> None:
        """Stop the HTTP server (waits for its thread's poll, at most half a second)."""
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
