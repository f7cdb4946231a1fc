"""The wire codec's per-request shortcuts answer exactly as the plain definitions do.

``check_ip`` takes IPv4 and IPv6 through ``inet_pton`` instead of ``ipaddress``; the
nesting check recurses into containers only, and answers the usual request shape
without recursing; a need is looked up among the valid ones; ``parse_request`` accepts
the usual values by their exact types and builds its NearestRequest through the slots.
All of them run on every request.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearest_wire import NearestRequest, Need, decode_payload, encode_payload, framing, schema
from nearest_wire.errors import ErrorCode, WireError
from nearest_wire.framing import MAX_DEPTH, _depth_ok, _request_depth_ok
from nearest_wire.schema import check_ip, parse_request


def reference_ip(value: str) -> str:
    """The definition: what ``ipaddress`` makes of the string (IPv4 only here)."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return "error"
    assert isinstance(addr, ipaddress.IPv4Address)
    return str(addr)


def reference_depth(obj: Any, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    if isinstance(obj, dict):
        return all(
            reference_depth(v, depth + 1) and reference_depth(k, depth + 1) for k, v in obj.items()
        )
    if isinstance(obj, list):
        return all(reference_depth(v, depth + 1) for v in obj)
    return True


def checked(value: str) -> str:
    try:
        return check_ip(value, "client_ip", 1)
    except WireError as exc:
        assert exc.message == "client_ip: not an IPv4 or IPv6 address"
        return "error"


octet = st.one_of(
    st.integers(0, 300).map(str),
    st.integers(0, 300).map(lambda n: f"0{n}"),
    st.sampled_from(["", "00", "0x1", "-1", "+1", " 1", "1 ", "٣", "²", "1e1", "\uff11"]),
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(octet, min_size=1, max_size=6).map(".".join))
def test_ipv4_fast_path_equals_ipaddress(value: str) -> None:
    assert checked(value) == reference_ip(value)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789. x\n\x00٣", max_size=20).filter(lambda s: ":" not in s))
def test_ipv4_fast_path_on_any_text(value: str) -> None:
    assert checked(value) == reference_ip(value)


def test_ipv4_edges() -> None:
    for value in ("0.0.0.0", "255.255.255.255", "10.0.0.1"):
        assert checked(value) == value
    for value in ("01.2.3.4", "1.2.3.256", "1.2.3", "1.2.3.4.", "1.2.3.4\x00", "1.2.3.4 "):
        assert checked(value) == "error"
    assert checked("::ffff:10.0.0.1") == "10.0.0.1"


nested: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.integers(), st.text(max_size=3), st.none()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=2), children, max_size=3),
    ),
    max_leaves=40,
)


@settings(max_examples=1500, deadline=None)
@given(nested)
def test_depth_check_equals_definition(obj: Any) -> None:
    assert _depth_ok(obj, 1) == reference_depth(obj, 1)


def test_depth_check_edges() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    assert _depth_ok(deep, 1)  # the scalar sits at MAX_DEPTH
    assert not _depth_ok([deep], 1)
    empty: Any = []
    for _ in range(MAX_DEPTH - 1):
        empty = [empty]
    assert _depth_ok(empty, 1)  # an empty container at MAX_DEPTH holds nothing deeper
    assert not _depth_ok({"k": deep}, 1)


# ---- the request-shaped nesting check ------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3), st.binary(max_size=3)
)
flat_containers = st.one_of(
    st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=2), scalars, max_size=3)
)


class Dict(dict):  # type: ignore[type-arg]
    """A map the fast path does not recognise by its exact type."""


class List(list):  # type: ignore[type-arg]
    """An array the fast path does not recognise by its exact type."""


def deep_value(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=2),
        st.one_of(
            scalars,
            flat_containers,
            nested,
            st.integers(0, MAX_DEPTH + 1).map(deep_value),
            st.integers(0, MAX_DEPTH + 1).map(lambda d: Dict(k=deep_value(d))),
            st.integers(0, MAX_DEPTH + 1).map(lambda d: List([deep_value(d)])),
        ),
        max_size=4,
    )
)
def test_request_depth_check_equals_definition(obj: dict[str, Any]) -> None:
    assert _request_depth_ok(obj) == reference_depth(obj, 1)


def test_request_shape_takes_the_fast_path(monkeypatch: Any) -> None:
    def refuse(obj: Any, depth: int) -> bool:
        raise AssertionError("the full check ran")

    monkeypatch.setattr(framing, "_depth_ok", refuse)
    request = {
        "v": 1,
        "op": "nearest",
        "kind": "printer",
        "k": 1,
        "need": {"color": True, "paper": "A4"},
        "client_ip": "10.1.2.3",
        "id": 7,
        "list": [1, 2.5, None, b"x", "y", True],
        "empty": {},
    }
    assert _request_depth_ok(request)
    assert decode_payload(encode_payload(request)) == request


def test_request_depth_check_edges() -> None:
    assert MAX_DEPTH >= 3  # the fast path's premise: a scalar at level 3 is always allowed
    assert _request_depth_ok({})
    # The map is level 1, so a value's scalar n arrays down sits at level 2 + n.
    assert _request_depth_ok({"a": deep_value(MAX_DEPTH - 2)})
    assert not _request_depth_ok({"a": deep_value(MAX_DEPTH - 1)})
    assert _request_depth_ok({"a": {"b": deep_value(MAX_DEPTH - 3)}})
    assert not _request_depth_ok({"a": {"b": deep_value(MAX_DEPTH - 2)}})
    assert not _request_depth_ok({"a": Dict(b=deep_value(MAX_DEPTH - 2))})
    assert _request_depth_ok({"a": List([deep_value(MAX_DEPTH - 3)])})
    assert not _request_depth_ok({"a": List([deep_value(MAX_DEPTH - 2)])})


# ---- IPv6 through inet_pton and inet_ntop -----------------------------------------------


def reference_any_ip(value: str) -> str:
    """The definition: what ``ipaddress`` makes of the string, as check_ip words it."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return "error"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if addr.scope_id is not None:
            return str(ipaddress.IPv6Address(value.split("%", 1)[0]))
    return str(addr)


hextet = st.one_of(
    st.just(0), st.just(0), st.integers(0, 0xFFFF), st.sampled_from([1, 0xFFFF, 0xA, 0x100])
)


@st.composite
def ipv6_text(draw: st.DrawFn) -> str:
    """IPv6 text in the forms people and programs write, some of them wrong."""
    words = draw(st.lists(hextet, min_size=8, max_size=8))
    if draw(st.booleans()):
        words[:5] = [0] * 5
        words[5] = draw(st.sampled_from([0, 0xFFFF, 1]))
    groups = [
        draw(st.sampled_from(["{:x}", "{:X}", "{:04x}", "{:01x}", "0{:x}"])).format(w)
        for w in words
    ]
    if draw(st.booleans()):  # an IPv4 suffix, sometimes a wrong one
        octets = [words[6] >> 8, words[6] & 255, words[7] >> 8, words[7] & 255]
        text = ".".join(str(o) for o in octets)
        groups[6:] = [draw(st.sampled_from([text, text + ".1", "0" + text, "1.2.3"]))]
    if draw(st.booleans()):  # write a run of groups, maybe none, as '::'
        start = draw(st.integers(0, len(groups)))
        stop = draw(st.integers(start, len(groups)))
        text = ":".join(groups[:start]) + "::" + ":".join(groups[stop:])
    else:
        text = ":".join(groups)
    return text + draw(st.sampled_from(["", "", "", "%eth0", "%1", ":", ":1"]))


@settings(max_examples=4000, deadline=None)
@given(ipv6_text())
def test_ipv6_fast_path_equals_ipaddress(value: str) -> None:
    assert checked(value) == reference_any_ip(value)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEFg:.%", min_size=1, max_size=45))
def test_ipv6_fast_path_on_any_text(value: str) -> None:
    assert checked(value) == reference_any_ip(value)


@settings(max_examples=1000, deadline=None)
@given(st.ip_addresses(v=6))
def test_ipv6_fast_path_on_every_address(addr: ipaddress.IPv6Address) -> None:
    for text in (str(addr), addr.exploded, addr.exploded.upper()):
        assert checked(text) == reference_any_ip(text)


def test_ipv6_edges() -> None:
    for value in (
        "::",
        "::1",
        "1::",
        "::ffff:10.0.0.1",
        "::ffff:0:0",
        "::ffff:0.0.0.0",
        "::10.0.0.1",
        "::0.0.0.1",
        "::1:2:3:4:5:6:7",
        "1:2:3:4:5:6:7::",
        "1:0:0:2:0:0:0:3",
        "0:0:1:0:0:1:0:0",
        "1:0:2:0:3:0:4:0",
        "2001:DB8::0001",
        "fe80::1%eth0",
        "64:ff9b::10.0.0.1",
        "1:2:3:4:5:6:1.2.3.4",
        ":::",
        "1:::2",
        "1::2::3",
        ":1::2",
        "1::2:",
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4::5:6:7:8",
        "::01.2.3.4",
        "::1.2.3.4.5",
        "12345::",
        "::g",
        "::1\x00",
        "::\ud800",
        "::\u0661",
    ):
        assert checked(value) == reference_any_ip(value), value


# ---- needs from the table of valid ones ---------------------------------------------


def need_outcome(fn: Any, value: object) -> Any:
    try:
        need = fn(value, 5)
    except WireError as exc:
        return ("error", str(exc.code), exc.message, exc.request_id)
    except TypeError as exc:
        return ("TypeError", str(exc))
    assert isinstance(need, Need)
    return ("ok", need, hash(need), repr(need))


def reference_need(value: object, rid: int | None) -> Need:
    return Need() if value is None else schema._parse_need(value, rid)


class Str(str):
    """A string the fast path does not recognise by its exact type."""

    __slots__ = ()


need_keys = st.sampled_from(
    ["color", "duplex", "adf", "secure", "paper", "state", "staple", "", b"color"]
).map(lambda k: Str(k) if k == "adf" else k)
need_values = st.one_of(
    st.booleans(),
    st.sampled_from([0, 1, 0.0, 1.0, None, [], "A4", "A3", "letter", "A2", "A5", "any", "up"]),
    st.sampled_from(["available", "tabloid", "legal"]).map(Str),
)


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.dictionaries(need_keys, need_values, max_size=6),
        st.dictionaries(need_keys, need_values, max_size=6).map(Dict),
        st.sampled_from([None, [], "color", 1, True]),
    )
)
def test_need_equals_definition(value: object) -> None:
    assert need_outcome(schema._need, value) == need_outcome(reference_need, value)


def test_every_valid_need_has_its_value() -> None:
    papers = [None, *schema.PAPER_NEEDS]
    for flags in range(16):
        for paper in papers:
            for state in (None, "any", "available"):
                value: dict[str, Any] = {
                    f: bool(flags & 1 << i) for i, f in enumerate(schema.NEED_FLAGS)
                }
                value |= {"paper": paper} if paper is not None or flags & 1 else {}
                value |= {"state": state} if state is not None else {}
                assert need_outcome(schema._need, value) == need_outcome(reference_need, value)


def test_need_equal_values_of_other_types_are_still_refused() -> None:
    assert schema._need({"color": True}, 1) == Need(color=True)
    for bad in (1, 1.0, 0, 0.0):
        with pytest.raises(WireError) as ei:
            schema._need({"color": bad}, 1)
        assert ei.value.message == f"need.color: expected true or false, got {type(bad).__name__}"


# ---- parse_request against its plain definition ---------------------------------------


def reference_check_ip(value: object, field: str, rid: int | None) -> str:
    if not isinstance(value, str) or len(value) > 64:
        return schema.check_ip(value, field, rid)  # raises: both checks precede the fast paths
    text = reference_any_ip(value)
    if text == "error":
        raise WireError(ErrorCode.BAD_REQUEST, f"{field}: not an IPv4 or IPv6 address", rid)
    return text


def reference_parse(obj: dict[str, Any], extra_keys: frozenset[str]) -> Any:
    """parse_request as it read before its fast paths."""
    bad = schema._bad
    rid = schema.request_id(obj)
    if "id" not in obj:
        raise bad("id: missing; expected an integer", None)
    if rid is None:
        raise bad(f"id: expected an integer from {schema.MIN_ID} to {schema.MAX_ID}", None)
    v = obj.get("v")
    if v is None:
        raise bad("v: missing; expected 1", rid)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"v: expected the integer 1, got {schema._type_name(v)}", rid)
    if v != schema.VERSION:
        raise WireError(
            ErrorCode.UNSUPPORTED_VERSION, f"v: version {v} is not supported; this is 1", rid
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise bad(f"op: expected a string, got {schema._type_name(op)}", rid)
    allowed = schema._ALLOWED.get(op)
    if allowed is None:
        ops = ", ".join(schema.PUBLIC_OPS + schema.ADMIN_OPS)
        raise bad(f"op: unknown operation {op[:40]!r}; expected one of {ops}", rid)
    for key in obj:
        if key not in allowed and key not in extra_keys:
            raise bad(f"{str(key)[:40]}: unknown field for op {op!r}", rid)
    client_ip = obj.get("client_ip")
    if client_ip is not None:
        client_ip = reference_check_ip(client_ip, "client_ip", rid)
    if op == "nearest":
        k = obj.get("k", 1)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= schema.MAX_K:
            raise bad(f"k: expected an integer from 1 to {schema.MAX_K}", rid)
        kind = schema._kind(obj.get("kind"), rid, required=True)
        assert kind is not None
        return NearestRequest(
            id=rid,
            kind=kind,
            k=k,
            need=reference_need(obj.get("need"), rid),
            client_ip=client_ip,
            zone=schema._opt_str(obj, "zone", rid),
        )
    return "other op"  # the other ops' code is unchanged


class Int(int):
    """An integer the fast paths do not recognise by its exact type."""


def parse_outcome(fn: Any, obj: dict[str, Any], extra_keys: frozenset[str]) -> Any:
    try:
        req = fn(obj, extra_keys)
    except WireError as exc:
        return ("error", str(exc.code), exc.message, exc.request_id)
    if not isinstance(req, NearestRequest):
        return "other op"
    return ("ok", req, hash(req), repr(req), [type(getattr(req, f)) for f in req.__slots__])


def parse(obj: dict[str, Any], extra_keys: frozenset[str]) -> Any:
    return parse_request(obj, extra_keys=extra_keys)


request_maps = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1, 1, 2, 0, True, 1.0, "1", None, Int(1)]),
        "id": st.one_of(
            st.integers(-2, 2**64),
            st.sampled_from(
                [True, 1.5, "7", None, Int(3), 2**63 - 1, 2**63, -1, 2**64 - 1, -(2**63), 2**64]
            ),
        ),
        "op": st.sampled_from(["nearest"] * 6 + ["ping", "locate", "x", 1, Str("nearest")]),
        "kind": st.sampled_from(["printer", "scanner", "fax", 1, None, Str("printer")]),
        "k": st.sampled_from([1, 0, 20, 21, -1, True, 1.0, "1", None, Int(2)]),
        "need": st.one_of(st.dictionaries(need_keys, need_values, max_size=4), need_values),
        "client_ip": st.one_of(
            st.ip_addresses().map(str), ipv6_text(), st.text(max_size=70), st.integers()
        ),
        "zone": st.one_of(st.none(), st.text(max_size=3), st.integers(), st.just("x" * 129)),
        "reply_to": st.text(max_size=3),
        "site": st.text(max_size=3),
    },
)


@settings(max_examples=3000, deadline=None)
@given(request_maps, st.sampled_from([frozenset(), frozenset(schema.TRANSPORT_KEYS)]))
def test_parse_request_equals_definition(obj: dict[str, Any], extra_keys: frozenset[str]) -> None:
    assert parse_outcome(parse, obj, extra_keys) == parse_outcome(reference_parse, obj, extra_keys)


def test_nearest_request_built_by_slots_is_the_dataclass() -> None:
    need = Need(color=True)
    fast = schema._nearest_request(7, "printer", 3, need, "10.0.0.1", None)
    plain = NearestRequest(id=7, kind="printer", k=3, need=need, client_ip="10.0.0.1")
    assert type(fast) is NearestRequest
    assert fast == plain
    assert hash(fast) == hash(plain)
    assert repr(fast) == repr(plain)
    assert dataclasses.astuple(fast) == dataclasses.astuple(plain)
    assert dataclasses.replace(fast, k=1) == dataclasses.replace(plain, k=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.k = 2  # type: ignore[misc]
