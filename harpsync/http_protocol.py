"""The operations API's HTTP/1.1 protocol: uvicorn's httptools one, with the limits on a
request head that uvicorn leaves out, and an answer's head and body sent in one write
(``CoalescedTransport``).

Both limits guard what a client can hold before it has logged in (the login is in the
head): uvicorn times out only the idle time between requests, and keeps every header
line of a head however many come.

One more cap guards the listener as a whole: a client address with
``operationsApi.network.maxConnectionsPerAddress`` connections open has its next one
answered 429 and closed (``AddressLimit``). One address could otherwise hold every file
descriptor the process has (idle keep-alive connections included) and lock every other
client out.

- A connection that has not sent a whole request head ``head_timeout`` seconds after it
  connected or began a request is closed (slowloris: a socket that sends nothing, or a
  head a byte at a time, held a file descriptor forever). So is one whose request was
  answered before its body ended (a failed login) and whose body is still arriving.
- A head larger than ``MAX_HEAD_BYTES`` (request line and header lines) or with more
  than ``MAX_HEADERS`` lines is answered 431 and the connection closed: endless small
  header lines were buffered without bound (about 11 bytes of memory per byte sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from harpsync import jsonio, requests_ctx

# Node's (and so Harper's) default is 16 KiB; this leaves room for long URLs and tokens.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256
# How long a refused head's connection is read (and dropped) before it is closed.
LINGER_SECONDS = 1.0
# A refused address is logged at most this often (a client retrying in a loop would
# otherwise write a line per attempt).
LOG_EVERY_SECONDS = 60.0

log = logging.getLogger(__name__)


class AddressLimit:
    """Open connections per client address, shared by a node's operations listeners
    (HTTP and HTTPS). Used on the event loop only. ``limit`` 0 is no limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def acquire(self, address: str) -> bool:
        """Count one more connection from ``address``; False (not counted) at the cap."""
        count = self.open.get(address, 0)
        if self.limit and count >= self.limit:
            return False
        self.open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self.open.get(address, 0) - 1
        if count > 0:
            self.open[address] = count
        else:
            self.open.pop(address, None)

    def note_refused(self, address: str) -> None:
        """Log a refusal, at most once a minute per address."""
        now = time.monotonic()
        if now - self._logged.get(address, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged[address] = now
        log.warning("refused a connection to the operations API from %s: %d connections "
                    "from that address are open (operationsApi.network."
                    "maxConnectionsPerAddress); further refusals of it are logged once "
                    "a minute", address, self.limit)


def _too_many_connections(limit: int) -> bytes:
    """The 429 answer to a connection over its address's cap, in the API's error shape."""
    request_id = requests_ctx.new_request_id()
    body = jsonio.dumps({"error": f"Too many connections from this address: {limit} are "
                                  "open; close some or retry later",
                         "retry_after_seconds": 1, "code": "RATE_LIMIT_EXCEEDED",
                         "request_id": request_id})
    return (b"HTTP/1.1 429 Too Many Requests\r\n"
            b"content-type: application/json\r\nconnection: close\r\nretry-after: 1\r\n"
            b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n"
            % (request_id.encode(), len(body))) + body


def _too_large() -> bytes:
    """The 431 answer, in the API's error shape (its request id is a new one: the head
    that would carry the client's was refused)."""
    request_id = requests_ctx.new_request_id()
    body = jsonio.dumps({"error": f"Request head is larger than {MAX_HEAD_BYTES} bytes or "
                                  f"has more than {MAX_HEADERS} header lines",
                         "code": "INVALID_REQUEST", "request_id": request_id})
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\nconnection: close\r\n"
            b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n"
            % (request_id.encode(), len(body))) + body


class CoalescedTransport:
    """A connection's transport that sends an answer's head together with its body, in
    one ``writelines`` (one ``writev``): uvicorn writes them separately, and each write on
    an idle socket is a ``send`` of its own (two system calls and two segments).

    A first write is held until the next one (the body, at once in the common case) or
    the end of the loop turn, whichever comes first; it is never held longer. Holding
    every write for the rest of the turn instead cost more server CPU per record with
    16 clients than the system call saved (0.26–0.31 against 0.22–0.25 ms in alternating
    runs: every answer left a loop turn later). Anything else done to the connection (closing it,
    handing it to a WebSocket, ...) sends what is held first, so bytes leave in the
    order written.
    """

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            # An answer's head: held until its body comes (at once, in the common case)
            # or this loop turn ends.
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            self._held = None
            held.append(data)
            self._transport.writelines(held)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.writelines(held)

    # The calls made on every request: nothing to send first.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        self.flush()
        return getattr(self._transport, name)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head timeout and a head size cap (see the
    module docstring). Subclass it with ``head_timeout`` set, one class per server."""

    head_timeout = 10.0
    address_limit: AddressLimit | None = None
    _address: str | None = None  # counted in ``address_limit`` until the connection ends
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _head_lines = 0
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, CoalescedTransport(transport,
                                                                           self.loop)))
        limit = self.address_limit
        if limit is not None and limit.limit:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not limit.acquire(address):
                limit.note_refused(address)
                self._refuse(_too_many_connections(limit.limit))
                return
            self._address = address
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # the rest of a refused head: dropped, never parsed
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_lines = 0
        if self._head_timer is None:  # the first request's clock runs from connect
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if not self._over():
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._head_lines += 1
        if not self._over():
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        if not self._refused:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()
            cycle = self.cycle  # None on a WebSocket upgrade
            if cycle is not None and cycle.response_complete:  # the dropped rest ended
                self._stop_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and self._head_timer is None \
                and not self.transport.is_closing():
            # Answered before the body ended (a failed login, 413): uvicorn reads and
            # drops the rest and keeps the connection, so a body trickled a byte at a
            # time held it forever. The rest gets ``head_timeout`` to arrive.
            self._head_timer = self.loop.call_later(self.head_timeout,
                                                    self._head_timed_out)

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        limit, address = self.address_limit, self._address
        handler = self.transport.get_protocol()
        if limit is None or address is None or handler is self:
            return
        # The socket now belongs to the WebSocket protocol: this one never hears of its
        # end, so the address's count is released when that protocol's does (else
        # every /changes connection, accepted or refused, held its count forever).
        self._address = None
        lost = handler.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            limit.release(address)
            lost(exc)

        handler.connection_lost = connection_lost  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._address is not None and self.address_limit is not None:
            self.address_limit.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def _over(self) -> bool:
        """Whether the head passed a cap; the first time, answer 431 and close."""
        if self._refused:
            return True
        if self._head_bytes <= MAX_HEAD_BYTES and self._head_lines <= MAX_HEADERS:
            return False
        self._refuse(_too_large())
        return True

    def _refuse(self, answer: bytes) -> None:
        """Send ``answer`` and close; nothing the client sends is parsed any more."""
        self._refused = True
        self._stop_head_timer()
        if not self.transport.is_closing():
            # Answer, then read and drop what the client still sends for a moment
            # before closing: closing with unread bytes would reset the connection,
            # and a reset can destroy the answer before the client reads it.
            self.transport.write(answer)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_class(head_timeout: float,
                   address_limit: AddressLimit | None = None) -> type[GuardedProtocol]:
    """A ``GuardedProtocol`` for one server, closing heads unfinished after
    ``head_timeout`` seconds and counting connections in ``address_limit`` (uvicorn
    builds one instance per connection)."""
    return type("OperationsProtocol", (GuardedProtocol,),
                {"head_timeout": head_timeout, "address_limit": address_limit})
