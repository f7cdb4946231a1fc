"""Rogue devices: a discovered service that claims a pinned identity from the wrong place.

mDNS is unauthenticated: anyone on the LAN can announce a printer with the instance
name, host name or UUID that a site-map pin gives to a trusted device, and would then
be answered as that device. A pin therefore also says where its device may announce
from: the pin's ``subnets`` property, else the subnets of the zone the pin sits in.
A discovered device that matches a pin by identity is accepted only when at least
one of its addresses lies inside those networks and every other address does too
(link-local addresses aside, since every host has them). Otherwise it is
quarantined: kept aside with the reason, never indexed or answered. A pin whose
zone has no subnets and which names none cannot be checked, so it is trusted as
before; ``nearestd --check`` users should give such pins ``subnets``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from nearestd.core.discovery import Parsed
from nearestd.core.model import Device, DeviceKind
from nearestd.core.sitemap import Pin, SiteMap, normalise_pin

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IDENTITY_KEYS = ("uuid", "name", "host")
PIN_ORDER = ("uuid", "name", "host", "ip")
QUARANTINE_MAX = 512


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A device refused because of a pin's address rule, with why and when."""

    device: Device
    reason: str
    first_seen: float
    last_seen: float


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _identity(device: Device, key: str) -> str | None:
    value = {"uuid": device.uuid, "name": device.instance, "host": device.host}[key]
    return normalise_pin(key, value) if value else None


def find_pin(device: Device, sitemap: SiteMap) -> Pin | None:
    """Return the pin that places a device (uuid, then name, host, ip), if any."""
    pins = sitemap.pins
    if not pins:
        return None
    for key in PIN_ORDER:
        if key == "ip":
            addrs = [a for a in (_address(t) for t in device.addresses) if a is not None]
            for pin in pins:
                if (
                    pin.field == "ip"
                    and pin.network is not None
                    and any(a.version == pin.network.version and a in pin.network for a in addrs)
                ):
                    return pin
            continue
        value = _identity(device, key)
        if value is None:
            continue
        for pin in pins:
            if pin.field == key and pin.value == value:
                return pin
    return None


def expected_networks(pin: Pin, sitemap: SiteMap) -> Sequence[Network]:
    """Return where a pinned device may announce from; empty when nothing says."""
    if pin.expect:
        return pin.expect
    zone = sitemap.zones.get(pin.placement.zone) if pin.placement.zone else None
    if zone is None:
        return ()
    return tuple(ipaddress.ip_network(s, strict=False) for s in zone.subnets)


def quarantine_reason(device: Device, sitemap: SiteMap) -> str | None:
    """Return why a discovered device must be quarantined, or None to accept it."""
    if device.source == "static":
        return None
    conflict = dict(device.extra).get("conflict")
    if isinstance(conflict, str) and conflict:
        return conflict  # another host's UUID (see core.discovery.Merger)
    if not sitemap.pins:
        return None
    for key in IDENTITY_KEYS:
        value = _identity(device, key)
        if value is None:
            continue
        for pin in sitemap.pins:
            if pin.field != key or pin.value != value:
                continue
            nets = expected_networks(pin, sitemap)
            if not nets:
                continue
            if not _inside(device.addresses, nets):
                shown = ", ".join(device.addresses[:4]) or "no address"
                where = ", ".join(str(n) for n in nets[:4])
                return (
                    f"claims the {key} of the device pinned by {pin.feature} in "
                    f"{pin.source.rsplit('/', 1)[-1]} from {shown}, outside {where}"
                )
    return None


def _inside(addresses: Sequence[str], nets: Sequence[Network]) -> bool:
    """Return whether some address is inside and every routable one is."""
    some = False
    for text in addresses:
        addr = _address(text)
        if addr is None:
            continue
        if any(addr.version == n.version and addr in n for n in nets):
            some = True
        elif not addr.is_link_local:
            return False
    return some


def service_is_suspect(parsed: Parsed, sitemap: SiteMap) -> bool:
    """Return whether one discovered service claims a pinned identity from the wrong place.

    The merger keeps such a service out of the real device's group; a service with no
    address yet is not judged (it is judged again once resolved).
    """
    rec = parsed.record
    if not sitemap.pins or parsed.kind is None or not rec.addresses:
        return False
    return quarantine_reason(_probe(parsed, parsed.kind), sitemap) is not None


def service_is_pinned(parsed: Parsed, sitemap: SiteMap) -> bool:
    """Return whether a discovered service matches a site-map pin (by uuid, name, host or ip)."""
    if not sitemap.pins or parsed.kind is None:
        return False
    return find_pin(_probe(parsed, parsed.kind), sitemap) is not None


def _probe(parsed: Parsed, kind: DeviceKind) -> Device:
    """Return a stand-in device carrying what a service shows of its identity."""
    rec = parsed.record
    return Device(
        id="",
        kind=kind,
        name="",
        uri="",
        source="mdns",
        uuid=parsed.uuid,
        instance=rec.instance,
        host=rec.host,
        addresses=tuple(rec.addresses),
    )
