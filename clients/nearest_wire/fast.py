"""msgspec on the hot path: decode a valid ``nearest`` payload and encode reply frames.

Measured on the resolver's query (bench notes in ``docs/wire.md``): msgspec decodes and
checks a ``nearest`` request in about 0.8 µs where msgpack plus ``parse_request`` take
about 5 µs, and encodes a reply map in half the time of msgpack's Packer, to the same
bytes. Its error messages are its own, though, and the contract's are compared byte for
byte; so msgspec only ever accepts. A payload it refuses, for whatever reason, goes
through ``decode_payload`` and ``parse_request``, which decide and word every error; a
payload it accepts is one they accept with the same result (``tests/test_wire_fast.py``
checks that claim on generated maps).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from nearest_wire.errors import WireError
from nearest_wire.framing import HEADER
from nearest_wire.schema import (
    _ANY_STATE,
    _FLAG_BITS,
    _NEEDS,
    _PAPER_CODES,
    MAX_K,
    MAX_ZONE_LEN,
    NearestRequest,
    Need,
    _nearest_request,
    check_ip,
)

_Paper = Literal["A4", "letter", "legal", "A3", "tabloid", "A2"]


class _Need(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    color: bool = False
    duplex: bool = False
    adf: bool = False
    secure: bool = False
    paper: _Paper | None = None
    state: Literal["any", "available"] | None = None


class _Nearest(msgspec.Struct, forbid_unknown_fields=True):
    # Every field as parse_request accepts it, narrower where that is simpler: anything
    # outside these types takes the full path, which then accepts or words the error.
    v: Literal[1]
    id: int
    op: Literal["nearest"]
    kind: Literal["printer", "scanner"]
    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_K)] = 1
    need: _Need | None = None
    client_ip: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    zone: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ZONE_LEN)] | None = None


_decode = msgspec.msgpack.Decoder(_Nearest).decode
_FLAGS = tuple(_FLAG_BITS.items())


def _need_value(need: _Need | None) -> Need:
    """Return the shared Need that ``parse_request`` gives for this need map."""
    code = 0
    if need is not None:
        for flag, bit in _FLAGS:
            if getattr(need, flag):
                code |= bit
        if need.paper is not None:
            code |= _PAPER_CODES[need.paper]
        if need.state == "any":
            code |= _ANY_STATE
    return _NEEDS[code]


# Every decoded need (a frozen Struct, so hashable) to its value: at most 2^4 x 7 x 3 keys.
_need_values: dict[_Need | None, Need] = {}


def fast_nearest(payload: bytes) -> NearestRequest | None:
    """Return the ``nearest`` request a payload holds, or None: then ask ``parse_request``."""
    try:
        msg = _decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    need = _need_values.get(msg.need)
    if need is None:
        need = _need_values[msg.need] = _need_value(msg.need)
    client_ip = msg.client_ip
    if client_ip is not None:
        try:
            client_ip = check_ip(client_ip, "client_ip", msg.id)
        except WireError:
            return None
    return _nearest_request(msg.id, msg.kind, msg.k, need, client_ip, msg.zone)


class FastFrameEncoder:
    """Encode maps as frames with msgspec: the same bytes as ``encode_frame``, faster."""

    def __init__(self) -> None:
        self._encode = msgspec.msgpack.Encoder().encode

    def encode(self, obj: dict[str, Any]) -> bytes:
        """Return ``encode_frame(obj)``."""
        body = self._encode(obj)
        return HEADER.pack(len(body)) + body
