"""Helpers for the MQTT tests and bench: a real aiomqtt requester, status waits, split maps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from support import DEMO_MAP

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class Asker:
    """An application asking over MQTT: MQTT 5 with Response Topic, or 3.1.1 with reply_to."""

    def __init__(self, client: aiomqtt.Client, v311: bool) -> None:
        self.client = client
        self.v311 = v311
        self.reply_topic = f"replies/{uuid.uuid4().hex}"
        self.pending: dict[bytes, asyncio.Future[tuple[bytes, Any]]] = {}
        self.stray: list[tuple[bytes, Any]] = []
        self._n = 0
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else b""
            if self.v311:
                try:
                    key = str(json.loads(payload).get("correlation")).encode()
                except (ValueError, AttributeError):
                    key = b""
            else:
                key = getattr(m.properties, "CorrelationData", b"") or b""
            fut = self.pending.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result((payload, m.properties))
            else:
                self.stray.append((payload, m.properties))

    async def send(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str | None = None,
        response_topic: str | bool | None = True,
        qos: int = 1,
    ) -> asyncio.Future[tuple[bytes, Any]]:
        """Publish a raw request; return a future for its reply (MQTT 5 correlation)."""
        self._n += 1
        key = f"c{self._n}".encode()
        fut: asyncio.Future[tuple[bytes, Any]] = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        props = None
        if not self.v311:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is True:
                props.ResponseTopic = self.reply_topic
            elif isinstance(response_topic, str):
                props.ResponseTopic = response_topic
            props.CorrelationData = key
            if content_type:
                props.ContentType = content_type
        await self.client.publish(topic, payload, qos=qos, properties=props)
        return fut

    async def ask(
        self, topic: str, req: dict[str, Any], *, use_msgpack: bool = False, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send one request map and return the decoded reply."""
        if self.v311:
            self._n += 1
            corr = str(self._n)
            body = json.dumps({**req, "reply_to": self.reply_topic, "correlation": corr})
            fut: asyncio.Future[tuple[bytes, Any]] = asyncio.get_running_loop().create_future()
            self.pending[corr.encode()] = fut
            await self.client.publish(topic, body.encode(), qos=1)
        else:
            if use_msgpack:
                fut = await self.send(topic, msgpack.packb(req), content_type="application/msgpack")
            else:
                fut = await self.send(topic, json.dumps(req).encode())
        payload, props = await asyncio.wait_for(fut, timeout)
        if use_msgpack:
            assert getattr(props, "ContentType", None) == "application/msgpack"
            out: dict[str, Any] = msgpack.unpackb(payload, raw=False)
            return out
        return dict(json.loads(payload))


@contextlib.asynccontextmanager
async def asker(port: int, v311: bool = False) -> AsyncIterator[Asker]:
    """Connect an Asker to the broker on ``port``."""
    proto = aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5
    async with aiomqtt.Client("127.0.0.1", port, protocol=proto, socket_options=NODELAY) as client:
        a = Asker(client, v311)
        await client.subscribe(a.reply_topic, qos=1)
        a._reader = asyncio.create_task(a._read())
        try:
            yield a
        finally:
            a._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await a._reader


async def retained(port: int, topic: str, settle: float = 0.5) -> dict[str, bytes]:
    """Return the retained messages under ``topic`` (a filter), read for ``settle`` seconds."""
    out: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle):
                async for m in c.messages:
                    if m.retain:
                        out[m.topic.value] = (
                            bytes(m.payload) if isinstance(m.payload, bytes) else b""
                        )
    return out


async def wait_payload(port: int, topic: str, expected: bytes, timeout: float = 10.0) -> float:
    """Wait until ``topic`` carries ``expected`` (retained or live); return the seconds waited."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for m in c.messages:
                if m.payload == expected:
                    return loop.time() - t0
    raise AssertionError("unreachable")


def split_map(directory: Path, buildings: set[str]) -> Path:
    """Write the demo map keeping only the static devices in ``buildings``."""
    doc = json.loads(DEMO_MAP.read_text())
    feats = []
    for f in doc["features"]:
        p = f["properties"]
        if p.get("feature_type") == "device" and p.get("static") and p["building"] not in buildings:
            continue
        feats.append(f)
    doc["features"] = feats
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"campus-{'-'.join(sorted(buildings)) or 'none'}.geojson"
    path.write_text(json.dumps(doc))
    return path


def flood(
    port: int,
    topic: str,
    n: int,
    request: dict[str, Any],
    response_topic: str | None,
    rotate: bool = False,
) -> float:
    """Publish ``n`` QoS-0 requests from one MQTT 5 client as fast as paho can; return the seconds.

    With ``response_topic`` None the requests are 3.1.1-style, naming ``reply_to`` in the body;
    with ``rotate`` each request names a reply topic of its own (``response_topic/<i>``).
    Blocking (paho's own network thread): run it in a thread next to an asyncio test.
    """
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        t0 = time.monotonic()
        info = None
        for i in range(n):
            props = Properties(PacketTypes.PUBLISH)
            body = {**request, "id": i}
            if response_topic is None:
                body["reply_to"] = "flood/replies"
            else:
                props.ResponseTopic = f"{response_topic}/{i}" if rotate else response_topic
                props.CorrelationData = str(i).encode()
            info = client.publish(topic, json.dumps(body).encode(), qos=0, properties=props)
        if info is not None:
            info.wait_for_publish(timeout=120)
        return time.monotonic() - t0
    finally:
        client.disconnect()
        client.loop_stop()


def flood_process(
    port: int, topic: str, n: int, request: dict[str, Any], response_topic: str | None, rotate: bool
) -> Any:
    """Run :func:`flood` in a child process (no GIL shared with the caller); it prints the seconds.

    Returns the ``subprocess.Popen``; read ``float(proc.communicate()[0])`` once it exits.
    """
    import subprocess
    import sys

    args = json.dumps([port, topic, n, request, response_topic, rotate])
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from mqtt_helpers import flood; "
        "print(flood(*json.loads(sys.argv[2])))"
    )
    here = str(Path(__file__).resolve().parent)
    return subprocess.Popen(
        [sys.executable, "-c", code, here, args], stdout=subprocess.PIPE, text=True
    )
