"""A raw mDNS announcer: DNS response packets built by hand (struct), so names can be wrong.

python-zeroconf and avahi refuse to announce a name with a control byte, an over-long
label or an empty one; a hostile host on the LAN does not ask them. This builds the
packets byte by byte (RFC 1035 section 4, RFC 6762) and sends them to 224.0.0.251:5353
from port 5353 of one address, so use it only inside a test namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Sequence

MDNS = ("224.0.0.251", 5353)
TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_AAAA, TYPE_SRV = 1, 12, 16, 28, 33
CLASS_IN, CACHE_FLUSH = 1, 0x8000


def wire_name(labels: Sequence[bytes]) -> bytes:
    """Return labels as a DNS name, each prefixed by its length byte as given (no checks)."""
    return b"".join(bytes([len(label) & 0xFF]) + label for label in labels) + b"\x00"


def rr(name: bytes, rtype: int, rdata: bytes, ttl: int = 120, flush: bool = True) -> bytes:
    """Return one resource record."""
    rclass = CLASS_IN | (CACHE_FLUSH if flush else 0)
    return name + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def txt_rdata(strings: Sequence[bytes]) -> bytes:
    """Return TXT rdata: length-prefixed strings (one empty string when there are none)."""
    return b"".join(bytes([len(s)]) + s for s in strings) or b"\x00"


def announcement(
    instance: Sequence[bytes],
    addresses: Sequence[str],
    port: int = 631,
    txt: Sequence[bytes] = (b"txtvers=1", b"rp=ipp/print"),
    service: Sequence[bytes] = (b"_ipp", b"_tcp", b"local"),
    host: Sequence[bytes] = (b"raw-host", b"local"),
    ttl: int = 120,
) -> bytes:
    """Return one response packet announcing a service: PTR, SRV, TXT and address records.

    ``instance`` is the instance name's labels, given raw (so a label may be empty, hold
    any byte, or be longer than 63 bytes).
    """
    type_name = wire_name(service)
    full = wire_name([*instance, *service])
    target = wire_name(host)
    records = [
        rr(type_name, TYPE_PTR, full, ttl, flush=False),
        rr(full, TYPE_SRV, struct.pack(">HHH", 0, 0, port) + target, ttl),
        rr(full, TYPE_TXT, txt_rdata(txt), ttl),
    ]
    for addr in addresses:
        ip = ipaddress.ip_address(addr)
        records.append(rr(target, TYPE_A if ip.version == 4 else TYPE_AAAA, ip.packed, ttl))
    header = struct.pack(">HHHHHH", 0, 0x8400, 0, len(records), 0, 0)
    return header + b"".join(records)


class RawAnnouncer:
    """A UDP socket on port 5353 of one address; create it inside the host's namespace."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        self.sock.bind(("0.0.0.0", 5353))

    def send(self, packet: bytes) -> None:
        """Send one packet to the mDNS group."""
        self.sock.sendto(packet, MDNS)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
