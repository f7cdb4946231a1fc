"""The fast path for plain IPv4 CIDRs agrees with ipaddress on every string it accepts."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core.sitemap import _canonical_v4, _canonical_v6

OCTET = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "010", "-1", ""]))
CIDR = st.builds(
    lambda a, b, c, d, n: f"{a}.{b}.{c}.{d}/{n}",
    OCTET,
    OCTET,
    OCTET,
    OCTET,
    st.one_of(st.integers(0, 40).map(str), st.sampled_from(["08", "", "x"])),
)


@given(st.one_of(CIDR, st.text(max_size=20)))
def test_fast_path_accepts_only_what_ipaddress_accepts_unchanged(text: str) -> None:
    fast = _canonical_v4(text)
    if fast is None:
        return  # ipaddress decides, and its message is shown
    assert fast == str(ipaddress.ip_network(text, strict=True))


def test_typical_prefixes_take_the_fast_path() -> None:
    for cidr in ("10.0.0.0/8", "10.20.30.0/24", "0.0.0.0/0", "192.168.1.128/25", "1.2.3.4/32"):
        assert _canonical_v4(cidr) == cidr
    for cidr in ("10.20.99.1/24", "010.0.0.0/8", "10.0.0.0/33", "::1/128", " 10.0.0.0/8"):
        assert _canonical_v4(cidr) is None


HEXTET = st.one_of(
    st.just("0"),
    st.integers(0, 0xFFFF).map(lambda v: f"{v:x}"),
    st.integers(0, 0xFFFF).map(lambda v: f"{v:04X}"),
    st.sampled_from(["", "00000", "0x1", "1_0", " 1", "g", "٣", "ffff"]),
)


@st.composite
def v6_cidrs(draw: st.DrawFn) -> str:
    """Eight hextets (zeros likely), maybe one run written as '::', a prefix length.

    Mostly a network with its host bits clear, as IPAM exports hold: the hextets past the
    prefix length are zero, so the fast path gets as far as writing the canonical form.
    """
    kept = draw(st.integers(0, 8))
    groups = [draw(HEXTET) for _ in range(kept)] + ["0"] * (8 - kept)
    if draw(st.integers(0, 9)) == 0:  # sometimes too few or too many hextets
        groups = groups[: draw(st.integers(0, 8))] + draw(st.lists(HEXTET, max_size=2))
    if draw(st.booleans()) and len(groups) > 1:
        i = draw(st.integers(0, len(groups) - 1))
        j = draw(st.integers(i, len(groups)))
        left, right = ":".join(groups[:i]), ":".join(groups[j:])
        text = f"{left}::{right}"
    else:
        text = ":".join(groups)
    length = draw(
        st.one_of(
            st.just(str(16 * kept)),
            st.integers(0, 130).map(str),
            st.sampled_from(["064", "", "x"]),
        )
    )
    return f"{text}/{length}"


@settings(max_examples=3000)
@given(st.one_of(v6_cidrs(), st.text(alphabet="0123456789abcdefABCDEF:./%", max_size=45)))
def test_the_ipv6_fast_path_writes_what_ipaddress_writes(text: str) -> None:
    fast = _canonical_v6(text)
    if fast is None:
        return  # ipaddress decides, and its message is shown
    assert fast == str(ipaddress.ip_network(text, strict=True))


def test_typical_ipv6_prefixes_take_the_fast_path() -> None:
    cases = {
        "2001:db8:0:0::/64": "2001:db8::/64",
        "2001:DB8:0:1::/64": "2001:db8:0:1::/64",
        "::/0": "::/0",
        "fe80:0:0:0:0:0:0:0/10": "fe80::/10",
        "1:0:0:2:0:0:0:3/128": "1:0:0:2::3/128",
        "1:2:3:4:5:6:7::/128": "1:2:3:4:5:6:7:0/128",
    }
    for text, canonical in cases.items():
        assert _canonical_v6(text) == canonical == str(ipaddress.ip_network(text))
    for text in ("2001:db8::1/64", "1::2::3/64", "::ffff:10.0.0.0/104", "fe80::%eth0/64", "::/129"):
        assert _canonical_v6(text) is None
