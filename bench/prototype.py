"""The prototype: bare LPM + one rtree nearest + MessagePack over an asyncio.Protocol.

The issue set the socket goal (>= 20,000 queries/s) from "a prototype doing LPM + rtree
nearest + MessagePack over an asyncio.Protocol", which reached about 25,000/s on the machine
it was measured on. This module is that prototype, rebuilt so that the resolver bench can
run it on the same machine in the same run as the daemon: a machine-speed reference for the
issue's figure, not a goal of its own.

Per request: unpack the MessagePack map, longest-prefix match its ``client_ip`` to a zone
(pytricia, a tree per address family), take the zone's representative point, ask ONE rtree
over every device's lon/lat (interleaved, bulk-loaded from a stream) for the nearest 1, and
reply ``{"v": 1, "id": id, "ok": True, "devices": [{"id": device_id}]}``. Frames are the
daemon's: a 4-byte big-endian length, then the MessagePack body. Replies to the frames of
one read are written together, as the daemon does. Nothing else: no kind, capability, floor
or building filter, no ranking, no validation, no rate limit, no cache, no location log.

The bench writes the world with ``write_world`` (prefixes, each zone's point inside it and
every device's position, from ``bench.gen``) and starts::

    python -m bench.prototype --port N --world-dir DIR

which prints ``ready`` once it listens on 127.0.0.1:N.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from pathlib import Path
from typing import Any

import msgpack

from bench import gen

WORLD_FILE = "prototype-world.msgpack"


def write_world(world: gen.World, directory: Path) -> Path:
    """Write what the prototype needs of ``world`` (prefixes, zone points, devices)."""
    data = {
        "prefixes": [[cidr, zid] for cidr, zid in world.prefixes],
        "zones": {z.id: [z.inside[0], z.inside[1]] for z in world.zones},
        "devices": [[d.id, d.lon, d.lat] for d in world.devices],
    }
    path = directory / WORLD_FILE
    path.write_bytes(msgpack.packb(data, use_bin_type=True))
    return path


class Resolver:
    """LPM to a zone, the zone's point, the nearest device in one rtree: nothing more."""

    def __init__(self, data: dict[str, Any]) -> None:
        import pytricia
        from rtree import index as rtree_index

        self.v4 = pytricia.PyTricia(32)
        self.v6 = pytricia.PyTricia(128)
        for cidr, zid in data["prefixes"]:
            (self.v6 if ":" in cidr else self.v4)[cidr] = zid
        self.points: dict[str, tuple[float, float]] = {
            zid: (p[0], p[1]) for zid, p in data["zones"].items()
        }
        devices = data["devices"]
        self.ids: list[str] = [d[0] for d in devices]
        self.tree = rtree_index.Index(
            ((i, (lon, lat, lon, lat), None) for i, (_, lon, lat) in enumerate(devices)),
            interleaved=True,
        )

    def nearest(self, ip: str) -> str | None:
        """Return the id of the device nearest the zone of ``ip``, or None."""
        zone = (self.v6 if ":" in ip else self.v4).get(ip)
        if zone is None:
            return None
        x, y = self.points[zone]
        for i in self.tree.nearest((x, y, x, y), 1):
            return self.ids[i]
        return None


class _Protocol(asyncio.Protocol):
    """Answer every complete frame of a read; write the replies together."""

    def __init__(self, resolver: Resolver) -> None:
        self.nearest = resolver.nearest
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = len(buf)
        pos = 0
        out: list[bytes] = []
        unpack, pack, nearest = msgpack.unpackb, msgpack.packb, self.nearest
        while end - pos >= 4:
            size = int.from_bytes(buf[pos : pos + 4], "big")
            if end - pos - 4 < size:
                break
            req = unpack(buf[pos + 4 : pos + 4 + size])
            pos += 4 + size
            device = nearest(req["client_ip"])
            body = pack(
                {
                    "v": 1,
                    "id": req.get("id"),
                    "ok": True,
                    "devices": [{"id": device}] if device is not None else [],
                },
                use_bin_type=True,
            )
            out.append(len(body).to_bytes(4, "big") + body)
        if pos:
            del buf[:pos]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(port: int, world_dir: Path) -> None:
    """Load the world, listen on 127.0.0.1:``port``, print ``ready`` and serve forever."""
    data = msgpack.unpackb((world_dir / WORLD_FILE).read_bytes())
    resolver = Resolver(data)
    del data
    # As the daemon does after loading: the loaded world is out of the cyclic
    # collector's reach, so a full collection does not land in the figures.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(resolver), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def run(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until killed."""
    p = argparse.ArgumentParser(prog="python -m bench.prototype", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--world-dir", type=Path, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.port, args.world_dir))
    return 0


if __name__ == "__main__":
    sys.exit(run())
