"""Prometheus metrics: explicit families read from one snapshot per scrape.

Every family the page can show is one entry of ``FAMILIES``: its name as it appears on
the page (a counter's ends in ``_total``), its type, labels and help text, and the one
function that reads its samples from a ``Readings`` snapshot. ``docs/metrics.md`` is
generated from that list (``make docs``) and the scrape test compares the page with it.

At each scrape the exporter's HTTP thread asks the event loop for a ``Readings`` (plain
frozen values: the census, the service's counters and each component's stats) and turns
it into families; it never touches the service itself. If the loop does not answer
within a second (it is stuck), the last snapshot is served and
``nearest_metrics_snapshot_age_seconds`` grows.

A family that reads a stats section (``discovery``, ``mqtt``, ``poller``, ...) is shown
only while that section exists, so a feature that is off adds no families. Label values
must look like names (a letter first, no ``:``, no long hex run), so an address or a
pseudonym can never become one; other values are folded into ``other``. No label carries
an IP address, pseudonym, URI or client; the one family keyed by device id is the supply
level, whose ids that hold an address are left out.
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
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
from nearestd.core.census import Census

if TYPE_CHECKING:
    from nearestd.config import Config
    from nearestd.service import Service

LOG = logging.getLogger("nearestd.metrics")
SNAPSHOT_TIMEOUT = 1.0
MAX_LABEL_VALUES = 64
MAX_SUPPLY_SERIES = 2000
MAX_SUPPLY_NAME = 64
SAFE_VALUE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,47}")
HEX_RUN = re.compile(r"[0-9A-Fa-f]{12,}")  # a hash or pseudonym
DEVICE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
IPV4_RUN = re.compile(r"\d{1,3}(?:[.\-_]\d{1,3}){3}")
KINDS = ("printer", "scanner")

Sample = tuple[tuple[str, ...], Any]


@dataclass(frozen=True, slots=True)
class Readings:
    """Everything one scrape shows, read on the event loop in one go."""

    taken: float
    started: float
    census: Census
    queries: tuple[tuple[tuple[str, str, str], int], ...]
    # (interface, cumulative (upper bound, count) pairs, sum of seconds)
    latency: tuple[tuple[str, tuple[tuple[float, int], ...], float], ...]
    zones_by_site: tuple[tuple[str, int], ...]
    prefixes: int
    log_entries: int
    log_purged: int
    log_dropped: int
    discovery_enabled: bool
    mqtt_enabled: bool
    # Each component's stats (and the service's ``security`` and ``operations``), frozen.
    sections: Mapping[str, Mapping[str, Any]]
    # Filled in by the collector at scrape time.
    age: float = math.nan
    fallbacks: int = 0

    def section(self, name: str) -> Mapping[str, Any]:
        """Return one stats section, empty when it is absent."""
        return self.sections.get(name, MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Family:
    """One family on the page: named, typed and documented here, read from ``Readings``."""

    name: str
    type: str
    help: str
    read: Callable[[Readings], Iterable[Sample]]
    labels: tuple[str, ...] = ()
    # Shown only while this stats section exists ("" for always).
    section: str = ""
    # The section's keys it reads: every key a section has is exported or listed in UNEXPORTED.
    keys: tuple[str, ...] = ()


def label_value(value: Any) -> str:
    """Return a value fit to be a label, or ``other`` (addresses never pass)."""
    text = str(value)
    return text if SAFE_VALUE.fullmatch(text) and not HEX_RUN.search(text) else "other"


def device_label(device_id: str) -> str:
    """Return a device id fit to be a label, or ``other`` (an id that holds an address)."""
    if DEVICE_LABEL.fullmatch(device_id) and not IPV4_RUN.search(device_id):
        return device_id
    return "other"


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def folded(items: Iterable[tuple[Any, Any]]) -> list[Sample]:
    """Return one-label samples, unsafe or surplus label values folded into ``other``."""
    out: dict[str, float] = {}
    for raw, value in items:
        n = _num(value)
        if n is None:
            continue
        label = label_value(raw)
        if label not in out and len(out) >= MAX_LABEL_VALUES:
            label = "other"
        out[label] = out.get(label, 0.0) + n
    return [((k,), v) for k, v in sorted(out.items())]


# ---- family builders ------------------------------------------------------------------------


def always(name: str, kind: str, help: str, read: Callable[[Readings], Any]) -> Family:
    """Return an unlabelled family read from the service (always shown)."""
    return Family(name, kind, help, lambda r: [((), float(read(r)))])


def stat(section: str, key: str, name: str, kind: str, help: str) -> Family:
    """Return an unlabelled family read from one number (or boolean) of a stats section."""

    def read(r: Readings) -> list[Sample]:
        n = _num(r.section(section).get(key))
        return [] if n is None else [((), n)]

    return Family(name, kind, help, read, section=section, keys=(key,))


def flag(section: str, key: str, name: str, help: str) -> Family:
    """Return a gauge that is 1 while a key of a stats section is truthy (an error text)."""

    def read(r: Readings) -> list[Sample]:
        return [((), float(bool(r.section(section).get(key))))]

    return Family(name, "gauge", help, read, section=section, keys=(key,))


def by_label(section: str, key: str, name: str, kind: str, help: str, label: str) -> Family:
    """Return a one-label family read from a map of label value to number in a stats section."""

    def read(r: Readings) -> list[Sample]:
        value = r.section(section).get(key)
        return folded(value.items()) if isinstance(value, Mapping) else []

    return Family(name, kind, help, read, (label,), section=section, keys=(key,))


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


def _supplies(r: Readings) -> list[Sample]:
    out: dict[tuple[str, str], float] = {}
    for device_id, supply, level in r.census.supplies:
        dev = device_label(device_id)
        if dev == "other" or len(out) >= MAX_SUPPLY_SERIES:
            continue
        out.setdefault((dev, supply_label(supply)), float(level))
    return sorted(out.items())


def _by_kind(pairs: tuple[tuple[str, int], ...]) -> list[Sample]:
    counts = dict(pairs)
    return [((k,), float(counts.get(k, 0))) for k in KINDS]


# ---- every family ---------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = (
    # The daemon and its answers.
    Family(
        "nearest_build_info",
        "gauge",
        "Version of nearestd and of the Python running it; always 1.",
        lambda r: [((__version__, platform.python_version()), 1.0)],
        ("version", "python_version"),
    ),
    always(
        "nearest_start_time_seconds",
        "gauge",
        "When the daemon started, seconds since the epoch.",
        lambda r: r.started,
    ),
    Family(
        "nearest_queries_total",
        "counter",
        "Requests answered, by interface, op and result (ok or an error code).",
        lambda r: [
            ((label_value(i), label_value(o), label_value(res)), float(n))
            for (i, o, res), n in r.queries
        ],
        ("interface", "op", "result"),
    ),
    Family(
        "nearest_query_duration_seconds",
        "histogram",
        "Time to decode, answer and encode one request, by interface.",
        lambda r: [((label_value(i),), (buckets, total)) for i, buckets, total in r.latency],
        ("interface",),
    ),
    # The device table (the census).
    Family(
        "nearest_devices",
        "gauge",
        "Known devices by kind and shown state (stale: not confirmed since a restart, or its "
        "origin went silent; stopped and unreachable ones show those states).",
        lambda r: [((k, s), float(n)) for (k, s), n in r.census.by_kind_state],
        ("kind", "state"),
    ),
    Family(
        "nearest_devices_stale",
        "gauge",
        "Stale devices (restored and not yet heard of again, or from a silent origin), by kind.",
        lambda r: _by_kind(r.census.stale_by_kind),
        ("kind",),
    ),
    Family(
        "nearest_devices_unlocated",
        "gauge",
        "Devices no rule could place: listed, never answered as nearest.",
        lambda r: _by_kind(r.census.unlocated_by_kind),
        ("kind",),
    ),
    Family(
        "nearest_site_devices",
        "gauge",
        "Located devices per site and kind.",
        lambda r: [((label_value(s), k), float(n)) for (s, k), n in r.census.by_site_kind],
        ("site", "kind"),
    ),
    Family(
        "nearest_device_supply_level_percent",
        "gauge",
        "Supply level a polled device reports, in percent, by device id and supply name "
        "as the device reports it, as in stats (a name that could hold an address: other; "
        f"at most {MAX_SUPPLY_SERIES} series; ids that hold an address are left out).",
        _supplies,
        ("device", "supply"),
    ),
    # The site maps.
    Family(
        "nearest_site_zones",
        "gauge",
        "Zones per site in the loaded site maps.",
        lambda r: [((label_value(s),), float(n)) for s, n in r.zones_by_site],
        ("site",),
    ),
    always(
        "nearest_subnet_prefixes",
        "gauge",
        "Subnet prefixes that locate clients.",
        lambda r: r.prefixes,
    ),
    # The location log.
    always(
        "nearest_location_log_entries",
        "gauge",
        "Entries held in the in-memory location log.",
        lambda r: r.log_entries,
    ),
    always(
        "nearest_location_log_purged_total",
        "counter",
        "Location-log entries purged at the end of their retention.",
        lambda r: r.log_purged,
    ),
    always(
        "nearest_location_log_dropped_total",
        "counter",
        "Location-log entries dropped because the log was full.",
        lambda r: r.log_dropped,
    ),
    # What the configuration turns on.
    always(
        "nearest_discovery_enabled",
        "gauge",
        "Whether mDNS discovery is enabled in the configuration.",
        lambda r: r.discovery_enabled,
    ),
    always(
        "nearest_mqtt_enabled",
        "gauge",
        "Whether an [mqtt] section configures MQTT (its state: nearest_mqtt_connected).",
        lambda r: r.mqtt_enabled,
    ),
    # Reloads (the app's ``operations`` section) and the warm-restart inventory.
    Family(
        "nearest_config_reloads_total",
        "counter",
        "Reloads of the configuration and site maps, by result.",
        lambda r: [
            (("success",), float(r.section("operations").get("reloads_ok", 0))),
            (("failure",), float(r.section("operations").get("reloads_failed", 0))),
        ],
        ("result",),
        section="operations",
        keys=("reloads_ok", "reloads_failed"),
    ),
    flag(
        "operations",
        "last_reload_ok",
        "nearest_config_last_reload_successful",
        "Whether the last reload succeeded (1 before any reload).",
    ),
    stat(
        "operations",
        "last_reload",
        "nearest_config_last_reload_success_timestamp_seconds",
        "gauge",
        "When the configuration in use was loaded, seconds since the epoch.",
    ),
    Family(
        "nearest_inventory_snapshot_writes_total",
        "counter",
        "Writes of the warm-restart inventory snapshot, by result.",
        lambda r: [
            (("success",), float(r.section("inventory").get("writes_ok", 0))),
            (("failure",), float(r.section("inventory").get("writes_failed", 0))),
        ],
        ("result",),
        section="inventory",
        keys=("writes_ok", "writes_failed"),
    ),
    stat(
        "inventory",
        "restored",
        "nearest_inventory_restored_devices",
        "gauge",
        "Devices restored (as stale) from the snapshot at start.",
    ),
    stat(
        "inventory",
        "stale_expired",
        "nearest_inventory_stale_expired_total",
        "counter",
        "Restored devices dropped because discovery did not confirm them in time.",
    ),
    # The operators' web view (adapters/web.py), while [web] is set.
    stat(
        "web",
        "requests",
        "nearest_web_requests_total",
        "counter",
        "Requests the web view answered (pages, assets, event streams).",
    ),
    stat(
        "web",
        "unauthorised",
        "nearest_web_unauthorised_total",
        "counter",
        "Web requests refused with 401 for a missing or wrong bearer token.",
    ),
    stat("web", "streams", "nearest_web_streams", "gauge", "Open web pages following live events."),
    stat(
        "web",
        "events",
        "nearest_web_events_total",
        "counter",
        "Live updates sent to open web pages.",
    ),
    stat(
        "web",
        "streams_dropped",
        "nearest_web_streams_dropped_total",
        "counter",
        "Event streams closed because their reader fell too far behind.",
    ),
    # Client connections (the socket servers).
    stat(
        "connections",
        "open",
        "nearest_connections_open",
        "gauge",
        "Open client connections on the query sockets.",
    ),
    stat(
        "connections",
        "admin_open",
        "nearest_connections_admin_open",
        "gauge",
        "Open connections on the admin socket.",
    ),
    stat(
        "connections",
        "refused_at_cap",
        "nearest_connections_refused_total",
        "counter",
        "Connections refused at a cap: the total, the trusted reserve or one source's share.",
    ),
    stat(
        "connections",
        "refused_per_source",
        "nearest_connections_refused_per_source_total",
        "counter",
        "Of the refused connections, those over one source's share (an address or IPv6 /64).",
    ),
    stat(
        "connections",
        "untrusted_sources",
        "nearest_connections_untrusted_sources",
        "gauge",
        "Untrusted client sources (addresses or IPv6 /64s) holding connections.",
    ),
    Family(
        "nearest_connections_closed_total",
        "counter",
        "Connections closed by the daemon, by reason.",
        lambda r: [
            (("idle",), float(r.section("connections").get("closed_idle", 0))),
            (("slow_frame",), float(r.section("connections").get("closed_slow", 0))),
        ],
        ("reason",),
        section="connections",
        keys=("closed_idle", "closed_slow"),
    ),
    stat(
        "connections",
        "frames_too_large",
        "nearest_frames_too_large_total",
        "counter",
        "Frames refused for announcing more than the frame limit.",
    ),
    stat(
        "connections",
        "tasks",
        "nearest_event_loop_tasks",
        "gauge",
        "Tasks on the daemon's event loop.",
    ),
    # Refused requests and the rate limiter (the service's ``security`` section).
    by_label(
        "security",
        "requests_refused",
        "nearest_security_requests_refused_total",
        "counter",
        "Requests refused (forbidden), by interface.",
        "interface",
    ),
    by_label(
        "security",
        "requests_rate_limited",
        "nearest_security_requests_rate_limited_total",
        "counter",
        "Requests refused by the rate limiter, by interface.",
        "interface",
    ),
    by_label(
        "security",
        "requests_malformed",
        "nearest_security_requests_malformed_total",
        "counter",
        "Malformed requests (bad request, version or size), by interface.",
        "interface",
    ),
    stat(
        "security",
        "devices_quarantined",
        "nearest_security_devices_quarantined",
        "gauge",
        "Devices held in quarantine now.",
    ),
    stat(
        "security",
        "devices_quarantined_total",
        "nearest_security_quarantines_total",
        "counter",
        "Devices ever put in quarantine.",
    ),
    stat(
        "security",
        "rate_limiter_clients",
        "nearest_security_rate_limiter_clients",
        "gauge",
        "Client sources (addresses, IPv6 /64s) tracked by the rate limiter.",
    ),
    stat(
        "security",
        "rate_limiter_evicted",
        "nearest_security_rate_limiter_evicted_total",
        "counter",
        "Client sources evicted from the rate limiter's table.",
    ),
    stat(
        "security",
        "pseudonym_spikes",
        "nearest_security_pseudonym_spikes_total",
        "counter",
        "Times one client asked more often than the spike threshold.",
    ),
    # mDNS discovery (while [discovery] is enabled).
    stat(
        "discovery",
        "running",
        "nearest_discovery_browser_running",
        "gauge",
        "Whether the mDNS browsers are running.",
    ),
    flag(
        "discovery",
        "error",
        "nearest_discovery_browser_failed",
        "Whether the mDNS browsers failed to start or stopped on an error.",
    ),
    stat(
        "discovery",
        "services",
        "nearest_discovery_services",
        "gauge",
        "DNS-SD service instances currently seen.",
    ),
    stat(
        "discovery",
        "devices",
        "nearest_discovery_devices",
        "gauge",
        "Devices currently known from mDNS discovery.",
    ),
    by_label(
        "discovery",
        "events",
        "nearest_discovery_events_total",
        "counter",
        "mDNS browser events, by event.",
        "event",
    ),
    by_label(
        "discovery",
        "txt_problems",
        "nearest_discovery_txt_problems_total",
        "counter",
        "Problems found in advertised TXT records, by problem.",
        "problem",
    ),
    by_label(
        "discovery",
        "services_refused",
        "nearest_discovery_services_refused_total",
        "counter",
        "Services refused or trimmed for what a peer announced (bad name, address, "
        "claimed UUID, per-source cap), each counted once per service and reason.",
        "reason",
    ),
    stat(
        "discovery",
        "refused_over_max_devices",
        "nearest_discovery_refused_over_max_devices_total",
        "counter",
        "Announcements refused because the discovered-device cap was reached.",
    ),
    stat(
        "discovery",
        "resolves_deferred",
        "nearest_discovery_resolves_deferred",
        "gauge",
        "Service resolutions waiting for a free slot.",
    ),
    # MQTT (while an [mqtt] section is configured).
    stat(
        "mqtt",
        "connected",
        "nearest_mqtt_connected",
        "gauge",
        "Whether the MQTT client is connected to the broker.",
    ),
    stat(
        "mqtt",
        "reconnects",
        "nearest_mqtt_reconnects_total",
        "counter",
        "Reconnections to the MQTT broker.",
    ),
    stat(
        "mqtt",
        "received",
        "nearest_mqtt_requests_received_total",
        "counter",
        "Requests received on the query topic.",
    ),
    stat(
        "mqtt",
        "replied",
        "nearest_mqtt_replies_total",
        "counter",
        "Replies published to requests.",
    ),
    stat(
        "mqtt",
        "malformed",
        "nearest_mqtt_requests_malformed_total",
        "counter",
        "Malformed requests on the query topic.",
    ),
    stat(
        "mqtt",
        "unanswerable",
        "nearest_mqtt_requests_unanswerable_total",
        "counter",
        "Requests that could not be answered (no usable response topic).",
    ),
    stat(
        "mqtt",
        "records_published",
        "nearest_mqtt_device_records_published_total",
        "counter",
        "Retained device records published.",
    ),
    stat(
        "mqtt",
        "records_cleared",
        "nearest_mqtt_device_records_cleared_total",
        "counter",
        "Retained device records cleared.",
    ),
    stat(
        "mqtt",
        "federated_devices",
        "nearest_mqtt_federated_devices",
        "gauge",
        "Devices served from other instances.",
    ),
    stat(
        "mqtt",
        "federated_refused",
        "nearest_mqtt_federated_records_refused_total",
        "counter",
        "Device records from other instances refused (invalid, or over the cap).",
    ),
    stat(
        "mqtt",
        "federation_conflicts",
        "nearest_mqtt_federation_conflicts_total",
        "counter",
        "Device records claimed by more than one instance.",
    ),
    stat(
        "mqtt",
        "federated_stale",
        "nearest_mqtt_federated_stale",
        "gauge",
        "Devices of other instances served stale: their origin or the link to it is gone, "
        "within foreign_grace.",
    ),
    stat(
        "mqtt",
        "federated_expired",
        "nearest_mqtt_federated_expired_total",
        "counter",
        "Devices of other instances dropped after foreign_grace without their origin or link.",
    ),
    stat(
        "mqtt",
        "federated_other_site",
        "nearest_mqtt_federated_other_site_total",
        "counter",
        "Device records ignored because their site is not in this daemon's maps.",
    ),
    stat(
        "mqtt",
        "federated_legacy_records",
        "nearest_mqtt_federated_legacy_records_total",
        "counter",
        "Device records read on the previous version's one-level topic layout.",
    ),
    stat(
        "mqtt",
        "origins_silent",
        "nearest_mqtt_federation_origins_silent",
        "gauge",
        "Other instances whose heartbeats stopped for three of their intervals.",
    ),
    stat(
        "mqtt",
        "origins_online",
        "nearest_mqtt_federation_origins_online",
        "gauge",
        "Other instances seen online.",
    ),
    stat(
        "mqtt",
        "internal_errors",
        "nearest_mqtt_internal_errors_total",
        "counter",
        "MQTT requests that failed inside the daemon (a bug: see the log).",
    ),
    stat(
        "mqtt",
        "requests_rate_limited",
        "nearest_mqtt_requests_rate_limited_total",
        "counter",
        "MQTT requests refused because their asker (reply topic) exceeded its rate.",
    ),
    stat(
        "mqtt",
        "requests_dropped",
        "nearest_mqtt_requests_dropped_total",
        "counter",
        "MQTT requests dropped unanswered because the inbound queue was full.",
    ),
    stat(
        "mqtt",
        "requests_queued",
        "nearest_mqtt_requests_queued",
        "gauge",
        "MQTT requests read from the broker and waiting to be answered.",
    ),
    stat(
        "mqtt",
        "askers",
        "nearest_mqtt_askers",
        "gauge",
        "Distinct MQTT askers (reply topics) with a rate bucket held.",
    ),
    stat(
        "mqtt",
        "messages_dropped",
        "nearest_mqtt_messages_dropped_total",
        "counter",
        "Other MQTT messages (records, statuses) dropped because the inbound queue was full.",
    ),
    # IPP/eSCL polling.
    stat("poller", "enabled", "nearest_poller_enabled", "gauge", "Whether IPP/eSCL polling runs."),
    stat(
        "poller",
        "devices_polled",
        "nearest_poller_devices",
        "gauge",
        "Devices being polled.",
    ),
    stat(
        "poller",
        "devices_unreachable",
        "nearest_poller_devices_unreachable",
        "gauge",
        "Polled devices that do not answer.",
    ),
    stat("poller", "in_flight", "nearest_poller_in_flight", "gauge", "Polls under way."),
    stat("poller", "polls_total", "nearest_poller_polls_total", "counter", "Polls made."),
    by_label(
        "poller",
        "poll_errors_total",
        "nearest_poller_errors_total",
        "counter",
        "Failed polls, by kind of error.",
        "error",
    ),
    stat(
        "poller",
        "poll_seconds_total",
        "nearest_poller_poll_seconds_total",
        "counter",
        "Time spent polling, in seconds.",
    ),
    stat(
        "poller",
        "state_changes_total",
        "nearest_poller_state_changes_total",
        "counter",
        "Device state changes found by polling.",
    ),
    by_label(
        "poller",
        "refused_targets",
        "nearest_poller_refused_targets_total",
        "counter",
        "Devices never polled for their address (loopback, this host's own, ...), by reason.",
        "reason",
    ),
    # Unicast DNS-SD (while a [dnssd] section is configured).
    by_label(
        "dnssd",
        "queries_by_qtype",
        "nearest_dnssd_queries_total",
        "counter",
        "DNS queries answered, by query type.",
        "qtype",
    ),
    by_label(
        "dnssd",
        "replies_by_rcode",
        "nearest_dnssd_replies_total",
        "counter",
        "DNS replies sent, by response code.",
        "rcode",
    ),
    stat(
        "dnssd",
        "truncated_total",
        "nearest_dnssd_truncated_total",
        "counter",
        "UDP replies truncated (TC) to the asker's size.",
    ),
    stat(
        "dnssd",
        "rate_limited_total",
        "nearest_dnssd_rate_limited_total",
        "counter",
        "DNS queries dropped over the rate of their source prefix.",
    ),
    stat(
        "dnssd",
        "malformed_total",
        "nearest_dnssd_malformed_total",
        "counter",
        "DNS messages dropped or answered FORMERR.",
    ),
    stat(
        "dnssd",
        "tcp_refused_total",
        "nearest_dnssd_tcp_refused_total",
        "counter",
        "DNS TCP connections refused over the cap.",
    ),
    stat(
        "dnssd",
        "tcp_connections",
        "nearest_dnssd_tcp_connections",
        "gauge",
        "Open DNS TCP connections.",
    ),
    stat(
        "dnssd",
        "cache_entries",
        "nearest_dnssd_cache_entries",
        "gauge",
        "DNS answers cached as wire.",
    ),
    stat(
        "dnssd",
        "cache_revalidated_total",
        "nearest_dnssd_cache_revalidated_total",
        "counter",
        "Cached DNS answers kept across a device-table change (their device lists unchanged).",
    ),
    stat(
        "dnssd",
        "cache_bytes",
        "nearest_dnssd_cache_bytes",
        "gauge",
        "Bytes of DNS wire answers and their keys in the cache.",
    ),
    # The exporter itself.
    always(
        "nearest_metrics_snapshot_age_seconds",
        "gauge",
        "Age of the snapshot served; grows while the event loop is stuck.",
        lambda r: r.age,
    ),
    always(
        "nearest_metrics_snapshot_fallbacks_total",
        "counter",
        "Scrapes served an older snapshot because the event loop did not answer in time.",
        lambda r: r.fallbacks,
    ),
)

# Stats keys shown by ``nearestctl stats`` but on no family, and why.
UNEXPORTED: dict[str, dict[str, str]] = {
    "discovery": {"interfaces": "addresses of the browsing interfaces"},
    "connections": {"fds": "process_open_fds has it"},
    "poller": {
        "devices_by_state": "nearest_devices{kind,state} has it",
        "supply_levels": "nearest_device_supply_level_percent has it",
    },
    "metrics": {
        "url": "this page's own address",
        "snapshot_fallbacks": "nearest_metrics_snapshot_fallbacks_total has it",
    },
    "inventory": {
        "file": "a path",
        "last_write": "a timestamp only for stats",
    },
    "operations": {"lists_warmed_in": "a start-up figure, logged once; only for stats"},
    "systemd": {
        "notify": "a setting",
        "sent": "messages to the service manager, only for stats",
        "failed": "messages the service manager did not take, only for stats",
    },
}


def exported_keys() -> dict[str, set[str]]:
    """Return, per stats section, the keys some family reads or UNEXPORTED names."""
    out: dict[str, set[str]] = {s: set(keys) for s, keys in UNEXPORTED.items()}
    for fam in FAMILIES:
        if fam.section:
            out.setdefault(fam.section, set()).update(fam.keys)
    return out


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_frozen(v) for v in value)
    return value


def read_sections(sources: Mapping[str, Callable[[], Mapping[str, Any]]]) -> dict[str, Any]:
    """Call each section's stats function; a section that fails is left out (and logged)."""
    out: dict[str, Any] = {}
    for name, fn in list(sources.items()):
        try:
            data = fn()
        except Exception:
            LOG.exception("stats section failed", extra={"section": name})
            continue
        if isinstance(data, Mapping):
            out[name] = data
    return out


def readings(service: Service, sections: Mapping[str, Mapping[str, Any]], now: float) -> Readings:
    """Return one snapshot of the service and the given stats sections (event loop only)."""
    stats = service.stats
    zones: dict[str, int] = {}
    for zone in service.sitemap.zones.values():
        zones[zone.site] = zones.get(zone.site, 0) + 1
    return Readings(
        taken=now,
        started=stats.started,
        census=service.census(now),
        queries=tuple(sorted(stats.queries.items())),
        latency=tuple(
            (i, h.cumulative(), h.total) for i, h in sorted(stats.latency.by_interface.items())
        ),
        zones_by_site=tuple(sorted(zones.items())),
        prefixes=len(service.sitemap.prefixes),
        log_entries=len(service.log),
        log_purged=service.log.purged,
        log_dropped=service.log.dropped,
        discovery_enabled=service.cfg.discovery.enabled,
        mqtt_enabled=service.cfg.mqtt is not None,
        sections=_frozen(sections),
    )


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def to_metric(fam: Family, samples: Iterable[Sample]) -> Metric:
    """Return the prometheus-client family of a definition and its samples."""
    labels = list(fam.labels)
    if fam.type == "counter":
        counter = CounterMetricFamily(fam.name, fam.help, labels=labels)
        for values, v in samples:
            counter.add_metric(list(values), v)
        return counter
    if fam.type == "histogram":
        hist = HistogramMetricFamily(fam.name, fam.help, labels=labels)
        for values, (buckets, total) in samples:
            hist.add_metric(list(values), [(_le(b), float(n)) for b, n in buckets], total)
        return hist
    gauge = GaugeMetricFamily(fam.name, fam.help, labels=labels)
    for values, v in samples:
        gauge.add_metric(list(values), v)
    return gauge


def families(r: Readings, defs: Iterable[Family] = FAMILIES) -> Iterator[Metric]:
    """Yield every family the readings show: those of absent sections are left out."""
    for fam in defs:
        if fam.section and fam.section not in r.sections:
            continue
        try:
            yield to_metric(fam, fam.read(r))
        except (ValueError, TypeError, KeyError):
            # One family that cannot be read must not fail the whole page.
            LOG.exception("metric family skipped", extra={"family": fam.name})


class SnapshotCollector:
    """A prometheus-client collector that serves readings fetched from the event loop."""

    def __init__(
        self,
        build: Callable[[], Readings],
        loop: asyncio.AbstractEventLoop,
        timeout: float = SNAPSHOT_TIMEOUT,
        defs: tuple[Family, ...] = FAMILIES,
    ) -> None:
        self._build = build
        self._loop = loop
        self._timeout = timeout
        self._defs = defs
        self._lock = threading.Lock()
        self._last: Readings | None = None
        self.fallbacks = 0

    def latest(self) -> Readings | None:
        """Return fresh readings from the loop, or the last ones if the loop is stuck."""
        fut: concurrent.futures.Future[Readings] = concurrent.futures.Future()

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
        """Yield every family of the latest readings (nothing before the first)."""
        snap = self.latest()
        if snap is None:
            return
        with self._lock:
            fallbacks = self.fallbacks
        yield from families(
            replace(snap, age=max(0.0, time.time() - snap.taken), fallbacks=fallbacks),
            self._defs,
        )


class MetricsExporter:
    """The HTTP endpoint on ``[metrics] listen``, with a registry of its own (a component)."""

    name = "metrics"

    def __init__(
        self, service: Service, sections: Callable[[], Mapping[str, Mapping[str, Any]]]
    ) -> None:
        self.service = service
        self._sections = sections
        self.registry = CollectorRegistry()
        self.address = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.collector: SnapshotCollector | None = None
        self._listen = service.cfg.metrics.listen

    def stats(self) -> Mapping[str, Any]:
        """Return where the page is served and how often the loop was too slow for a scrape."""
        return MappingProxyType(
            {
                "url": f"http://{self.address}/metrics" if self.address else "",
                "snapshot_fallbacks": self.collector.fallbacks if self.collector else 0,
            }
        )

    def reconfigure(self, cfg: Config) -> None:
        """Warn that a new ``[metrics] listen`` waits for a restart."""
        wanted = cfg.metrics.listen
        if wanted != self._listen:
            LOG.warning(
                "metrics listen changed; it takes effect at the next restart",
                extra={"listening": self._listen or "off", "configured": wanted or "off"},
            )

    def build(self) -> Readings:
        """Return readings of the service now (event loop only)."""
        return readings(self.service, self._sections(), time.time())

    async def start(self) -> None:
        """Bind ``[metrics] listen`` and serve from a thread; nothing when it is empty."""
        listen = self._listen
        if not listen:
            return
        self.collector = SnapshotCollector(self.build, asyncio.get_running_loop())
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        server, thread = start_http_server(listen.port, addr=listen.host, registry=self.registry)
        self._server, self._thread = server, thread
        thread.name = "metrics-http"
        bound = [str(part) for part in server.server_address]
        self.address = (
            f"[{bound[0]}]:{bound[1]}" if ":" in str(bound[0]) else f"{bound[0]}:{bound[1]}"
        )
        LOG.info("metrics listening", extra={"listen": f"http://{self.address}/metrics"})

    async def stop(self) -> None:
        """Stop the HTTP server and wait for its thread (its poll ends within half a second)."""
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)
