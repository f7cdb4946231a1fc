"""Logging: one line per event to stderr, key=value or JSON; client IPs never in full.

Log hygiene is enforced in one place, here, in two layers:

1. Code never hands a client address to a logger except through ``client_label``,
   which keeps at most the /24 (IPv4) or /48 (IPv6), or nothing with
   ``log_ip = "none"``.
2. A backstop filter on the one handler every logger (ours and third parties')
   writes through: any IP literal in the message or in a field is replaced by its
   ``client_label``, unless it is already a prefix no finer than /24 or /48. Only the
   fields named in ``ADDRESS_FIELDS`` (device URIs and addresses, listen and broker
   URLs: never client data by construction) are left as they are.

Infrastructure addresses are not personal data: in ``error`` and ``problem`` fields,
an address the config, the site maps or the daemon's own sockets name (see
``set_infrastructure``) is kept whole, and a field a caller marks as quoting the
config or site-map files (``extra={"_verbatim": ("problem",)}``) is left as it is,
so ``bad CIDR '10.20.99.1/24'`` is logged as the map says it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG = logging.getLogger("nearestd")
# Fields whose values are device or infrastructure addresses, never a client's.
ADDRESS_FIELDS = frozenset(
    ("uri", "url", "listen", "addresses", "device_address", "broker", "endpoint", "interfaces")
)
_IP_CANDIDATE = re.compile(
    r"(?<![\w.:])("
    r"\d{1,3}(?:\.\d{1,3}){3}"  # IPv4
    r"|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\d{1,3}(?:\.\d{1,3}){3})?"  # IPv6
    r")(?:%[\w.-]+)?(?:/(\d{1,3}))?(?![\w:]|\.\d)"
)
# Fields where an infrastructure address is shown whole.
INFRA_FIELDS = frozenset(("error", "problem"))
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def client_label(ip: str | None, mode: str) -> str:
    """Return what a log may show of a client IP: its /24 or /48, or nothing."""
    if ip is None or mode == "none":
        return "-"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "invalid"
    if addr.version == 4:
        return str(ipaddress.ip_network(f"{addr}/24", strict=False))
    if addr.ipv4_mapped is not None:
        return str(ipaddress.ip_network(f"{addr.ipv4_mapped}/24", strict=False))
    return str(ipaddress.ip_network(f"{addr}/48", strict=False))


_TOKEN = re.compile(r"[0-9A-Fa-f:.]{2,}(?:/(\d{1,3}))?")


def host_literals(text: str) -> set[str]:
    """Return the IP addresses written in a text (URLs too; not networks but /32 and /128)."""
    out = set()
    for m in _TOKEN.finditer(text):
        token, bits = m.group(0).split("/", 1)[0], m.group(1)
        candidates = [token, token.strip(":.")]
        if token.count(":") == 1:  # an IPv4 address and a port
            candidates.append(token.split(":", 1)[0])
        for candidate in candidates:
            try:
                addr = ipaddress.ip_address(candidate)
            except ValueError:
                continue
            if bits is None or int(bits) == addr.max_prefixlen:
                out.add(str(addr))
            break
    return out


def _keep_or_label(m: re.Match[str], mode: str, keep: frozenset[str] = frozenset()) -> str:
    text, bits = m.group(1), m.group(2)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return m.group(0)
    if keep and str(addr) in keep:
        return m.group(0)
    if bits is not None:
        coarse = 24 if addr.version == 4 else 48
        try:
            net = ipaddress.ip_network(f"{text}/{bits}", strict=True)
        except ValueError:
            net = None
        if net is not None and net.prefixlen <= coarse:
            return m.group(0) if mode != "none" else "-"
    if addr.is_unspecified:
        return m.group(0)
    return client_label(str(addr), mode)


def scrub(text: str, mode: str, keep: frozenset[str] = frozenset()) -> str:
    """Return text with every IP literal finer than /24 or /48 (and not in ``keep``) labelled."""
    if "." not in text and ":" not in text:
        return text
    return _IP_CANDIDATE.sub(lambda m: _keep_or_label(m, mode, keep), text)


class AddressScrubber(logging.Filter):
    """Backstop: no full client IP leaves through the handler this filter guards."""

    def __init__(self, mode: str = "truncated") -> None:
        super().__init__()
        self.mode = mode
        self._infrastructure: frozenset[str] = frozenset()
        self._more: Callable[[], set[str]] | None = None

    @property
    def infrastructure(self) -> frozenset[str]:
        """Return the addresses kept whole in error fields (the lazy part read on first use)."""
        more = self._more
        if more is not None:
            self._more = None
            self._infrastructure |= _normalised(more())
        return self._infrastructure

    @infrastructure.setter
    def infrastructure(self, addresses: frozenset[str]) -> None:
        self._infrastructure = addresses
        self._more = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message and fields; never drop a record."""
        mode = self.mode
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not hide the record
            message = str(record.msg)
        clean = scrub(message, mode)
        if clean != message or record.args:
            record.msg, record.args = clean, ()
        verbatim = getattr(record, "_verbatim", ())
        for key, value in _fields(record).items():
            if key in ADDRESS_FIELDS or isinstance(value, (bool, int, float)) or value is None:
                continue
            if key in verbatim and key in INFRA_FIELDS:
                continue
            text = str(value)
            # The lazy part of the infrastructure (a large map's devices) is read only for
            # an error that does name an address.
            infra = key in INFRA_FIELDS and _IP_CANDIDATE.search(text) is not None
            cleaned = scrub(text, mode, self.infrastructure if infra else frozenset())
            if cleaned != text:
                setattr(record, key, cleaned)
        return True


SCRUBBER = AddressScrubber()


def set_ip_mode(mode: str) -> None:
    """Set what the backstop keeps of an address ("truncated" or "none")."""
    SCRUBBER.mode = mode


def _normalised(addresses: set[str]) -> frozenset[str]:
    keep = set()
    for text in addresses:
        try:
            keep.add(str(ipaddress.ip_address(text)))
        except ValueError:
            continue
    return frozenset(keep)


def set_infrastructure(addresses: set[str], more: Callable[[], set[str]] | None = None) -> None:
    """Name the addresses (config, site maps, own sockets) kept whole in error fields.

    ``more`` yields further ones (a large map's devices), read when first needed.
    """
    SCRUBBER.infrastructure = _normalised(addresses)
    SCRUBBER._more = more


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
    }


def error_at(record: logging.LogRecord) -> str:
    """Return where a logged exception was raised (file:line of the innermost frame), on one line."""
    tb = record.exc_info[2] if record.exc_info else None
    if tb is None:
        return "-"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"


def _kv_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info event="..." key=value`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record."""
        parts = [
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}"
            f".{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_kv_value(record.getMessage())}",
        ]
        for key, value in _fields(record).items():
            parts.append(f"{key}={_kv_value(value)}")
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"error={_kv_value(record.exc_info[0].__name__)}")
            parts.append(f"error_at={_kv_value(error_at(record))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record."""
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(
            {
                k: v if isinstance(v, (int, float, bool)) else str(v)
                for k, v in _fields(record).items()
            }
        )
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__
            out["error_at"] = error_at(record)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str, level: str, log_ip: str = "truncated") -> None:
    """Send every logger's records to stderr in the chosen format, addresses scrubbed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    set_ip_mode(log_ip)
    handler.addFilter(SCRUBBER)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
