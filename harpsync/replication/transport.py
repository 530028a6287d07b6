"""The only websockets import: replication sockets that move bytes, nothing more.

Each replication socket is a ``Link``: binary frames in and out, the peer's verified
TLS identity, and the ping latency that ``websockets`` keepalive measures.

Work before authentication is bounded (DESIGN.md "Trust model"): an accepted socket
reads frames of at most ``PREAUTH_FRAME`` bytes and buffers at most ``PREAUTH_QUEUE`` of
them until the replicator calls :meth:`Link.authenticated`; TLS and the WebSocket
handshake must finish within ``HANDSHAKE_TIMEOUT``; a ``Gate`` caps unauthenticated
sockets per client address and all sockets in total, counted from the TCP accept (each
accepted connection starts its own TLS once admitted, see ``_GatedConnection``).
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
# How long a closing socket waits for its peer (the WebSocket close, then TLS's).
CLOSE_TIMEOUT = 2
# A frame larger than this goes as fragments of this size (WebSocket continuation
# frames), each written once the socket's buffer has drained. Control frames go between
# fragments: a pong waits behind one fragment, not behind a whole frame of up to
# ``MAX_FRAME``, whose encryption and transfer on a loaded machine outlast the peer's
# keepalive timeout (the link then failed on that entry forever).
FRAGMENT = 1024 * 1024
# Frames websockets buffers before it stops reading the socket. Generous, so control
# frames (pongs) keep flowing while the subscriber's apply queue is briefly full.
MAX_QUEUE = 64

# Errors that mean "the link is gone or could not be made".
LinkClosed = ConnectionClosed
DIAL_ERRORS: tuple[type[BaseException], ...] = (
    OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError, *TLS_ERRORS, EOFError,
    ConnectionClosed,
)


def network_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the network took an open link down: a keepalive timeout or
    a socket that closed without the peer's close frame, a reset, a timeout. A close the
    peer sent (a shutdown, a refusal with its reason) is not one."""
    if isinstance(exc, ConnectionClosed):
        return exc.rcvd is None
    return isinstance(exc, OSError | asyncio.TimeoutError | EOFError)


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
        """Send one binary message; waits while the socket's buffer is full
        (backpressure). One larger than ``FRAGMENT`` goes in fragments."""
        self.bytes_sent += len(data)
        if len(data) <= FRAGMENT:
            await self._conn.send(data)
            return
        view = memoryview(data)
        await self._conn.send(view[i:i + FRAGMENT] for i in range(0, len(view), FRAGMENT))

    def can_send_now(self) -> bool:
        """Whether :meth:`send_now` would write a frame now (the connection is open, its
        write buffer below the limit, and no other message is being sent)."""
        conn = self._conn
        return not (conn.protocol.state is not State.OPEN or getattr(conn, "paused", True)
                    or getattr(conn, "send_in_progress", True) is not None
                    or conn.transport is None or conn.transport.is_closing())

    def send_now(self, data: bytes) -> bool:
        """Write one binary frame at once if the socket can take it without waiting.

        Returns False (nothing sent) when the connection is not open, its write buffer
        is above the limit, another message is being sent, or ``data`` is larger than
        ``FRAGMENT`` (it goes in fragments, each written once the socket drained): the
        caller then awaits :meth:`send`, which waits, or raises ``LinkClosed``. This is
        ``send`` without its asynchronous context and drain, which cost a publisher
        about as much as the frame's encryption (one frame per commit of a lone client).
        """
        if len(data) > FRAGMENT or not self.can_send_now():
            return False
        conn = self._conn
        conn.protocol.send_binary(data)
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

    def no_keepalive(self) -> None:
        """Send no more keepalive pings (and wait for no pongs) on this socket."""
        task = getattr(self._conn, "keepalive_task", None)
        if task is not None:
            task.cancel()
            self._conn.keepalive_task = None

    def abort(self) -> None:
        transport = self._conn.transport
        if transport is not None:
            transport.abort()



class _GatedConnection(ServerConnection):
    """A server connection counted by a ``Gate`` from TCP accept to close.

    The listener is plain TCP and each connection starts its own TLS (``start_tls``)
    once the Gate has admitted its address: served with ``ssl=``, asyncio and uvloop
    call ``connection_made`` only after the handshake, so a socket that never began
    one was not counted at all and one address could hold any number of them.
    """

    gate: Gate
    tls: TLSContext | None = None
    # Handshakes in progress (a task must be referenced until it ends).
    handshakes: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if peer else ""
        self._pending = self._admitted = self.gate.admit(self._address)
        self._tls_pending = False
        if not self._admitted or self.tls is None:
            super().connection_made(transport)
            if not self._admitted:
                transport.abort()  # type: ignore[attr-defined]  # a socket transport
            return
        self._tls_pending = True
        self._early: list[bytes] = []  # app data decrypted before our connection_made
        # uvloop starts reading after connection_made whatever it did, so the first TLS
        # bytes may reach this protocol before start_tls takes the transport over: they
        # are kept and handed to the TLS protocol (see _hand_over).
        self._raw: list[bytes] | None = []
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._start_tls(transport))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)
        # Runs after the task's first step (start_tls has set its protocol and queued
        # that protocol's connection_made and the resume of reading).
        loop.call_soon(self._end_raw, transport)

    def _end_raw(self, transport: Any) -> None:
        raw, self._raw = self._raw, None
        if raw:  # queued after connection_made and the resume: before any new read
            asyncio.get_running_loop().call_soon(_hand_over, transport, b"".join(raw))

    async def _start_tls(self, transport: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(transport, self, self.tls,  # type: ignore[arg-type]
                                          server_side=True,
                                          ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                                          ssl_shutdown_timeout=CLOSE_TIMEOUT)
        except (Exception, asyncio.CancelledError):  # timeout, TLS error, reset, shutdown
            transport.abort()
            self._release()
            return
        self._tls_pending = False
        if secure is None:  # the socket closed as the handshake ended
            self._release()
            return
        super().connection_made(secure)
        # What arrived with the end of the handshake, before this task ran.
        early, self._early = self._early, []
        for chunk in early:
            super().data_received(chunk)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_tls_pending", False):
            if self._raw is not None:
                self._raw.append(data)
            else:
                self._early.append(data)
            return
        super().data_received(data)

    def eof_received(self) -> None:
        if not getattr(self, "_tls_pending", False):  # else: the close follows
            super().eof_received()

    def mark_authenticated(self) -> None:
        if self._pending:
            self._pending = False
            self.gate.authenticated(self._address)

    def _release(self) -> None:
        if getattr(self, "_admitted", False):
            self._admitted = False
            self.gate.release(self._address, self._pending)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if getattr(self, "_tls_pending", False):
            return  # the handshake failed: websockets never saw this connection
        super().connection_lost(exc)


def _hand_over(transport: Any, data: bytes) -> None:
    """Give ``data`` (bytes read before start_tls took ``transport`` over) to the TLS
    protocol now reading it (a buffered protocol in asyncio and uvloop)."""
    protocol = transport.get_protocol()
    if transport.is_closing():
        return
    if not hasattr(protocol, "get_buffer"):
        protocol.data_received(data)
        return
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


async def listen(sock: socket.socket, ssl_context: TLSContext | None,
                 handler: Callable[[Link], Awaitable[None]], ping_interval: float,
                 gate: Gate | None = None) -> Server:
    """Serve replication sockets on an already-bound listening socket.

    Accepted sockets start with the pre-authentication limits; the handler lifts them
    with :meth:`Link.authenticated` once the peer is known.
    """

    async def on_connection(conn: ServerConnection) -> None:
        await handler(Link(conn, conn.request.path if conn.request else "/"))

    gated = type("GatedConnection", (_GatedConnection,), {
        "gate": gate or Gate(64, 1024), "tls": ssl_context, "handshakes": set()})
    return await serve(  # plain TCP: each connection starts TLS once admitted
        on_connection, sock=sock, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        ping_interval=ping_interval, ping_timeout=ping_interval * 2, max_size=PREAUTH_FRAME,
        compression=None, close_timeout=CLOSE_TIMEOUT, write_limit=256 * 1024,
        max_queue=PREAUTH_QUEUE,
        open_timeout=HANDSHAKE_TIMEOUT, create_connection=gated,
    )


async def dial(url: str, path: str, ssl_context: TLSContext | None,
               ping_interval: float | None, timeout: float = 10.0,
               server_hostname: str | None = None) -> Link:
    """Open a replication socket to ``url`` + ``path`` (``ping_interval`` None: no
    keepalive pings).

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
        open_timeout=timeout, ping_interval=ping_interval,
        ping_timeout=None if ping_interval is None else ping_interval * 2,
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
