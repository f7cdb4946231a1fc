"""Logging: one line per event to stderr, key=value or JSON; client IPs never in full.

Every place that would mention a client address calls ``client_label``; it is the one
spot that decides what of an address may reach a log line.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import time
from typing import Any

LOG = logging.getLogger("nearestd")
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


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
    }


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
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str, level: str) -> None:
    """Send every logger's records to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
