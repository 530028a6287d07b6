"""The only websockets import: replication sockets that move bytes, nothing more.

Each replication socket is a ``Link``: binary frames in and out, the peer's verified
TLS identity, and the ping latency that ``websockets`` keepalive measures.

Work before authentication is bounded (DESIGN.md "Trust model"): an accepted socket
reads frames of at most ``PREAUTH_FRAME`` bytes and buffers at most ``PREAUTH_QUEUE`` of
them until the replicator calls :meth:`Link.authenticated`; TLS and the WebSocket
handshake must finish within ``HANDSHAKE_TIMEOUT``; a ``Gate`` caps unauthenticated
sockets per client address and all sockets in total.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import Protocol, Side, State

from harpsync.security import (
    TLS_ERRORS,
    PeerCert,
    PeerIdentity,
    TLSContext,
    peer_cert,
    peer_identity,
)
from harpsync.storage.database import MAX_LOG_ENTRY

SUBPROTOCOL = "harpsync-replication-1"
# The largest frame a peer takes once authenticated: the largest log entry a write may
# make, alone in a batch, with room for the frame's head. A lone entry goes in one frame
# whatever its size; at 64 MiB an update that merged many large records (a small request)
# made an entry no peer would take, and the link failed on it forever.
MAX_FRAME = MAX_LOG_ENTRY + 1024 * 1024
# Until the peer is authenticated: one small frame at a time (a join request with a CSR,
# a CA and a list of nodes fits easily).
PREAUTH_FRAME = 64 * 1024
PREAUTH_QUEUE = 2
HANDSHAKE_TIMEOUT = 5.0
# Frames websockets buffers before it stops reading the socket. Generous, so control
# frames (pongs) keep flowing while the subscriber's apply queue is briefly full.
MAX_QUEUE = 64

# Errors that mean "the link is gone or could not be made".
LinkClosed = ConnectionClosed
DIAL_ERRORS: tuple[type[BaseException], ...] = (
    OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError, *TLS_ERRORS, EOFError,
    ConnectionClosed,
)


class Gate:
    """Caps on accepted sockets: unauthenticated ones per client address, all in total."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self.open = 0
        self.pending: dict[str, int] = {}
        self.refused = 0

    def admit(self, address: str) -> bool:
        if self.open >= self.total or self.pending.get(address, 0) >= self.per_address:
            self.refused += 1
            return False
        self.open += 1
        self.pending[address] = self.pending.get(address, 0) + 1
        return True

    def _unpend(self, address: str) -> None:
        left = self.pending.get(address, 0) - 1
        if left > 0:
            self.pending[address] = left
        else:
            self.pending.pop(address, None)

    def authenticated(self, address: str) -> None:
        self._unpend(address)

    def release(self, address: str, was_pending: bool) -> None:
        self.open -= 1
        if was_pending:
            self._unpend(address)


class Link:
    """One replication WebSocket, either accepted or dialed."""

    def __init__(self, conn: Any, path: str) -> None:
        self._conn = conn
        self.path = path
        ssl_object = conn.transport.get_extra_info("ssl_object") if conn.transport else None
        self._ssl_object = ssl_object
        self.peer: PeerIdentity | None = peer_identity(ssl_object)
        self.cert: PeerCert | None = peer_cert(ssl_object)
        self.bytes_sent = 0

    @property
    def remote_host(self) -> str:
        """The client's IP address (``""`` if unknown)."""
        address = self._conn.remote_address
        return str(address[0]) if address else ""

    def issued_by(self, ca_pems: list[bytes | str]) -> bool:
        """Whether the peer's certificate was signed by one of these CAs."""
        return self.cert is not None and self.cert.issued_by(ca_pems)

    def authenticated(self) -> None:
        """The peer proved who it is: lift the pre-authentication limits."""
        conn = self._conn
        conn.protocol.max_message_size = MAX_FRAME
        conn.recv_messages.high, conn.recv_messages.low = MAX_QUEUE, MAX_QUEUE // 4
        if isinstance(conn, _GatedConnection):
            conn.mark_authenticated()

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

    def send_now(self, data: bytes) -> bool:
        """Write one binary frame at once if the socket can take it without waiting.

        Returns False (nothing sent) when the connection is not open, its write buffer
        is above the limit, or another message is being sent: the caller then awaits
        :meth:`send`, which waits, or raises ``LinkClosed``. This is ``send`` without
        its asynchronous context and drain, which cost a publisher about as much as
        the frame's encryption (one frame per commit of a lone client).
        """
        conn = self._conn
        protocol = conn.protocol
        if (protocol.state is not State.OPEN or getattr(conn, "paused", True)
                or getattr(conn, "send_in_progress", True) is not None
                or conn.transport is None or conn.transport.is_closing()):
            return False
        protocol.send_binary(data)
        try:
            conn.send_data()
        except Exception:
            # The socket failed under us: let the regular path raise LinkClosed.
            conn.transport.abort()
        self.bytes_sent += len(data)
        return True

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



class _GatedConnection(ServerConnection):
    """A server connection counted by a ``Gate`` from TCP accept to close."""

    gate: Gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if peer else ""
        self._pending = self._admitted = self.gate.admit(self._address)
        if not self._admitted:
            transport.abort()  # type: ignore[attr-defined]  # a socket transport

    def mark_authenticated(self) -> None:
        if self._pending:
            self._pending = False
            self.gate.authenticated(self._address)

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_admitted", False):
            self._admitted = False
            self.gate.release(self._address, self._pending)
        super().connection_lost(exc)


async def listen(sock: socket.socket, ssl_context: TLSContext | None,
                 handler: Callable[[Link], Awaitable[None]], ping_interval: float,
                 gate: Gate | None = None) -> Server:
    """Serve replication sockets on an already-bound listening socket.

    Accepted sockets start with the pre-authentication limits; the handler lifts them
    with :meth:`Link.authenticated` once the peer is known.
    """

    async def on_connection(conn: ServerConnection) -> None:
        await handler(Link(conn, conn.request.path if conn.request else "/"))

    gated = type("GatedConnection", (_GatedConnection,), {"gate": gate or Gate(64, 1024)})
    return await serve(
        on_connection, sock=sock, ssl=ssl_context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        ping_interval=ping_interval, ping_timeout=ping_interval * 2, max_size=PREAUTH_FRAME,
        compression=None, close_timeout=2, write_limit=256 * 1024, max_queue=PREAUTH_QUEUE,
        open_timeout=HANDSHAKE_TIMEOUT, create_connection=gated,
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


async def socket_pair(path: str = "/") -> tuple[Link, Link]:
    """Two open links joined by ``socket.socketpair()``: ``(dialed, accepted)``.

    No TLS and no HTTP handshake: both WebSocket connections start open, as the
    websockets library tests its asyncio layer. The glue (publisher, subscriber) is
    tested over these without a listener, a port or a node.
    """
    loop = asyncio.get_running_loop()
    dialed_sock, accepted_sock = socket.socketpair()

    def connection(side: Side) -> Connection:
        return Connection(Protocol(side, max_size=MAX_FRAME), ping_interval=None,
                          close_timeout=2, max_queue=MAX_QUEUE, write_limit=256 * 1024)

    _, dialed = await loop.create_connection(lambda: connection(Side.CLIENT),
                                             sock=dialed_sock)
    _, accepted = await loop.connect_accepted_socket(lambda: connection(Side.SERVER),
                                                     sock=accepted_sock)
    return Link(dialed, path), Link(accepted, path)
