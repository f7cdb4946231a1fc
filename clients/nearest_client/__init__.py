"""Clients of nearestd: blocking and asyncio, and the ``nearest`` command."""

from nearest_client.client import (
    DEFAULT_SOCKET,
    DEFAULT_TCP,
    AsyncClient,
    Client,
    ClientError,
    ServerError,
    Unreachable,
    default_server,
)

__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_TCP",
    "AsyncClient",
    "Client",
    "ClientError",
    "ServerError",
    "Unreachable",
    "default_server",
]
