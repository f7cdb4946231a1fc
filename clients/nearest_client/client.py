"""Blocking and asyncio clients of the nearestd wire protocol."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from nearest_wire import HEADER, Need, decode_reply, encode_frame
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
    """Build a ``nearest`` request map (without id)."""
    req: dict[str, Any] = {"op": "nearest", "kind": kind, "k": k}
    if need is not None:
        req["need"] = need.to_wire()
    if client_ip is not None:
        req["client_ip"] = client_ip
    return req


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is True:
        return reply
    err = reply.get("error")
    if isinstance(err, dict):
        raise ServerError(str(err.get("code")), str(err.get("message")), reply)
    raise ClientError("malformed reply from the daemon")


class Client:
    """A blocking client; one connection, requests answered in order."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._buf = bytearray()

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

    def _recv_exact(self, n: int) -> bytes:
        assert self._sock is not None
        while len(self._buf) < n:
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buf)))
            except OSError as exc:
                raise Unreachable(
                    f"connection to {self.url} failed: {exc.strerror or exc}"
                ) from None
            if not chunk:
                raise Unreachable(f"nearestd at {self.url} closed the connection")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read_reply(self) -> dict[str, Any]:
        """Read one reply frame."""
        (size,) = HEADER.unpack(self._recv_exact(4))
        if size > MAX_REPLY:
            raise ClientError(f"reply of {size} bytes is too large")
        try:
            return decode_reply(self._recv_exact(size)) if size else {}
        except WireError as exc:
            raise ClientError(f"malformed reply: {exc.message}") from None

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its successful reply, or raise ServerError."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        body = {"v": 1, "id": next(self._ids), **req}
        try:
            self._sock.sendall(encode_frame(body))
        except OSError as exc:
            raise Unreachable(f"cannot send to {self.url}: {exc.strerror or exc}") from None
        reply = self.read_reply()
        if reply.get("id") not in (body["id"], None):
            raise ClientError("reply id does not match the request")
        return _check(reply)

    def nearest(
        self, kind: str, need: Need | None = None, k: int = 1, client_ip: str | None = None
    ) -> dict[str, Any]:
        """Ask for the nearest devices."""
        return self.request(nearest_request(kind, need, k, client_ip))


class AsyncClient:
    """An asyncio client; requests may be pipelined."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

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
        try:
            head = await asyncio.wait_for(self._reader.readexactly(4), self.timeout)
            (size,) = HEADER.unpack(head)
            if size > MAX_REPLY:
                raise ClientError(f"reply of {size} bytes is too large")
            body = await asyncio.wait_for(self._reader.readexactly(size), self.timeout)
        except (asyncio.IncompleteReadError, OSError, TimeoutError) as exc:
            raise Unreachable(f"nearestd at {self.url} did not answer: {exc}") from None
        try:
            return decode_reply(body)
        except WireError as exc:
            raise ClientError(f"malformed reply: {exc.message}") from None

    async def request_many(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pipeline several requests; return their raw replies in order."""
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        async with self._lock:
            frames = [encode_frame({"v": 1, "id": next(self._ids), **r}) for r in reqs]
            self._writer.write(b"".join(frames))
            try:
                await self._writer.drain()
            except OSError as exc:
                raise Unreachable(f"cannot send to {self.url}: {exc}") from None
            return [await self._read() for _ in reqs]

    async def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its successful reply, or raise ServerError."""
        (reply,) = await self.request_many([req])
        return _check(reply)

    async def nearest(
        self, kind: str, need: Need | None = None, k: int = 1, client_ip: str | None = None
    ) -> dict[str, Any]:
        """Ask for the nearest devices."""
        return await self.request(nearest_request(kind, need, k, client_ip))
