"""The part of a replication session both sides share (sans-I/O).

A :class:`Session` is fed whole WebSocket messages with :meth:`Session.receive`; the
caller drains :meth:`Session.events_received` and :meth:`Session.data_to_send`. It
holds the byte counters, frame compression, failure handling and peer operations;
:mod:`subscriber_session` and :mod:`publisher_session` add each side's states and
frames. Nothing here touches sockets, event loops or storage.
"""

from __future__ import annotations

import itertools
from typing import Any

from harpsync.compression import CompressionError, FrameCompressor
from harpsync.replication.events import (
    Event,
    OperationCompleted,
    OperationRequested,
    PeerFailed,
    PeerHello,
    ProtocolFailed,
    event_from,
)
from harpsync.replication.messages import (
    TAG_ZSTD,
    BatchFrame,
    ControlFrame,
    CopyChunkFrame,
    ProtocolError,
    decode_frame,
    encode_control,
)

PROTOCOL_VERSION = 1


def lag(head_seq: int, applied_seq: int) -> int:
    """Return how many publisher sequences the subscriber is behind (never negative)."""
    return max(0, head_seq - applied_seq)


class Session:
    """What both sides share: buffers, failure handling and operations."""

    state: Any
    _FAILED: Any
    _CLOSED: Any
    _OPERATIONAL: frozenset[Any]

    def __init__(self, node: str) -> None:
        self.node = node
        self.peer: PeerHello | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self._events: list[Event] = []
        self._outgoing: list[bytes] = []
        self._operation_ids = itertools.count(1)
        # Frame compression negotiated in the hello (``None``: frames go as they are).
        self.compression: str | None = None
        self._compressor: FrameCompressor | None = None
        self.raw_bytes_received = 0
        self.raw_bytes_sent = 0
        self._pending_operations: set[int] = set()

    def receive(self, data: bytes) -> None:
        """Feed one whole message from the peer.

        Args:
            data: the binary WebSocket message.

        Malformed or out-of-state input fails the session: the state becomes
        ``FAILED``, an ``error`` frame is queued and :class:`ProtocolFailed` is
        emitted. Input after the session failed or closed is ignored.
        """
        if self.state in (self._FAILED, self._CLOSED):
            return
        self.bytes_received += len(data)
        try:
            if data[:1] == TAG_ZSTD:
                if self._compressor is None:
                    raise ProtocolError("compressed frame on a link without compression")
                try:
                    data = self._compressor.inflate(memoryview(data)[1:])
                except CompressionError as exc:
                    raise ProtocolError(str(exc)) from None
            self.raw_bytes_received += len(data)
            frame = decode_frame(data)
            if isinstance(frame, ControlFrame):
                self._receive_common(frame)
            else:
                self._receive_frame(frame)
        except ProtocolError as exc:
            self._fail(str(exc))

    def events_received(self) -> list[Event]:
        """Return and clear the events produced since the last call."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        """Return and clear the frames queued for the peer since the last call."""
        frames, self._outgoing = self._outgoing, []
        return frames

    def request_operation(self, body: dict[str, Any]) -> int:
        """Ask the peer to run an operation.

        Args:
            body: the operation body, such as ``{"operation": "add_node_back"}``.

        Returns:
            The request id that the matching :class:`OperationCompleted` carries.

        Raises:
            RuntimeError: before the hello exchange or after the session ended.
        """
        self._check_operational()
        op_id = next(self._operation_ids)
        self._pending_operations.add(op_id)
        self._send("operation", id=op_id, body=body)
        return op_id

    def respond_operation(self, id: int, result: Any = None, error: str | None = None) -> None:
        """Answer an :class:`OperationRequested` from the peer.

        Args:
            id: the request id.
            result: the operation's result when it succeeded.
            error: the error message when it failed.

        Raises:
            RuntimeError: before the hello exchange or after the session ended.
        """
        self._check_operational()
        self._send("operation_result", id=id, result=result, error=error)

    def send_error(self, code: str, message: str) -> None:
        """Queue an ``error`` frame for the peer and fail the session.

        Raises:
            RuntimeError: if the session already failed or closed.
        """
        if self.state in (self._FAILED, self._CLOSED):
            raise RuntimeError(f"session is {self.state.name}")
        self._send("error", code=code, message=message)
        self.state = self._FAILED

    def close(self) -> None:
        """Mark the session closed; later input is ignored."""
        self.state = self._CLOSED

    def _send(self, type_: str, **fields: Any) -> None:
        self._queue(encode_control(type_, **fields))

    def _send_hello(self, database: str, tables: dict[str, Any], origins: dict[int, str],
                    compression: Any = None, relay_tables: Any = None) -> None:
        hello = {"node": self.node, "database": database, "protocol": PROTOCOL_VERSION}
        extra: dict[str, Any] = {} if compression is None else {"compression": compression}
        if relay_tables:
            extra["relay_tables"] = relay_tables
        self._send("hello", **hello, tables=tables, origins=origins, **extra)

    def _queue(self, frame: bytes) -> None:
        self.bytes_sent += len(frame)
        self.raw_bytes_sent += len(frame)
        self._outgoing.append(frame)

    def _queue_data(self, frame: bytes) -> None:
        """Queue a batch or copy frame, compressed when the link negotiated it and it
        pays (see :mod:`harpsync.compression`)."""
        packed = self._compressor.shrink(frame) if self._compressor is not None else None
        if packed is None:
            self._queue(frame)
            return
        self.raw_bytes_sent += len(frame)
        self.bytes_sent += 1 + len(packed)
        self._outgoing.append(TAG_ZSTD + packed)

    @property
    def compression_ratio(self) -> float | None:
        """Wire bytes per decoded byte received (None before anything arrived)."""
        if not self.raw_bytes_received:
            return None
        return self.bytes_received / self.raw_bytes_received

    def _fail(self, message: str) -> None:
        self._send("error", code="protocol_error", message=message)
        self.state = self._FAILED
        self._events.append(ProtocolFailed(message))

    def _check_operational(self) -> None:
        if self.state not in self._OPERATIONAL:
            raise RuntimeError(f"not allowed in state {self.state.name}")

    def _require(self, *states: Any) -> None:
        if self.state not in states:
            raise ProtocolError(f"unexpected frame in state {self.state.name}")

    def _receive_common(self, frame: ControlFrame) -> None:
        # decode_frame has already checked every field named in CONTROL_SCHEMAS.
        fields = frame.fields
        if frame.type == "error":
            self.state = self._FAILED
            self._events.append(event_from(PeerFailed, fields))
        elif frame.type == "operation":
            self._require(*self._OPERATIONAL)
            self._events.append(event_from(OperationRequested, fields))
        elif frame.type == "operation_result":
            self._require(*self._OPERATIONAL)
            op_id = fields["id"]
            if op_id not in self._pending_operations:
                raise ProtocolError(f"result for unknown operation {op_id}")
            self._pending_operations.discard(op_id)
            self._events.append(event_from(OperationCompleted, fields))
        elif frame.type != "ping_status":
            self._receive_control(frame.type, fields)

    def _receive_control(self, type_: str, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def _receive_frame(self, frame: BatchFrame | CopyChunkFrame) -> None:
        raise NotImplementedError
