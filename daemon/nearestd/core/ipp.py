"""A small IPP codec (RFC 8010): encode Get-Printer-Attributes, decode its response.

Why not pyipp's parser: it reads lengths as signed 16-bit numbers and moves its
offset by them, so a 19-byte response with a negative name length loops forever
on the event loop (reproduced with pyipp 0.17.2). This decoder reads unsigned
lengths, checks every length against the bytes that remain, bounds the number of
attributes, values and collection depth, and raises ``IppDecodeError`` naming the
offset and what was wrong. It keeps only what the poller reads: the printer group's
attributes as tuples of ints, bools, strings or None (out-of-band values such as
``unknown``, and syntaxes it does not use).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

GET_PRINTER_ATTRIBUTES = 0x000B

# Delimiter tags (RFC 8010 §3.5.1).
TAG_OPERATION = 0x01
TAG_JOB = 0x02
TAG_END = 0x03
TAG_PRINTER = 0x04
TAG_UNSUPPORTED_GROUP = 0x05
# Value tags (RFC 8010 §3.5.2).
TAG_INTEGER = 0x21
TAG_BOOLEAN = 0x22
TAG_ENUM = 0x23
TAG_OCTET_STRING = 0x30
TAG_BEGIN_COLLECTION = 0x34
TAG_TEXT_WITH_LANGUAGE = 0x35
TAG_NAME_WITH_LANGUAGE = 0x36
TAG_END_COLLECTION = 0x37
TAG_TEXT = 0x41
TAG_NAME = 0x42
TAG_KEYWORD = 0x44
TAG_URI = 0x45
TAG_CHARSET = 0x47
TAG_LANGUAGE = 0x48
TAG_MEMBER_NAME = 0x4A
TAG_EXTENSION = 0x7F

_STRING_TAGS = frozenset(range(0x41, 0x4A)) | {TAG_OCTET_STRING}

Value = int | bool | str | None

MAX_ATTRIBUTES = 2048
MAX_VALUES = 1024
MAX_DEPTH = 8


class IppDecodeError(ValueError):
    """A peer's IPP response is malformed; the message says where and why."""


@dataclass(frozen=True, slots=True)
class IppResponse:
    """A decoded response: status, request id and the printer group's attributes."""

    version: tuple[int, int]
    status: int
    request_id: int
    printer: dict[str, tuple[Value, ...]] = field(default_factory=dict)
    operation: dict[str, tuple[Value, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Return whether the status is successful-ok or one of its variants."""
        return self.status < 0x0100


def _attr(tag: int, name: str, value: bytes) -> bytes:
    raw_name = name.encode("ascii")
    if len(raw_name) > 0xFFFF or len(value) > 0xFFFF:
        raise ValueError(f"IPP attribute {name!r}: value longer than 65535 bytes")
    return struct.pack(">BH", tag, len(raw_name)) + raw_name + struct.pack(">H", len(value)) + value


def encode_get_printer_attributes(
    printer_uri: str,
    request_id: int,
    attributes: Sequence[str],
    user: str = "nearestd",
    version: tuple[int, int] = (1, 1),
) -> bytes:
    """Return a Get-Printer-Attributes request asking for ``attributes`` explicitly."""
    if not 1 <= request_id <= 0x7FFFFFFF:
        raise ValueError(f"request_id: expected 1..2147483647, got {request_id}")
    if not attributes:
        raise ValueError("attributes: expected at least one attribute name")
    out = bytearray(
        struct.pack(">BBHI", version[0], version[1], GET_PRINTER_ATTRIBUTES, request_id)
    )
    out.append(TAG_OPERATION)
    out += _attr(TAG_CHARSET, "attributes-charset", b"utf-8")
    out += _attr(TAG_LANGUAGE, "attributes-natural-language", b"en")
    out += _attr(TAG_URI, "printer-uri", printer_uri.encode("utf-8"))
    out += _attr(TAG_NAME, "requesting-user-name", user.encode("utf-8"))
    out += _attr(TAG_KEYWORD, "requested-attributes", attributes[0].encode("ascii"))
    for name in attributes[1:]:
        out += _attr(TAG_KEYWORD, "", name.encode("ascii"))
    out.append(TAG_END)
    return bytes(out)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise IppDecodeError(
                f"offset {self.pos}: {what} needs {n} bytes, only {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")


def _decode_value(tag: int, raw: bytes, at: int) -> Value:
    if tag in (TAG_INTEGER, TAG_ENUM):
        if len(raw) != 4:
            raise IppDecodeError(f"offset {at}: integer or enum value of {len(raw)} bytes, not 4")
        return int.from_bytes(raw, "big", signed=True)
    if tag == TAG_BOOLEAN:
        if len(raw) != 1 or raw[0] > 1:
            raise IppDecodeError(f"offset {at}: boolean value must be one byte 0 or 1")
        return raw[0] == 1
    if tag in _STRING_TAGS:
        return raw.decode("utf-8", "replace")
    if tag in (TAG_TEXT_WITH_LANGUAGE, TAG_NAME_WITH_LANGUAGE):
        r = _Reader(raw)
        r.take(r.u16("language length"), "language")
        text = r.take(r.u16("text length"), "text")
        if r.pos != len(raw):
            raise IppDecodeError(f"offset {at}: textWithLanguage value has trailing bytes")
        return text.decode("utf-8", "replace")
    # Out-of-band values (0x10-0x1f: unknown, no-value, ...) and syntaxes not used here.
    return None


def _short(data: bytes, pos: int, n: int, what: str) -> IppDecodeError:
    return IppDecodeError(f"offset {pos}: {what} needs {n} bytes, only {len(data) - pos} left")


def decode_response(
    data: bytes,
    max_attributes: int = MAX_ATTRIBUTES,
    max_values: int = MAX_VALUES,
) -> IppResponse:
    """Decode an IPP response; raise IppDecodeError on anything malformed or too large."""
    # Offsets are kept in locals rather than a reader object: this runs once per poll, and
    # the method calls were most of its cost.
    size = len(data)
    if size < 8:
        r = _Reader(data)
        r.u8("version")
        r.u8("version")
        r.take(2, "status-code")
        r.take(4, "request-id")
    major, minor, status, request_id = _HEADER.unpack_from(data)
    if major not in (1, 2):
        raise IppDecodeError(f"offset 0: unsupported IPP version {major}.{minor}")
    groups: dict[int, dict[str, list[Value]]] = {TAG_PRINTER: {}, TAG_OPERATION: {}}
    seen_groups: set[int] = set()
    group: dict[str, list[Value]] | None = None
    in_group = False
    have_name = False
    values: list[Value] | None = None
    count = 0
    pos = 8
    while True:
        at = pos
        if pos >= size:
            raise _short(data, pos, 1, "tag (no end-of-attributes tag)")
        tag = data[pos]
        pos += 1
        if tag == TAG_END:
            break
        if tag < 0x10:
            # A second printer group (not sent for Get-Printer-Attributes) is ignored.
            group = groups.get(tag) if tag not in seen_groups else None
            seen_groups.add(tag)
            in_group = True
            have_name = False
            values = None
            continue
        if not in_group:
            raise IppDecodeError(f"offset {at}: attribute before any attribute group")
        if tag == TAG_EXTENSION:
            if pos + 4 > size:
                raise _short(data, pos, 4, "extension tag")
            pos += 4
        if pos + 2 > size:
            raise _short(data, pos, 2, "name length")
        name_len = (data[pos] << 8) | data[pos + 1]
        pos += 2
        if pos + name_len > size:
            raise _short(data, pos, name_len, "name")
        name_at = pos
        pos += name_len
        if pos + 2 > size:
            raise _short(data, pos, 2, "value length")
        value_len = (data[pos] << 8) | data[pos + 1]
        pos += 2
        if pos + value_len > size:
            raise _short(data, pos, value_len, "value")
        raw = data[pos : pos + value_len]
        pos += value_len
        count += 1
        if count > max_attributes:
            raise IppDecodeError(f"offset {at}: more than {max_attributes} attribute values")
        if tag == TAG_BEGIN_COLLECTION:
            r = _Reader(data)
            r.pos = pos
            _skip_collection(r)
            pos = r.pos
            value: Value = None
        elif tag in (TAG_END_COLLECTION, TAG_MEMBER_NAME):
            raise IppDecodeError(f"offset {at}: collection member outside a collection")
        elif tag in _STRING_TAGS:
            value = raw.decode("utf-8", "replace")
        else:
            value = _decode_value(tag, raw, at)
        if name_len:
            have_name = True
            key = data[name_at : name_at + name_len].decode("utf-8", "replace")
            if group is None or key in group:
                values = None
            else:
                values = group[key] = []
        elif not have_name:
            raise IppDecodeError(f"offset {at}: additional value without an attribute name")
        if values is not None:
            if len(values) >= max_values:
                raise IppDecodeError(f"offset {at}: more than {max_values} values in one attribute")
            values.append(value)
    return IppResponse(
        (major, minor),
        status,
        request_id,
        {k: tuple(v) for k, v in groups[TAG_PRINTER].items()},
        {k: tuple(v) for k, v in groups[TAG_OPERATION].items()},
    )


_HEADER = struct.Struct(">BBHI")


def _skip_collection(r: _Reader) -> None:
    """Skip a collection's members up to its matching endCollection."""
    depth = 1
    while depth:
        at = r.pos
        tag = r.u8("collection member tag")
        if tag < 0x10:
            raise IppDecodeError(f"offset {at}: collection not closed before a group tag")
        if tag == TAG_EXTENSION:
            r.take(4, "extension tag")
        r.take(r.u16("name length"), "name")
        r.take(r.u16("value length"), "value")
        if tag == TAG_BEGIN_COLLECTION:
            depth += 1
            if depth > MAX_DEPTH:
                raise IppDecodeError(f"offset {at}: collections nested deeper than {MAX_DEPTH}")
        elif tag == TAG_END_COLLECTION:
            depth -= 1
