#!/usr/bin/env python3
"""A python-zeroconf responder in its own process, driven by JSON lines on stdin.

Usage: zc_peer.py --iface ADDR [--iface ADDR ...]
Interfaces are required, so nothing reaches a real network by default.

Commands (one JSON object a line), each answered with one JSON line on stdout:
  {"op": "register", "id": "a", "type": "_ipp._tcp.local.", "name": "Printer A",
   "host": "printer-a.local.", "port": 631, "addresses": ["198.18.77.12"],
   "txt": {"key": "value", "flag": null} | "txt_hex": "<raw TXT wire bytes in hex>",
   "probe": false}
  {"op": "register_many", "items": [<register objects>]}
  {"op": "update", <same fields as register>}
  {"op": "unregister", "id": "a"}       -> goodbye packets
  {"op": "quit"}
Replies carry ``t``: the wall-clock time the first announcement packet was handed to
the kernel, so a benchmark can measure from the wire. SIGKILL leaves without goodbyes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from typing import Any

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf


def build_info(spec: dict[str, Any]) -> AsyncServiceInfo:
    type_ = spec.get("type", "_ipp._tcp.local.")
    props: bytes | dict[str, str | None]
    props = bytes.fromhex(spec["txt_hex"]) if "txt_hex" in spec else spec.get("txt", {})
    addrs = []
    for a in spec.get("addresses", []):
        fam = socket.AF_INET6 if ":" in a else socket.AF_INET
        addrs.append(socket.inet_pton(fam, a))
    return AsyncServiceInfo(
        type_,
        f"{spec['name']}.{type_}",
        addresses=addrs,
        port=int(spec.get("port", 631)),
        properties=props,
        server=spec.get("host"),
    )


class Peer:
    def __init__(self, ifaces: list[str]) -> None:
        self.azc = AsyncZeroconf(interfaces=ifaces, ip_version=IPVersion.V4Only)
        self.infos: dict[str, AsyncServiceInfo] = {}
        self.sends: list[float] = []
        zc = self.azc.zeroconf
        original = zc.async_send

        def timed_send(*args: Any, **kw: Any) -> None:
            self.sends.append(time.time())  # as the packet is handed to the kernel
            original(*args, **kw)

        zc.async_send = timed_send  # type: ignore[method-assign]
        self.background: set[asyncio.Task[Any]] = set()

    async def first_send_after(self, mark: int, timeout: float = 5.0) -> float | None:
        deadline = time.monotonic() + timeout
        while len(self.sends) <= mark and time.monotonic() < deadline:
            await asyncio.sleep(0)
            if len(self.sends) <= mark:
                await asyncio.sleep(0.0005)
        return self.sends[mark] if len(self.sends) > mark else None

    def _keep(self, task: Any) -> None:
        fut = asyncio.ensure_future(task)
        self.background.add(fut)
        fut.add_done_callback(self.background.discard)

    async def register(self, spec: dict[str, Any]) -> None:
        info = build_info(spec)
        self.infos[spec["id"]] = info
        task = await self.azc.async_register_service(
            info, cooperating_responders=not spec.get("probe", False)
        )
        self._keep(task)

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "register":
            mark = len(self.sends)
            await self.register(cmd)
            return {"ok": True, "op": op, "id": cmd["id"], "t": await self.first_send_after(mark)}
        if op == "register_many":
            mark = len(self.sends)
            await asyncio.gather(*(self.register(item) for item in cmd["items"]))
            return {
                "ok": True,
                "op": op,
                "n": len(cmd["items"]),
                "t": await self.first_send_after(mark),
            }
        if op == "update":
            info = build_info(cmd)
            self.infos[cmd["id"]] = info
            mark = len(self.sends)
            self._keep(await self.azc.async_update_service(info))
            return {"ok": True, "op": op, "id": cmd["id"], "t": await self.first_send_after(mark)}
        if op == "unregister":
            info = self.infos.pop(cmd["id"])
            mark = len(self.sends)
            task = await self.azc.async_unregister_service(info)
            t = await self.first_send_after(mark)
            await task
            return {"ok": True, "op": op, "id": cmd["id"], "t": t}
        if op == "ping":
            return {"ok": True, "op": op, "t": time.time()}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def close(self) -> None:
        for task in list(self.background):
            await task
        for info in list(self.infos.values()):
            await (await self.azc.async_unregister_service(info))
        await self.azc.async_close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iface", action="append", required=True)
    args = p.parse_args()
    peer = Peer(args.iface)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ok": True, "op": "ready", "t": time.time()}), flush=True)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("op") == "quit":
                break
            try:
                reply = await peer.handle(cmd)
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        await peer.close()
        print(json.dumps({"ok": True, "op": "closed"}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
