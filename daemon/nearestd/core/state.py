"""Live device state: deciding it from IPP attributes and eSCL status, and when to ask again.

Pure: the poller adapter does the I/O and passes in what it read, the time and a
random number. A poll yields a ``Live`` value; ``overlay`` lays it over whatever
discovery or the site map says about the device, so a later discovery update
does not wipe the state a poll found.

Rules (see also README "Live state"):
- ``printer-state`` 3/4/5 gives idle/processing/stopped; a reason with the
  ``-error`` suffix also means stopped (RFC 8011 §5.4.12: an error stops the
  printer), as does a blocking reason with no suffix (``media-jam``, ...).
- Reasons are shown without their ``-report``/``-warning``/``-error`` suffix.
- ``printer-is-accepting-jobs`` false makes the device unavailable.
- eSCL ``pwg:State`` Idle/Processing/Testing/Stopped/Down gives idle/processing/
  processing/stopped/stopped; ``scan:AdfState`` adds a reason.
- A poll that fails (no connection, timeout, HTTP or protocol error) makes the
  device unreachable at once, keeping what the last good poll said about
  supplies and location; the next poll comes after the interval, doubled per
  further failure up to ``max_backoff``, all with +/- jitter.
"""

from __future__ import annotations

import ipaddress
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from nearestd.core.discovery import CONTROL_CHARS
from nearestd.core.ipp import Value
from nearestd.core.model import Device, DeviceKind, DeviceState, Supply

PRINTER_ATTRIBUTES = (
    "printer-state",
    "printer-state-reasons",
    "printer-is-accepting-jobs",
    "marker-names",
    "marker-types",
    "marker-levels",
    "printer-supply",
    "printer-supply-description",
    "printer-location",
    "printer-geo-location",
    "printer-uuid",
    "printer-make-and-model",
)

MAX_REASONS = 16
MAX_SUPPLIES = 16
MAX_TEXT = 127
_KEYWORD = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SUFFIXES = ("-report", "-warning", "-error")
# Conditions that stop a printer even when a device omits the severity suffix.
BLOCKING_REASONS = frozenset(
    (
        "media-jam",
        "media-empty",
        "door-open",
        "cover-open",
        "interlock-open",
        "toner-empty",
        "marker-supply-empty",
        "marker-waste-full",
        "input-tray-missing",
        "output-tray-missing",
        "output-area-full",
        "shutdown",
        "paused",
    )
)
_PRINTER_STATES = {3: DeviceState.IDLE, 4: DeviceState.PROCESSING, 5: DeviceState.STOPPED}
_ESCL_STATES = {
    "idle": DeviceState.IDLE,
    "processing": DeviceState.PROCESSING,
    "testing": DeviceState.PROCESSING,
    "stopped": DeviceState.STOPPED,
    "down": DeviceState.STOPPED,
}
# eSCL scan:AdfState -> (reason keyword, whether it stops the scanner).
_ADF_REASONS = {
    "scanneradfjam": ("media-jam", True),
    "scanneradfhatchopen": ("cover-open", True),
    "scanneradfmispick": ("media-mispick", False),
    "scanneradfmultipickdetected": ("media-multiple-feed", False),
    "scanneradfinputtrayfailed": ("input-tray-failed", False),
    "scanneradfinputtrayoverloaded": ("input-tray-overloaded", False),
    "scanneradfempty": ("media-empty", False),
}
# Every eSCL document is small; anything bigger is not a status document.
MAX_ESCL_BYTES = 65536


class StatusError(ValueError):
    """A device's status reply cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Live:
    """What the last poll of a device found."""

    state: DeviceState
    reasons: tuple[str, ...] = ()
    accepting_jobs: bool = True
    supplies: tuple[Supply, ...] = ()
    location_text: str | None = None
    geo: tuple[float, float] | None = None
    uuid: str | None = None
    make_model: str | None = None


def overlay(device: Device, live: Live) -> Device:
    """Return the device with the live state laid over it."""
    return replace(
        device,
        state=live.state,
        state_reasons=live.reasons,
        accepting_jobs=live.accepting_jobs,
        supplies=live.supplies,
        location_text=live.location_text
        if live.location_text is not None
        else device.location_text,
        geo=live.geo if live.geo is not None else device.geo,
        uuid=device.uuid or live.uuid,
        make_model=device.make_model or live.make_model or "",
    )


def unreachable(previous: Live | None, reason: str) -> Live:
    """Return the state after a failed poll: unreachable, the rest as last known."""
    if previous is None:
        return Live(DeviceState.UNREACHABLE, (reason,))
    return replace(previous, state=DeviceState.UNREACHABLE, reasons=(reason,))


# ---- IPP ---------------------------------------------------------------------------------


def _first(attrs: Mapping[str, Sequence[Value]], name: str) -> Value:
    values = attrs.get(name)
    return values[0] if values else None


def _text(value: Value) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join(CONTROL_CHARS.sub(" ", value).split())[:MAX_TEXT]
    return text or None


def split_reason(reason: str) -> tuple[str, str | None]:
    """Return a reason keyword without its severity suffix, and the suffix (or None)."""
    for suffix in _SUFFIXES:
        if reason.endswith(suffix) and len(reason) > len(suffix):
            return reason[: -len(suffix)], suffix[1:]
    return reason, None


def printer_live(attrs: Mapping[str, Sequence[Value]]) -> Live:
    """Decide a printer's live state from its Get-Printer-Attributes reply."""
    raw_state = _first(attrs, "printer-state")
    state = (
        _PRINTER_STATES.get(raw_state, DeviceState.UNKNOWN)
        if isinstance(raw_state, int) and not isinstance(raw_state, bool)
        else DeviceState.UNKNOWN
    )
    reasons: list[str] = []
    blocked = False
    for value in attrs.get("printer-state-reasons", ()):
        if not isinstance(value, str):
            continue
        keyword = value.strip().lower()
        if keyword == "none" or not _KEYWORD.match(keyword):
            continue
        bare, severity = split_reason(keyword)
        if severity == "error" or (severity is None and bare in BLOCKING_REASONS):
            blocked = True
        if bare not in reasons and len(reasons) < MAX_REASONS:
            reasons.append(bare)
    if blocked and state in (DeviceState.IDLE, DeviceState.PROCESSING, DeviceState.UNKNOWN):
        state = DeviceState.STOPPED
    accepting = _first(attrs, "printer-is-accepting-jobs")
    geo_text = _first(attrs, "printer-geo-location")
    uuid = _text(_first(attrs, "printer-uuid"))
    if uuid is not None and uuid.lower().startswith("urn:uuid:"):
        uuid = uuid[9:]
    return Live(
        state=state,
        reasons=tuple(reasons),
        accepting_jobs=accepting if isinstance(accepting, bool) else True,
        supplies=supplies_of(attrs),
        location_text=_text(_first(attrs, "printer-location")),
        geo=parse_geo_uri(geo_text) if isinstance(geo_text, str) else None,
        uuid=uuid.lower() if uuid else None,
        make_model=_text(_first(attrs, "printer-make-and-model")),
    )


def _level(raw: int, capacity: int = 100) -> int | None:
    # Negative levels are "other", "unknown" or "some remaining" (RFC 3805, CUPS spec).
    if raw < 0 or capacity <= 0:
        return None
    return max(0, min(100, round(raw * 100 / capacity)))


def supplies_of(attrs: Mapping[str, Sequence[Value]]) -> tuple[Supply, ...]:
    """Return supply levels from marker-* (CUPS) or else printer-supply (PWG 5100.13)."""
    levels = attrs.get("marker-levels", ())
    if levels:
        names = attrs.get("marker-names", ())
        types = attrs.get("marker-types", ())
        out = []
        for i, raw in enumerate(levels[:MAX_SUPPLIES]):
            if not isinstance(raw, int) or isinstance(raw, bool):
                continue
            name = _text(names[i]) if i < len(names) else None
            kind = _text(types[i]) if i < len(types) else None
            out.append(Supply(name or f"marker-{i + 1}", kind or "other", _level(raw)))
        return tuple(out)
    described = attrs.get("printer-supply-description", ())
    out = []
    for i, value in enumerate(attrs.get("printer-supply", ())[:MAX_SUPPLIES]):
        if not isinstance(value, str):
            continue
        fields = dict(
            part.split("=", 1) for part in value.split(";") if "=" in part and len(part) < 256
        )
        try:
            raw = int(fields.get("level", "-2"))
            capacity = int(fields.get("maxcapacity", "100"))
        except ValueError:
            continue
        name = _text(described[i]) if i < len(described) else None
        unit_percent = fields.get("unit", "percent") == "percent"
        level = _level(raw, 100 if unit_percent and capacity <= 0 else capacity)
        kind = _text(fields.get("type")) or "other"
        out.append(Supply(name or f"supply-{i + 1}", kind, level))
    return tuple(out)


# ---- geo: URIs (RFC 5870) -----------------------------------------------------------------

_NUM = r"-?\d+(?:\.\d+)?"
_GEO = re.compile(rf"^geo:({_NUM}),({_NUM})(?:,({_NUM}))?((?:;[^;]*)*)$", re.IGNORECASE)
_PARAM = re.compile(r"^[A-Za-z0-9-]+(?:=[A-Za-z0-9\-.!~*'()%:\[\]&+$]*)?$")


def parse_geo_uri(text: str) -> tuple[float, float] | None:
    """Return (lat, lon) of an RFC 5870 ``geo:`` URI in WGS-84, or None if it is not one."""
    m = _GEO.match(text.strip())
    if m is None:
        return None
    lat, lon = float(m.group(1)), float(m.group(2))
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None
    crs = "wgs84"
    for param in filter(None, m.group(4).split(";")):
        if not _PARAM.match(param):
            return None
        key, _, value = param.partition("=")
        key = key.lower()
        if key == "crs":
            crs = value.lower()
        elif key == "u":
            try:
                if not math.isfinite(float(value)) or float(value) < 0:
                    return None
            except ValueError:
                return None
    # Another CRS's coordinates are not latitude and longitude we can place.
    if crs != "wgs84":
        return None
    if abs(lat) == 90.0:
        lon = 0.0  # RFC 5870 §3.4.2: longitude is meaningless at the poles
    return lat, lon


# ---- eSCL -------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def scanner_live(document: bytes) -> Live:
    """Decide a scanner's live state from its eSCL ScannerStatus document."""
    if len(document) > MAX_ESCL_BYTES:
        raise StatusError(f"ScannerStatus: document of {len(document)} bytes is too large")
    head = document[:1024].lower()
    if b"<!doctype" in head or b"<!entity" in document.lower():
        raise StatusError("ScannerStatus: DTDs and entities are not accepted")
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise StatusError(f"ScannerStatus: not well-formed XML ({exc})") from None
    if _local(root.tag) != "scannerstatus":
        raise StatusError(f"ScannerStatus: root element is {_local(root.tag)!r}")
    state_text: str | None = None
    adf_text: str | None = None
    for child in root:
        name = _local(child.tag)
        if name == "state":
            state_text = (child.text or "").strip()
        elif name == "adfstate":
            adf_text = (child.text or "").strip()
    if state_text is None:
        raise StatusError("ScannerStatus: no pwg:State element")
    state = _ESCL_STATES.get(state_text.lower())
    if state is None:
        raise StatusError(f"ScannerStatus: unknown pwg:State {state_text[:40]!r}")
    reasons: tuple[str, ...] = ()
    if adf_text:
        reason = _ADF_REASONS.get(adf_text.lower())
        if reason is not None:
            reasons = (reason[0],)
            if reason[1] and state != DeviceState.STOPPED:
                state = DeviceState.STOPPED
    return Live(state=state, reasons=reasons)


# ---- what to poll -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PollTarget:
    """Where to ask a device for its state: the protocol, the HTTP(S) URL and the IPP URI."""

    protocol: str
    url: str
    printer_uri: str = ""

    @property
    def tls(self) -> bool:
        """Return whether the poll goes over TLS."""
        return self.url.startswith("https://")


def _split_uri(uri: str) -> tuple[str, str, str] | None:
    """Return (scheme, authority, path) of an absolute URI, or None."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest or any(c in rest for c in " \t\r\n"):
        return None
    authority, slash, path = rest.partition("/")
    if not authority or "@" in authority:
        return None
    return scheme.lower(), authority, slash + path


def poll_target(device: Device) -> PollTarget | None:
    """Return how to poll a device, over its best endpoint, or None if it cannot be polled.

    Printers: the first ipps URI among the device's own URI and its endpoints, else
    the first ipp URI (IPP's port 631 by default); scanners: the first https, else
    http eSCL root, whose ``ScannerStatus`` is read. CUPS queues are not polled, nor are
    other instances' devices (their origin polls them, from their own segment, and
    publishes the state; this daemon may have no route to them at all).
    """
    if device.is_queue or device.source == "mqtt":
        return None
    uris = [device.uri, *(e.uri for e in device.endpoints)]
    if device.source == "mdns":
        # A discovered device is polled at an address literal (one of its own when it
        # has any), never at a host name that some resolver might send elsewhere.
        own = {a.lower() for a in device.addresses}
        uris = [u for u in uris if _literal_of(uri_host(u), own)]
    order = ("ipps", "ipp") if device.kind == DeviceKind.PRINTER else ("https", "http")
    for wanted in order:
        for uri in uris:
            parts = _split_uri(uri)
            if parts is None or parts[0] != wanted:
                continue
            scheme, authority, path = parts
            if device.kind == DeviceKind.PRINTER:
                host = authority if _has_port(authority) else f"{authority}:631"
                http = "https" if scheme == "ipps" else "http"
                return PollTarget("ipp", f"{http}://{host}{path or '/'}", uri)
            base = path.rstrip("/")
            return PollTarget("escl", f"{scheme}://{authority}{base}/ScannerStatus")
    return None


def uri_host(uri: str) -> str | None:
    """Return the host of an absolute URI: an IPv6 literal unbracketed, its zone with '%'."""
    parts = _split_uri(uri)
    if parts is None:
        return None
    authority = parts[1]
    if authority.startswith("["):
        host, sep, _ = authority[1:].partition("]")
        return host.replace("%25", "%") if sep else None
    return authority.rsplit(":", 1)[0] if ":" in authority else authority


def _literal_of(host: str | None, own: set[str]) -> bool:
    if host is None:
        return False
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return not own or host.lower() in own


def _has_port(authority: str) -> bool:
    if authority.startswith("["):
        return "]:" in authority
    return ":" in authority


# ---- when to poll next -----------------------------------------------------------------


def next_delay(
    failures: int, interval: float, max_backoff: float, rand: float, jitter: float = 0.1
) -> float:
    """Return seconds until the next poll: the interval, doubled per failure after the first.

    ``rand`` is a uniform random number in [0, 1); the delay is spread by +/- ``jitter``
    of itself so that devices polled together drift apart.
    """
    base = interval
    if failures > 1:
        base = min(max(max_backoff, interval), interval * 2.0 ** min(failures - 1, 32))
    return base * (1.0 + jitter * (2.0 * rand - 1.0))


def first_delay(interval: float, rand: float) -> float:
    """Return when a newly seen device is first polled: spread over one interval."""
    return interval * rand
