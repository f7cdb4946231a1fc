"""MQTT request payloads: JSON or MessagePack in, the reply's address and encoding out.

The JSON decoder applies the wire protocol's limits (payload size, nesting depth 8,
strings of 4 KiB, 1024 items per container) so that a request costs the same to
check whichever encoding it arrives in. Everything here is pure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from nearest_wire import ErrorCode, WireError, decode_payload, encode_payload
from nearest_wire.framing import MAX_DEPTH, MAX_ITEMS, MAX_STR
from nearest_wire.schema import TRANSPORT_KEYS as SCHEMA_TRANSPORT_KEYS

MSGPACK = "application/msgpack"
JSON = "application/json"
MAX_TOPIC = 1024
MAX_CORRELATION = 256
# Keys a 3.1.1 client adds to the request map to say where the reply goes.
TRANSPORT_KEYS = frozenset(SCHEMA_TRANSPORT_KEYS)


def _bad(message: str, rid: int | None = None) -> WireError:
    return WireError(ErrorCode.BAD_REQUEST, message, rid)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # 1e999 would otherwise become inf, a value JSON cannot write back (found by fuzzing).
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:40]} is out of range for a JSON number")
    return value


def decode_json(payload: bytes) -> dict[str, Any]:
    """Decode a JSON request object under the wire limits, or raise WireError(bad-request)."""
    if not payload:
        raise _bad("empty payload: expected a JSON object")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise _bad(f"nesting deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise _bad(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise _bad(f"malformed JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise _bad(f"payload holds a JSON {_json_type(obj)}, expected an object")
    _check_limits(obj, 1, "")
    return obj


def _json_type(obj: Any) -> str:
    if isinstance(obj, list):
        return "array"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, bool):
        return "boolean"
    if obj is None:
        return "null"
    return "number"


def _check_limits(obj: Any, depth: int, path: str) -> None:
    if isinstance(obj, str):
        if len(obj) > MAX_STR // 4 and len(obj.encode("utf-8", "surrogatepass")) > MAX_STR:
            raise _bad(f"{path or 'payload'}: string longer than {MAX_STR} bytes")
        return
    if not isinstance(obj, (dict, list)):
        return
    if depth > MAX_DEPTH:
        raise _bad(f"{path or 'payload'}: nesting deeper than {MAX_DEPTH} levels")
    if len(obj) > MAX_ITEMS:
        raise _bad(f"{path or 'payload'}: more than {MAX_ITEMS} items")
    if isinstance(obj, dict):
        for key, value in obj.items():
            where = f"{path}.{key[:40]}" if path else key[:40]
            _check_limits(key, depth + 1, where)
            _check_limits(value, depth + 1, where)
    else:
        for i, value in enumerate(obj):
            _check_limits(value, depth + 1, f"{path}[{i}]")


def decode_request(payload: bytes, content_type: str | None, max_payload: int) -> dict[str, Any]:
    """Decode a request payload by its Content Type, or raise WireError."""
    if len(payload) > max_payload:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"payload of {len(payload)} bytes; at most {max_payload} are accepted",
        )
    if content_type == MSGPACK:
        return decode_payload(payload)
    return decode_json(payload)


def encode_reply(reply: dict[str, Any], msgpack: bool) -> bytes:
    """Encode a reply map in the request's encoding."""
    if msgpack:
        return encode_payload(reply)
    return json.dumps(
        reply, separators=(",", ":"), ensure_ascii=False, default=_json_default
    ).encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(type(obj).__name__)


def topic_error(topic: object, prefix: str) -> str | None:
    """Return why a reply topic may not be published to, or None when it may."""
    if not isinstance(topic, str) or not topic:
        return "expected a non-empty topic string"
    if len(topic) > MAX_TOPIC:
        return f"topic longer than {MAX_TOPIC} characters"
    if "+" in topic or "#" in topic or "\x00" in topic:
        return "a reply topic may not hold wildcards or NUL"
    if topic.startswith("$"):
        return "topics starting with '$' are reserved to the broker"
    # Replying onto our own topics would let a caller forge status or inventory, or loop.
    if (
        topic == f"{prefix}/query"
        or topic.startswith((f"{prefix}/query/", f"{prefix}/devices/", f"{prefix}/status/"))
        or topic.startswith(f"{prefix}/sync/")
    ):
        return f"a reply topic may not be one of the daemon's own topics under {prefix}/"
    return None


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    """Where and how a reply goes: topic, MQTT 5 Correlation Data, 3.1.1 correlation echo."""

    topic: str
    correlation_data: bytes | None = None
    echo: Any = None
    has_echo: bool = False


def route_v5(response_topic: object, correlation_data: object, prefix: str) -> ReplyRoute | None:
    """Return the route of an MQTT 5 request with a Response Topic, or None if unusable."""
    if topic_error(response_topic, prefix) is not None:
        return None
    assert isinstance(response_topic, str)
    data = correlation_data if isinstance(correlation_data, bytes) else None
    return ReplyRoute(response_topic, data)


def route_v311(obj: dict[str, Any], prefix: str) -> tuple[ReplyRoute | None, str | None]:
    """Return the route a 3.1.1 request names in ``reply_to``, or why it cannot be used."""
    if "reply_to" not in obj:
        return None, "reply_to: missing, and the request has no MQTT 5 Response Topic"
    why = topic_error(obj["reply_to"], prefix)
    if why is not None:
        return None, f"reply_to: {why}"
    if "correlation" not in obj:
        return ReplyRoute(obj["reply_to"]), None
    corr = obj["correlation"]
    ok = isinstance(corr, (str, bytes)) or (isinstance(corr, int) and not isinstance(corr, bool))
    if not ok or (isinstance(corr, (str, bytes)) and len(corr) > MAX_CORRELATION):
        return ReplyRoute(obj["reply_to"]), (
            f"correlation: expected a string of at most {MAX_CORRELATION} bytes or an integer"
        )
    return ReplyRoute(obj["reply_to"], echo=corr, has_echo=True), None


def malformed_code(code: str) -> bool:
    """Return whether an error code means the request itself was malformed."""
    return code in (ErrorCode.BAD_REQUEST, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.TOO_LARGE)
