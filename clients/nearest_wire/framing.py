"""Length-prefixed MessagePack frames: a 4-byte big-endian length, then one map.

The decoder is sans-I/O: feed it bytes, take complete payloads out. Decoding applies
explicit limits (string, container and nesting sizes) so a small frame can never ask
for a large allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from nearest_wire.errors import ErrorCode, WireError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024
MAX_STR = 4096
MAX_ITEMS = 1024
MAX_DEPTH = 8  # at least 3: _request_depth_ok relies on it


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A header announced more bytes than the limit; the stream cannot be resynchronised."""

    declared: int
    limit: int


class FrameDecoder:
    """Split a byte stream into frame payloads without copying more than needed."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._failed: FrameTooLarge | None = None

    @property
    def pending(self) -> int:
        """Return how many buffered bytes belong to an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | FrameTooLarge]:
        """Add received bytes; return the complete payloads and at most one final failure."""
        if self._failed is not None:
            return []
        self._buf += data
        out: list[bytes | FrameTooLarge] = []
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self.max_frame:
                self._failed = FrameTooLarge(size, self.max_frame)
                out.append(self._failed)
                self._buf = bytearray()
                return out
            if end - pos - 4 < size:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out


_CONTAINERS = (dict, list)
# What msgpack decodes besides maps and arrays (exact types: a subclass takes the slow path).
_SCALARS = frozenset((str, int, bool, float, bytes, type(None)))


def _depth_ok(obj: Any, depth: int) -> bool:
    # Recurse into containers only: a scalar fails only by sitting deeper than MAX_DEPTH,
    # that is, inside a non-empty container at MAX_DEPTH. Map keys are never looked at:
    # a dict's keys are hashable, so never a map or an array.
    if depth > MAX_DEPTH:
        return False
    if isinstance(obj, dict):
        items: Any = obj.values()
    elif isinstance(obj, list):
        items = obj
    else:
        return True
    if items and depth == MAX_DEPTH:
        return False
    for v in items:  # noqa: SIM110 (all() over a generator is slower)
        if isinstance(v, _CONTAINERS) and not _depth_ok(v, depth + 1):
            return False
    return True


def _request_depth_ok(obj: dict[str, Any]) -> bool:
    """Return ``_depth_ok(obj, 1)``, answering the usual request shape without recursion.

    That shape is a map whose values are scalars, or maps and arrays of scalars: nothing
    sits deeper than level 3, which MAX_DEPTH allows. Anything else takes the full check.
    """
    for v in obj.values():
        t = type(v)
        if t is dict:
            for x in v.values():
                if type(x) not in _SCALARS:
                    return _depth_ok(obj, 1)
        elif t is list:
            for x in v:
                if type(x) not in _SCALARS:
                    return _depth_ok(obj, 1)
        elif t not in _SCALARS:
            return _depth_ok(obj, 1)
    return True


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Decode one frame payload into a map, or raise WireError(bad-request)."""
    if not payload:
        raise WireError(ErrorCode.BAD_REQUEST, "empty frame: expected a MessagePack map")
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR,
            max_bin_len=MAX_STR,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise WireError(
            ErrorCode.BAD_REQUEST, "frame holds more than one MessagePack object"
        ) from None
    except (ValueError, msgpack.UnpackException, RecursionError, TypeError) as exc:
        raise WireError(ErrorCode.BAD_REQUEST, f"malformed MessagePack: {_why(exc)}") from None
    if not isinstance(obj, dict):
        raise WireError(ErrorCode.BAD_REQUEST, f"frame holds {_msgpack_type(obj)}, expected a map")
    if not _request_depth_ok(obj):
        raise WireError(ErrorCode.BAD_REQUEST, f"nesting deeper than {MAX_DEPTH} levels")
    return obj


def _msgpack_type(obj: object) -> str:
    """Name a decoded value by its MessagePack type, for error messages."""
    for typ, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (bytes, "binary data"),
        (list, "an array"),
    ):
        if isinstance(obj, typ):
            return name
    return "nil" if obj is None else "a value of another type"


def _why(exc: BaseException) -> str:
    if isinstance(exc, msgpack.FormatError):
        return "invalid data (a reserved or unknown type byte)"
    if isinstance(exc, msgpack.StackError):
        return f"nesting deeper than {MAX_DEPTH} levels"
    text = str(exc) or type(exc).__name__
    if "exceeds max_str_len" in text or "exceeds max_bin_len" in text:
        return f"string longer than {MAX_STR} bytes"
    if "exceeds max_array_len" in text or "exceeds max_map_len" in text:
        return f"array or map with more than {MAX_ITEMS} items"
    if "ext" in text and "max_ext_len" in text:
        return "extension types are not accepted"
    if "depth" in text.lower() or isinstance(exc, (RecursionError, msgpack.StackError)):
        return f"nesting deeper than {MAX_DEPTH} levels"
    if "Unpack failed" in text or "incomplete" in text.lower() or "insufficient" in text.lower():
        return "truncated or invalid data"
    return text[:200]


def decode_reply(payload: bytes) -> dict[str, Any]:
    """Decode a reply from a trusted daemon: larger limits than for requests."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, max_ext_len=0)
    except (ValueError, msgpack.UnpackException, RecursionError, TypeError) as exc:
        raise WireError(ErrorCode.BAD_REQUEST, f"malformed MessagePack: {_why(exc)}") from None
    if not isinstance(obj, dict):
        raise WireError(ErrorCode.BAD_REQUEST, "reply is not a map")
    return obj


def encode_payload(obj: dict[str, Any]) -> bytes:
    """Encode one map as MessagePack."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def encode_frame(obj: dict[str, Any]) -> bytes:
    """Encode one map as a length-prefixed frame."""
    body = encode_payload(obj)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Frames out of a byte stream for a client: feed what arrives, take whole payloads."""

    def __init__(self, max_frame: int) -> None:
        self._decoder = FrameDecoder(max_frame)
        self._ready: list[bytes] = []

    def feed(self, data: bytes) -> None:
        """Add received bytes; raise FrameTooLargeError if a header announces too much."""
        for item in self._decoder.feed(data):
            if isinstance(item, FrameTooLarge):
                raise FrameTooLargeError(item.declared, item.limit)
            self._ready.append(item)

    def next(self) -> bytes | None:
        """Return the oldest whole payload, or None when more bytes are needed."""
        return self._ready.pop(0) if self._ready else None


class FrameTooLargeError(Exception):
    """A frame header announced more bytes than the reader accepts."""

    def __init__(self, declared: int, limit: int) -> None:
        super().__init__(f"frame of {declared} bytes exceeds the limit of {limit} bytes")
        self.declared = declared
        self.limit = limit
