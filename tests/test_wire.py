"""The wire codec and request schema: exact codes and messages naming the field."""

from __future__ import annotations

import struct

import msgpack
import pytest

from nearest_wire import (
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    NearestRequest,
    Need,
    WireError,
    decode_payload,
    encode_frame,
    encode_payload,
    parse_request,
)


def test_decoder_splits_pipelined_and_partial_frames() -> None:
    frames = b"".join(encode_frame({"v": 1, "id": i, "op": "ping"}) for i in range(5))
    dec = FrameDecoder()
    got: list[bytes | FrameTooLarge] = []
    for i in range(0, len(frames), 3):
        got += dec.feed(frames[i : i + 3])
    assert [decode_payload(g)["id"] for g in got if isinstance(g, bytes)] == [0, 1, 2, 3, 4]
    assert dec.pending == 0


def test_decoder_refuses_oversized_header_once() -> None:
    dec = FrameDecoder(max_frame=100)
    out = dec.feed(struct.pack(">I", 2**32 - 1) + b"junk")
    assert out == [FrameTooLarge(2**32 - 1, 100)]
    assert dec.feed(b"more") == []


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "empty frame"),
        (b"\xc1", "malformed MessagePack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"a": 1}) + b"\x01", "more than one MessagePack object"),
        (msgpack.packb({"s": "x" * 4097}), "string longer than 4096 bytes"),
        (b"\xdd\xff\xff\xff\xff", "more than 1024 items"),
        (msgpack.packb({"a": [[[[[[[[[1]]]]]]]]]}), "nesting deeper than 8"),
        (b"\x91" * 10000 + b"\x00", "malformed MessagePack"),
    ],
)
def test_decode_payload_errors(payload: bytes, fragment: str) -> None:
    with pytest.raises(WireError) as ei:
        decode_payload(payload)
    assert ei.value.code is ErrorCode.BAD_REQUEST
    assert fragment in ei.value.message


def test_parse_nearest_full() -> None:
    req = parse_request(
        {
            "v": 1,
            "id": 7,
            "op": "nearest",
            "kind": "printer",
            "k": 3,
            "need": {"color": True, "paper": "A3", "state": "any"},
            "client_ip": "::ffff:10.1.2.3",
        }
    )
    assert req == NearestRequest(
        id=7,
        kind="printer",
        k=3,
        need=Need(color=True, paper="tabloid-A3", any_state=True),
        client_ip="10.1.2.3",
    )


@pytest.mark.parametrize(
    ("obj", "code", "fragment", "rid"),
    [
        ({"v": 1, "op": "ping"}, "bad-request", "id: missing", None),
        ({"v": 1, "id": "x", "op": "ping"}, "bad-request", "id: expected an integer", None),
        ({"v": 1, "id": 2**64, "op": "ping"}, "bad-request", "id: expected an integer", None),
        ({"v": 1, "id": -(2**63) - 1, "op": "ping"}, "bad-request", "id: expected an int", None),
        ({"id": 1, "op": "ping"}, "bad-request", "v: missing", 1),
        ({"v": 2, "id": 1, "op": "ping"}, "unsupported-version", "version 2", 1),
        ({"v": "1", "id": 1, "op": "ping"}, "bad-request", "v: expected the integer 1", 1),
        ({"v": 1, "id": 1}, "bad-request", "op: expected a string", 1),
        ({"v": 1, "id": 1, "op": "print"}, "bad-request", "op: unknown operation 'print'", 1),
        ({"v": 1, "id": 1, "op": "ping", "x": 1}, "bad-request", "x: unknown field", 1),
        (
            {"v": 1, "id": 1, "op": "nearest"},
            "bad-request",
            "kind: expected 'printer' or 'scanner'",
            1,
        ),
        ({"v": 1, "id": 1, "op": "nearest", "kind": "fax"}, "bad-request", "kind: expected", 1),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "k": 0},
            "bad-request",
            "k: expected an integer from 1 to 20",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "k": 21},
            "bad-request",
            "k: expected",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "k": True},
            "bad-request",
            "k: expected",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "need": []},
            "bad-request",
            "need: expected a map",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "need": {"color": 1}},
            "bad-request",
            "need.color: expected true or false",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "need": {"paper": "A5"}},
            "bad-request",
            "need.paper: expected one of",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "need": {"staple": True}},
            "bad-request",
            "need.staple: unknown capability",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "need": {"state": "up"}},
            "bad-request",
            "need.state: expected",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "client_ip": "10.0.0.300"},
            "bad-request",
            "client_ip: not an IPv4 or IPv6 address",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "client_ip": 17},
            "bad-request",
            "client_ip: expected an IP address string",
            1,
        ),
        (
            {"v": 1, "id": 1, "op": "locate", "zone": ""},
            "bad-request",
            "zone: expected a non-empty string",
            1,
        ),
        ({"v": 1, "id": 1, "op": "devices", "kind": "plotter"}, "bad-request", "kind: expected", 1),
        ({"v": 1, "id": 1, "op": "privacy.export"}, "bad-request", "ip: missing", 1),
        (
            {"v": 1, "id": 1, "op": "privacy.erase", "ip": "nope"},
            "bad-request",
            "ip: not an IPv4 or IPv6 address",
            1,
        ),
    ],
)
def test_parse_request_errors(obj: dict, code: str, fragment: str, rid: int | None) -> None:  # type: ignore[type-arg]
    with pytest.raises(WireError) as ei:
        parse_request(obj)
    assert str(ei.value.code) == code
    assert fragment in ei.value.message
    assert ei.value.request_id == rid


@pytest.mark.parametrize("rid", [-1, 0, -(2**63), 2**63 - 1, 2**63, 2**64 - 1])
def test_any_id_messagepack_carries_is_accepted(rid: int) -> None:
    """The contract's `id: int`: every int64 and uint64, negative ones included."""
    req = parse_request(decode_payload(encode_payload({"v": 1, "id": rid, "op": "ping"})))
    assert req.id == rid
    with pytest.raises(WireError) as ei:
        parse_request({"v": 1, "id": rid, "op": "nope"})
    assert ei.value.request_id == rid
