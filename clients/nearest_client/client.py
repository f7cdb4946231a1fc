"""Blocking and asyncio clients of the nearestd wire protocol."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from nearest_wire import (
    DEFAULT_LIMIT,
    DevicesReply,
    DevicesRequest,
    DeviceView,
    ErrorReply,
    FrameReader,
    FrameTooLargeError,
    LocateReply,
    LocateRequest,
    NearestReply,
    NearestRequest,
    Need,
    Reply,
    ReplyError,
    Request,
    decode_reply,
    encode_frame,
    parse_reply,
)
from nearest_wire.errors import WireError

DEFAULT_SOCKET = "/run/nearestd/nearestd.sock"
DEFAULT_TCP = "tcp://127.0.0.1:7310"
CLIENT_CONFIG = "/etc/nearest/client.toml"
MAX_REPLY = 16 * 1024 * 1024


class ClientError(Exception):
    """Base of the client's errors."""


class Unreachable(ClientError):
    """The daemon could not be reached, or closed the connection."""


class ServerError(ClientError):
    """The daemon answered with an error map."""

    def __init__(self, code: str, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply or {}


def default_server(
    env: dict[str, str] | None = None, config_file: str | None = None
) -> tuple[str, str]:
    """Return (server URL, where it came from): env, client.toml, default socket, loopback TCP.

    The client config is ``$NEAREST_CLIENT_CONFIG`` or /etc/nearest/client.toml; a missing
    file is skipped, a broken one raises ClientError naming the file and the problem.
    """
    env = dict(os.environ) if env is None else env
    if env.get("NEAREST_SERVER"):
        try:
            parse_url(env["NEAREST_SERVER"])
        except ClientError as exc:
            raise ClientError(f"NEAREST_SERVER: {exc}") from None
        return env["NEAREST_SERVER"], "NEAREST_SERVER"
    config_file = config_file or env.get("NEAREST_CLIENT_CONFIG") or CLIENT_CONFIG
    try:
        with open(config_file, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        data = {}
    except OSError as exc:
        raise ClientError(f"cannot read {config_file}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClientError(f"{config_file}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"server"})
    if unknown:
        raise ClientError(f"{config_file}: unknown key {unknown[0]!r} (known: server)")
    server = data.get("server")
    if server is not None:
        if not isinstance(server, str) or not server.startswith(("unix://", "tcp://")):
            raise ClientError(
                f"{config_file}: server: expected a string tcp://HOST:PORT or unix:///PATH"
            )
        parse_url(server)
        return server, config_file
    if Path(DEFAULT_SOCKET).exists():
        return f"unix://{DEFAULT_SOCKET}", "default socket"
    return DEFAULT_TCP, "default TCP port"


def parse_url(url: str) -> tuple[str, Any]:
    """Return ('unix', path) or ('tcp', (host, port)) for a server URL."""
    if url.startswith("unix://"):
        path = url[7:]
        if not path:
            raise ClientError(f"bad server URL {url!r}: expected unix:///PATH")
        return "unix", path
    if url.startswith("tcp://"):
        host, _, port = url[6:].rpartition(":")
        if not host.strip("[]") or not port.isascii() or not port.isdigit():
            raise ClientError(f"bad server URL {url!r}: expected tcp://HOST:PORT")
        if not 1 <= int(port) <= 65535:
            raise ClientError(f"bad server URL {url!r}: port must be from 1 to 65535")
        return "tcp", (host.strip("[]"), int(port))
    raise ClientError(f"bad server URL {url!r}: expected tcp://HOST:PORT or unix:///PATH")


def nearest_request(
    kind: str, need: Need | None = None, k: int = 1, client_ip: str | None = None
) -> dict[str, Any]:
    """Build a raw ``nearest`` request map (without id), for ``request``."""
    wire = NearestRequest(0, kind, k, need or Need(), client_ip).to_wire()
    return {key: value for key, value in wire.items() if key not in ("v", "id")}


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is True:
        return reply
    try:
        err = ErrorReply.from_wire(reply)
    except ReplyError:
        raise ClientError("malformed reply from the daemon") from None
    raise ServerError(err.code, err.message, reply)


def _typed(req: Request, reply: dict[str, Any]) -> Reply:
    """Return the typed reply to ``req``, or raise ServerError / ClientError."""
    if reply.get("id") not in (req.id, None):
        raise ClientError("reply id does not match the request")
    try:
        parsed = parse_reply(reply, req.op)
    except ReplyError as exc:
        raise ClientError(f"malformed reply: {exc}") from None
    if isinstance(parsed, ErrorReply):
        raise ServerError(parsed.code, parsed.message, reply)
    return parsed


R = TypeVar("R", bound=Reply)


def _expect(reply: Reply, typ: type[R]) -> R:
    assert isinstance(reply, typ)
    return reply


class Client:
    """A blocking client; one connection, requests answered in order."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._frames = FrameReader(MAX_REPLY)

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Open the connection (if not open yet)."""
        if self._sock is not None:
            return
        kind, addr = parse_url(self.url)
        try:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(addr)
            else:
                sock = socket.create_connection(addr, timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise Unreachable(
                f"cannot reach nearestd at {self.url}: {exc.strerror or exc}"
            ) from None
        self._sock = sock

    def close(self) -> None:
        """Close the connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def read_reply(self) -> dict[str, Any]:
        """Read one reply frame as a raw map."""
        assert self._sock is not None
        payload = self._frames.next()
        while payload is None:
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise Unreachable(
                    f"connection to {self.url} failed: {exc.strerror or exc}"
                ) from None
            if not chunk:
                raise Unreachable(f"nearestd at {self.url} closed the connection")
            _feed(self._frames, chunk)
            payload = self._frames.next()
        return _decode(payload)

    def _send(self, body: dict[str, Any]) -> None:
        self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(encode_frame(body))
        except OSError as exc:
            raise Unreachable(f"cannot send to {self.url}: {exc.strerror or exc}") from None

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one raw request map (without v and id); return the raw successful reply."""
        body = {"v": 1, "id": next(self._ids), **req}
        self._send(body)
        reply = self.read_reply()
        if reply.get("id") not in (body["id"], None):
            raise ClientError("reply id does not match the request")
        return _check(reply)

    def send(self, req: Request) -> Reply:
        """Send one typed request; return its typed reply, or raise ServerError."""
        self._send(req.to_wire())
        return _typed(req, self.read_reply())

    def next_id(self) -> int:
        """Return an id for the next request."""
        return next(self._ids)

    def nearest(
        self, kind: str, need: Need | None = None, k: int = 1, client_ip: str | None = None
    ) -> NearestReply:
        """Ask for the nearest devices."""
        req = NearestRequest(self.next_id(), kind, k, need or Need(), client_ip)
        return _expect(self.send(req), NearestReply)

    def locate(self, client_ip: str | None = None) -> LocateReply:
        """Ask where the daemon places this machine (or ``client_ip``)."""
        return _expect(self.send(LocateRequest(self.next_id(), client_ip)), LocateReply)

    def devices(
        self, kind: str | None = None, site: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Iterator[DeviceView]:
        """Yield the whole inventory (or one kind's or site's), a page per request."""
        cursor: str | None = None
        while True:
            req = DevicesRequest(self.next_id(), kind, site, limit=limit, cursor=cursor)
            page = _expect(self.send(req), DevicesReply)
            yield from page.devices
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


def _feed(frames: FrameReader, chunk: bytes) -> None:
    try:
        frames.feed(chunk)
    except FrameTooLargeError as exc:
        raise ClientError(f"reply of {exc.declared} bytes is too large") from None


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        return decode_reply(payload) if payload else {}
    except WireError as exc:
        raise ClientError(f"malformed reply: {exc.message}") from None


class AsyncClient:
    """An asyncio client; requests may be pipelined."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._frames = FrameReader(MAX_REPLY)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection."""
        kind, addr = parse_url(self.url)
        try:
            if kind == "unix":
                coro = asyncio.open_unix_connection(addr)
            else:
                coro = asyncio.open_connection(*addr)
            self._reader, self._writer = await asyncio.wait_for(coro, self.timeout)
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot reach nearestd at {self.url}: {exc}") from None

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        payload = self._frames.next()
        while payload is None:
            try:
                chunk = await asyncio.wait_for(self._reader.read(65536), self.timeout)
            except (OSError, TimeoutError) as exc:
                raise Unreachable(f"nearestd at {self.url} did not answer: {exc}") from None
            if not chunk:
                raise Unreachable(f"nearestd at {self.url} closed the connection")
            _feed(self._frames, chunk)
            payload = self._frames.next()
        return _decode(payload)

    async def _write(self, frames: list[bytes]) -> None:
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        self._writer.write(b"".join(frames))
        try:
            await self._writer.drain()
        except OSError as exc:
            raise Unreachable(f"cannot send to {self.url}: {exc}") from None

    async def request_many(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pipeline several raw request maps; return their raw replies in order."""
        async with self._lock:
            await self._write([encode_frame({"v": 1, "id": next(self._ids), **r}) for r in reqs])
            return [await self._read() for _ in reqs]

    async def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one raw request map; return its raw successful reply, or raise ServerError."""
        (reply,) = await self.request_many([req])
        return _check(reply)

    async def send_many(self, reqs: list[Request]) -> list[Reply | ServerError]:
        """Pipeline several typed requests; return each typed reply or its ServerError."""
        async with self._lock:
            await self._write([encode_frame(r.to_wire()) for r in reqs])
            out: list[Reply | ServerError] = []
            for req in reqs:
                try:
                    out.append(_typed(req, await self._read()))
                except ServerError as exc:
                    out.append(exc)
            return out

    async def send(self, req: Request) -> Reply:
        """Send one typed request; return its typed reply, or raise ServerError."""
        (reply,) = await self.send_many([req])
        if isinstance(reply, ServerError):
            raise reply
        return reply

    async def nearest(
        self, kind: str, need: Need | None = None, k: int = 1, client_ip: str | None = None
    ) -> NearestReply:
        """Ask for the nearest devices."""
        req = NearestRequest(next(self._ids), kind, k, need or Need(), client_ip)
        return _expect(await self.send(req), NearestReply)
