"""The only websockets import: replication sockets that move bytes, nothing more.

Each replication socket is a ``Link``: binary frames in and out, the peer's verified
TLS identity, and the ping latency that ``websockets`` keepalive measures.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from harpsync.security import (
    TLS_ERRORS,
    PeerIdentity,
    TLSContext,
    peer_identity,
    peer_issued_by,
)

SUBPROTOCOL = "harpsync-replication-1"
MAX_FRAME = 64 * 1024 * 1024
# Frames websockets buffers before it stops reading the socket. Generous, so control
# frames (pongs) keep flowing while the subscriber's apply queue is briefly full.
MAX_QUEUE = 64

# Errors that mean "the link is gone or could not be made".
LinkClosed = ConnectionClosed
DIAL_ERRORS: tuple[type[BaseException], ...] = (
    OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError, *TLS_ERRORS, EOFError,
    ConnectionClosed,
)


class Link:
    """One replication WebSocket, either accepted or dialed."""

    def __init__(self, conn: Any, path: str) -> None:
        self._conn = conn
        self.path = path
        ssl_object = conn.transport.get_extra_info("ssl_object") if conn.transport else None
        self._ssl_object = ssl_object
        self.peer: PeerIdentity | None = peer_identity(ssl_object)
        self.bytes_sent = 0

    def issued_by(self, ca_pems: list[bytes | str]) -> bool:
        """Whether the peer's certificate was signed by one of these CAs."""
        return peer_issued_by(self._ssl_object, ca_pems)

    @property
    def latency_ms(self) -> float:
        return float(self._conn.latency) * 1000.0

    @property
    def open(self) -> bool:
        return bool(self._conn.state is State.OPEN)

    async def send(self, data: bytes) -> None:
        """Send one binary frame; waits while the socket's buffer is full (backpressure)."""
        self.bytes_sent += len(data)
        await self._conn.send(data)

    async def recv(self) -> bytes:
        """Receive one frame; raises ``LinkClosed`` when the socket closes."""
        data = await self._conn.recv()
        return data if isinstance(data, bytes) else data.encode()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._conn.close(code, reason[:120])

    def abort(self) -> None:
        transport = self._conn.transport
        if transport is not None:
            transport.abort()



async def listen(sock: socket.socket, ssl_context: TLSContext | None,
                 handler: Callable[[Link], Awaitable[None]], ping_interval: float) -> Server:
    """Serve replication sockets on an already-bound listening socket."""

    async def on_connection(conn: ServerConnection) -> None:
        await handler(Link(conn, conn.request.path if conn.request else "/"))

    return await serve(
        on_connection, sock=sock, ssl=ssl_context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        ping_interval=ping_interval, ping_timeout=ping_interval * 2, max_size=MAX_FRAME,
        compression=None, close_timeout=2, write_limit=256 * 1024, max_queue=MAX_QUEUE,
    )


async def dial(url: str, path: str, ssl_context: TLSContext | None, ping_interval: float,
               timeout: float = 10.0, server_hostname: str | None = None) -> Link:
    """Open a replication socket to ``url`` + ``path``.

    Raises:
        One of ``DIAL_ERRORS`` when the peer cannot be reached or refuses us.
    """
    target = url.rstrip("/") + path
    if not target.startswith("wss://"):
        ssl_context = None
    kwargs: dict[str, Any] = {}
    if ssl_context is not None and server_hostname:
        kwargs["server_hostname"] = server_hostname
    conn = await connect(
        target, ssl=ssl_context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        open_timeout=timeout, ping_interval=ping_interval, ping_timeout=ping_interval * 2,
        max_size=MAX_FRAME, compression=None, close_timeout=2, proxy=None,
        write_limit=256 * 1024, max_queue=MAX_QUEUE, **kwargs,
    )
    return Link(conn, path)
