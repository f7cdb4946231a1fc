"""Visibility policy: which clients may see a restricted device.

A zone, a static device or a pin in a site map may carry ``visible_to``: a list of
zone ids and CIDR prefixes. Each distinct list becomes a *rule* with its own bit. A
device is restricted by the rule of its own feature (static device or pin) and by
the rule of the zone it is placed in; a client sees it only when it satisfies every
such rule. A client satisfies a rule when its zone is named in it, when its address
lies in one of its prefixes, or (for a request located by zone only) when every
subnet of its zone lies inside those prefixes.

Both sides are bit masks, so the index filters with one ``&`` per candidate:
``entry.restrict & ~client_mask == 0``. The prefix side is one longest-prefix
lookup: each stored prefix carries the bits of every rule prefix that contains it,
so the longest match already holds the bits of all shorter ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pytricia

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``visible_to`` list: the zones and prefixes that may see what it guards."""

    bit: int
    zones: frozenset[str]
    networks: tuple[Network, ...]

    def describe(self) -> str:
        """Return the rule as written, for operators."""
        return ", ".join(sorted(self.zones) + [str(n) for n in self.networks])


def parse_visible_to(value: object) -> tuple[list[str], list[Network], str | None]:
    """Split a ``visible_to`` property into zone ids and networks, or return a problem."""
    if not isinstance(value, list) or not value:
        return [], [], "expected a non-empty list of zone ids and CIDR prefixes"
    zones: list[str] = []
    nets: list[Network] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            return [], [], "expected a non-empty list of zone ids and CIDR prefixes"
        if "/" in item or ":" in item or item.replace(".", "").isdigit():
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                return [], [], f"{item!r} is neither a zone id nor a CIDR prefix"
        else:
            zones.append(item)
    return zones, nets, None


@dataclass(slots=True)
class VisibilityPolicy:
    """Rules from the site maps, with the masks clients and devices are checked by."""

    rules: tuple[Rule, ...] = ()
    zone_restrict: dict[str, int] = field(default_factory=dict)
    device_restrict: dict[str, int] = field(default_factory=dict)
    zone_sees: dict[str, int] = field(default_factory=dict)
    _v4: pytricia.PyTricia | None = None
    _v6: pytricia.PyTricia | None = None

    @property
    def active(self) -> bool:
        """Return whether any rule exists (otherwise every device is public)."""
        return bool(self.rules)

    def client_mask(self, zone_id: str | None, ip: str | None) -> int:
        """Return the bits of every rule a client satisfies."""
        if not self.rules:
            return 0
        mask = self.zone_sees.get(zone_id, 0) if zone_id is not None else 0
        if ip is not None and self._v4 is not None and self._v6 is not None:
            if ":" not in ip:
                bits = self._v4.get(ip)
            elif ip.lower().startswith("::ffff:") and "." in ip:
                bits = self._v4.get(ip[7:])
            else:
                bits = self._v6.get(ip)
            if bits:
                mask |= bits
        return mask

    def restriction(self, zone_id: str | None, rule_bits: int) -> int:
        """Return the bits a device must be seen through: its own rule and its zone's."""
        if not self.rules:
            return 0
        return rule_bits | (self.zone_restrict.get(zone_id, 0) if zone_id is not None else 0)

    def rule_text(self, mask: int) -> list[str]:
        """Return the rules of a mask as text, for the inventory view."""
        return [r.describe() for r in self.rules if mask >> r.bit & 1]


class PolicyBuilder:
    """Collects ``visible_to`` lists and assigns one bit per distinct list."""

    def __init__(self) -> None:
        self._rules: dict[tuple[frozenset[str], tuple[Network, ...]], Rule] = {}
        self.zone_rules: dict[str, int] = {}
        self.device_rules: dict[str, int] = {}

    def add(self, zones: Iterable[str], nets: Iterable[Network]) -> int:
        """Return the bit mask of a rule, creating the rule the first time it is seen."""
        key = (frozenset(zones), tuple(sorted(set(nets), key=lambda n: (n.version, n))))
        rule = self._rules.get(key)
        if rule is None:
            rule = Rule(len(self._rules), key[0], key[1])
            self._rules[key] = rule
        return 1 << rule.bit

    def build(self, zone_subnets: Mapping[str, Sequence[str]]) -> VisibilityPolicy:
        """Return the policy for zones with the given subnets."""
        rules = tuple(self._rules.values())
        if not rules:
            return VisibilityPolicy()
        zone_sees: dict[str, int] = {}
        for zid, subnets in zone_subnets.items():
            nets = [ipaddress.ip_network(s, strict=False) for s in subnets]
            mask = 0
            for r in rules:
                if zid in r.zones or (
                    nets
                    and r.networks
                    and all(
                        any(n.version == rn.version and n.subnet_of(rn) for rn in r.networks)  # type: ignore[arg-type]
                        for n in nets
                    )
                ):
                    mask |= 1 << r.bit
            if mask:
                zone_sees[zid] = mask
        v4 = pytricia.PyTricia(32)
        v6 = pytricia.PyTricia(128)
        prefixes = [(n, r.bit) for r in rules for n in r.networks]
        for net, _ in prefixes:
            bits = 0
            for other, bit in prefixes:
                if other.version == net.version and net.subnet_of(other):  # type: ignore[arg-type]
                    bits |= 1 << bit
            (v4 if net.version == 4 else v6)[str(net)] = bits
        return VisibilityPolicy(
            rules=rules,
            zone_restrict=dict(self.zone_rules),
            device_restrict=dict(self.device_rules),
            zone_sees=zone_sees,
            _v4=v4,
            _v6=v6,
        )
