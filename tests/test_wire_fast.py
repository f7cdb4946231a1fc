"""msgspec's fast paths decide nothing on their own: same requests, same bytes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nearest_wire import NearestRequest, WireError, decode_payload, encode_frame, parse_request
from nearest_wire.fast import FastFrameEncoder, fast_nearest
from test_wire_fastpaths import request_maps


def slow(payload: bytes) -> Any:
    try:
        return parse_request(decode_payload(payload))
    except WireError as exc:
        return ("error", exc.message)


def agree(payload: bytes, every: bool = True) -> None:
    # Fast accepts only what the plain path accepts, as the same value; with ``every``, it
    # accepts every such request (not so with duplicate keys, which it leaves to the rest).
    fast = fast_nearest(payload)
    plain = slow(payload)
    if isinstance(plain, NearestRequest) and (every or fast is not None):
        assert fast is not None, plain
        assert (fast, repr(fast), hash(fast)) == (plain, repr(plain), hash(plain))
        assert [type(getattr(fast, f)) for f in fast.__slots__] == [
            type(getattr(plain, f)) for f in plain.__slots__
        ]
    else:
        assert fast is None, (fast, plain)


@settings(max_examples=3000, deadline=None)
@given(request_maps)
def test_fast_nearest_accepts_exactly_what_parse_request_accepts(obj: dict[str, Any]) -> None:
    try:
        payload = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError):
        assume(False)
    agree(payload)


def raw_map(*pairs: tuple[bytes, bytes]) -> bytes:
    """A MessagePack map written by hand (duplicate keys, odd encodings)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def s(text: str) -> bytes:
    return msgpack.packb(text)  # type: ignore[no-any-return]


BASE = (
    (s("v"), b"\x01"),
    (s("id"), b"\x07"),
    (s("op"), s("nearest")),
    (s("kind"), s("printer")),
)


@pytest.mark.parametrize(
    "payload",
    [
        raw_map(*BASE),
        raw_map(*BASE) + b"\xc0",  # trailing data
        raw_map(*BASE, (s("k"), b"\x02"), (s("k"), b"\x15")),  # duplicate key, last invalid
        raw_map(*BASE, (s("k"), b"\x15"), (s("k"), b"\x02")),  # duplicate key, last valid
        raw_map((s("v"), b"\xc3"), *BASE[1:]),  # v is true
        raw_map(BASE[0], (s("id"), b"\xcf" + b"\xff" * 8), *BASE[2:]),  # uint64 max
        raw_map(BASE[0], (s("id"), b"\xd3\x80" + b"\x00" * 7), *BASE[2:]),  # int64 min
        raw_map(*BASE[:3], (s("kind"), b"\xc4\x07printer")),  # kind as binary
        raw_map(*BASE, (s("need"), b"\x80")),  # empty need
        raw_map(*BASE, (s("need"), b"\x81" + s("paper") + b"\xc0")),  # need.paper nil
        raw_map(*BASE, (b"\x01", b"\x01")),  # integer key
        raw_map(*BASE, (s("client_ip"), s("::ffff:10.0.0.1"))),
        raw_map(*BASE, (s("client_ip"), s("fe80::1%eth0"))),
        raw_map(*BASE, (s("zone"), s("z" * 128))),
        raw_map(*BASE, (s("zone"), s("é" * 128))),
        raw_map(*BASE, (s("zone"), s("z" * 129))),
        raw_map(*BASE, (s("k"), b"\xcb" + b"\x3f\xf0" + b"\x00" * 6)),  # k = 1.0
        raw_map(*BASE, (s("k"), b"\xd7\xff" + b"\x00" * 8)),  # k is a timestamp
        b"",
        b"\x90",
    ],
)
def test_fast_nearest_on_hand_written_payloads(payload: bytes) -> None:
    agree(payload, every=False)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.text(max_size=8), values, max_size=8))
def test_fast_encoder_writes_the_same_bytes(obj: dict[str, Any]) -> None:
    assert FastFrameEncoder().encode(obj) == encode_frame(obj)


def test_fast_encoder_at_every_length_and_width_boundary() -> None:
    ints = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]
    ints += [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
    sizes = [0, 15, 16, 31, 32, 255, 256, 65535, 65536]
    obj: dict[str, Any] = {
        "ints": ints,
        "floats": [0.0, -0.0, 1.5, 1e308, float("inf")],
        "strs": ["x" * n for n in sizes],
        "bins": [b"x" * n for n in sizes],
        "lists": [list(range(n)) for n in (15, 16, 65536)],
        "maps": [{str(i): i for i in range(n)} for n in (15, 16, 65536)],
    }
    assert FastFrameEncoder().encode(obj) == encode_frame(obj)
