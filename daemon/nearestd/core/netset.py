"""Sets of CIDR prefixes with fast membership tests (allow lists, trusted peers)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import pytricia


class NetSet:
    """A set of IPv4 and IPv6 prefixes; ``contains`` takes an address string."""

    def __init__(
        self, cidrs: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network]
    ) -> None:
        self._v4 = pytricia.PyTricia(32)
        self._v6 = pytricia.PyTricia(128)
        self.cidrs: tuple[str, ...] = ()
        kept = []
        for cidr in cidrs:
            # Networks come parsed from the config; text (tests, the client) is parsed here.
            net = normalise_network(
                ipaddress.ip_network(cidr, strict=False) if isinstance(cidr, str) else cidr
            )
            (self._v4 if net.version == 4 else self._v6)[str(net)] = True
            kept.append(str(net))
        self.cidrs = tuple(kept)

    def contains(self, ip: str) -> bool:
        """Return whether a valid address lies in one of the prefixes."""
        if ":" not in ip:
            return self._v4.get(ip) is not None
        low = ip.lower()
        if low.startswith("::ffff:") and "." in low:
            return self._v4.get(low[7:]) is not None
        return self._v6.get(ip) is not None


def normalise_peer(ip: str) -> str:
    """Return a socket peer address without scope id, IPv4-mapped addresses as IPv4."""
    ip = ip.split("%", 1)[0]
    low = ip.lower()
    if low.startswith("::ffff:") and "." in low:
        return low[7:]
    return ip


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def normalise_network(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Return an IPv4-mapped IPv6 prefix (``::ffff:10.0.0.0/104``) as IPv4 (``10.0.0.0/8``).

    Peers are matched as IPv4 (``normalise_peer``), so a mapped entry would never match.
    """
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net
