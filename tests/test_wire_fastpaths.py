"""The wire codec's per-request shortcuts answer exactly as the plain definitions do.

``check_ip`` takes IPv4 through ``inet_pton`` instead of ``ipaddress``; the nesting
check recurses into containers only. Both run on every request.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nearest_wire.errors import WireError
from nearest_wire.framing import MAX_DEPTH, _depth_ok
from nearest_wire.schema import check_ip


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
