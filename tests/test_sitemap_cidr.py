"""The fast path for plain IPv4 CIDRs agrees with ipaddress on every string it accepts."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from nearestd.core.sitemap import _canonical_v4

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
