"""Sans-I/O replication sessions, in the style of websockets' ``protocol.py``.

A session is fed whole WebSocket messages with :meth:`receive`, and the caller
drains :meth:`events_received` and :meth:`data_to_send`. Sessions know frames,
states and cursors; they never touch sockets, event loops or storage, so two of
them can be driven back to back in memory.

:class:`SubscriberSession` is the dialing side that receives a database stream;
:class:`PublisherSession` is the listening side that sends its log.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from harpsync.compression import NAME as COMPRESSION
from harpsync.compression import CompressionError, FrameCompressor
from harpsync.replication.events import (
    AckReceived,
    CaughtUp,
    CopyBegan,
    CopyEnded,
    CopyRows,
    EntriesReceived,
    Event,
    OperationCompleted,
    OperationRequested,
    OriginsAnnounced,
    PeerFailed,
    PeerHello,
    ProtocolFailed,
    ResyncRequired,
    SubscribeRequested,
    event_from,
)
from harpsync.replication.messages import (
    TAG_ZSTD,
    BatchBuilder,
    BatchFrame,
    ControlFrame,
    CopyChunkFrame,
    ProtocolError,
    decode_frame,
    encode_control,
    encode_copy_chunk,
    split_rows,
)

PROTOCOL_VERSION = 1


def lag(head_seq: int, applied_seq: int) -> int:
    """Return how many publisher sequences the subscriber is behind (never negative)."""
    return max(0, head_seq - applied_seq)


# --- sessions -----------------------------------------------------------------------


class SubscriberState(enum.Enum):
    """States of a :class:`SubscriberSession`."""

    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    READY = "ready"
    SUBSCRIBED = "subscribed"
    COPYING = "copying"
    FAILED = "failed"
    CLOSED = "closed"


class PublisherState(enum.Enum):
    """States of a :class:`PublisherSession`."""

    AWAIT_HELLO = "await_hello"
    AWAIT_SUBSCRIBE = "await_subscribe"
    STREAMING = "streaming"
    FAILED = "failed"
    CLOSED = "closed"


class _Session:
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
                    compression: Any = None) -> None:
        hello = {"node": self.node, "database": database, "protocol": PROTOCOL_VERSION}
        extra = {} if compression is None else {"compression": compression}
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


class SubscriberSession(_Session):
    """The dialing side of a link: it receives one database from the publisher.

    Attributes:
        peer_origins: the publisher's origin-id map, from its hello and ``origins``.
        received_seq: the highest publisher sequence received (or copied up to).
        head_seq: the publisher's newest sequence as last reported.
        acked_seq: the highest sequence acknowledged to the publisher.
        entries_received, bytes_received: counters for metrics.
    """

    _FAILED = SubscriberState.FAILED
    _CLOSED = SubscriberState.CLOSED
    _OPERATIONAL = frozenset(
        {SubscriberState.READY, SubscriberState.SUBSCRIBED, SubscriberState.COPYING}
    )

    def __init__(
        self, node: str, database: str, tables: dict[str, Any], origins: dict[int, str],
        compression: bool = False,
    ) -> None:
        super().__init__(node)
        self._offer = compression
        self.state = SubscriberState.IDLE
        self.database = database
        self.tables = tables
        self.origins = origins
        self.peer_origins: dict[int, str] = {}
        self.received_seq = 0
        self.head_seq = 0
        self.acked_seq = 0
        self.entries_received = 0
        self._snapshot_seq: int | None = None

    def start(self) -> None:
        """Queue our hello.

        Raises:
            RuntimeError: if the session was already started.
        """
        if self.state is not SubscriberState.IDLE:
            raise RuntimeError("session already started")
        self._send_hello(self.database, self.tables, self.origins,
                         compression=[COMPRESSION] if self._offer else None)
        self.state = SubscriberState.HELLO_SENT

    def subscribe(
        self,
        after_seq: int,
        origins: Mapping[str, int | None] | None,
        tables: Sequence[str] | None,
        copy: bool = False,
        copy_resume: Mapping[str, Any] | None = None,
    ) -> None:
        """Ask the publisher for its log after ``after_seq``.

        Args:
            after_seq: the publisher sequence to start after.
            origins: origin name to exclusive minimum version (``None``: no
                minimum), or ``None`` for every origin.
            tables: table names, or ``None`` for every table.
            copy: request a full copy before streaming.
            copy_resume: ``{"table": str, "key": bytes}`` to resume a copy.

        Raises:
            RuntimeError: unless the session is ``READY``.
        """
        if self.state is not SubscriberState.READY:
            raise RuntimeError(f"cannot subscribe in state {self.state.name}")
        self._send(
            "subscribe",
            after_seq=after_seq,
            origins=None if origins is None else dict(origins),
            tables=None if tables is None else list(tables),
            copy=copy,
            copy_resume=None if copy_resume is None else dict(copy_resume),
        )
        self.received_seq = after_seq
        self.state = SubscriberState.SUBSCRIBED

    def ack(self, seq: int) -> bool:
        """Acknowledge that everything up to ``seq`` is committed.

        Args:
            seq: the highest publisher sequence committed locally.

        Returns:
            True if an ``ack`` was queued; False when ``seq`` is not past the last
            ack or the session is not subscribed.
        """
        states = (SubscriberState.SUBSCRIBED, SubscriberState.COPYING)
        if self.state not in states or seq <= self.acked_seq:
            return False
        self.acked_seq = seq
        self._send("ack", seq=seq)
        return True

    def _receive_frame(self, frame: BatchFrame | CopyChunkFrame) -> None:
        if isinstance(frame, CopyChunkFrame):
            self._require(SubscriberState.COPYING)
            self._events.append(CopyRows(frame.table, frame.rows))
            return
        self._require(SubscriberState.SUBSCRIBED)
        previous = self.received_seq
        for seq, _ in frame.entries:
            if seq <= previous:
                raise ProtocolError(f"sequence {seq} does not follow {previous}")
            previous = seq
        self.received_seq = previous
        self.head_seq = max(self.head_seq, frame.head_seq)
        self.entries_received += len(frame.entries)
        self._events.append(EntriesReceived(frame.head_seq, frame.entries))

    def _receive_control(self, type_: str, fields: dict[str, Any]) -> None:
        s = SubscriberState
        if type_ == "hello":
            self._require(s.HELLO_SENT)
            hello = event_from(PeerHello, fields)
            if hello.database != self.database:
                raise ProtocolError(f"peer serves {hello.database!r}, not {self.database!r}")
            if hello.protocol != PROTOCOL_VERSION:
                raise ProtocolError(f"unsupported protocol version {hello.protocol}")
            self.peer = hello
            self.peer_origins.update(hello.origins)
            if self._offer and fields.get("compression") == COMPRESSION:
                self.compression = COMPRESSION
                self._compressor = FrameCompressor()
            self.state = s.READY
            self._events.append(hello)
        elif type_ == "origins":
            self._require(s.READY, s.SUBSCRIBED, s.COPYING)
            self.peer_origins.update(fields["origins"])
            self._events.append(event_from(OriginsAnnounced, fields))
        elif type_ == "caught_up":
            self._require(s.SUBSCRIBED)
            self.head_seq = max(self.head_seq, fields["seq"])
            self._events.append(event_from(CaughtUp, fields))
        elif type_ == "copy_begin":
            self._require(s.SUBSCRIBED)
            self._snapshot_seq = fields["snapshot_seq"]
            self.state = s.COPYING
            self._events.append(event_from(CopyBegan, fields))
        elif type_ == "copy_end":
            self._require(s.COPYING)
            snapshot_seq = fields["snapshot_seq"]
            if snapshot_seq != self._snapshot_seq:
                raise ProtocolError("copy_end does not match copy_begin")
            self.received_seq = snapshot_seq
            self.head_seq = max(self.head_seq, snapshot_seq)
            self.state = s.SUBSCRIBED
            self._events.append(event_from(CopyEnded, fields))
        elif type_ == "resync_required":
            self._require(s.SUBSCRIBED, s.COPYING)
            self.state = s.READY
            self._events.append(event_from(ResyncRequired, fields))
        else:
            raise ProtocolError(f"unexpected control frame {type_!r}")


class PublisherSession(_Session):
    """The listening side of a link: it streams its log to one subscriber.

    Attributes:
        sent_seq: the highest sequence sent (or copied up to) on this subscription.
        acked_seq: the highest sequence the subscriber acknowledged.
        subscription: the current :class:`SubscribeRequested`, if any.
        entries_sent, bytes_sent: counters for metrics.
    """

    _FAILED = PublisherState.FAILED
    _CLOSED = PublisherState.CLOSED
    _OPERATIONAL = frozenset({PublisherState.AWAIT_SUBSCRIBE, PublisherState.STREAMING})

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.state = PublisherState.AWAIT_HELLO
        self.subscription: SubscribeRequested | None = None
        self.sent_seq = 0
        self.acked_seq = 0
        self.entries_sent = 0
        self.copying = False
        self._announced: set[int] = set()
        self._peer_offers: list[str] = []

    def accept(self, database: str, tables: dict[str, Any], origins: dict[int, str],
               compression: bool = False) -> None:
        """Accept the peer's hello and answer with ours.

        Args:
            database: the database this link serves.
            tables: our table definitions.
            origins: our local origin-id map.

        Raises:
            RuntimeError: unless a hello was received and not yet answered.
        """
        if self.state is not PublisherState.AWAIT_HELLO or self.peer is None:
            raise RuntimeError("no hello to accept")
        if compression and COMPRESSION in self._peer_offers:
            self.compression = COMPRESSION
        self._send_hello(database, tables, origins, compression=self.compression)
        if self.compression is not None:
            self._compressor = FrameCompressor()
        self.state = PublisherState.AWAIT_SUBSCRIBE

    def reject(self, code: str, message: str) -> None:
        """Refuse the peer (e.g. unauthorized): queue an ``error`` and fail."""
        self.send_error(code, message)

    def send_entries(
        self,
        head_seq: int,
        entries: Sequence[tuple[int, int, bytes]],
        origin_names: Mapping[int, str],
    ) -> None:
        """Queue log entries, announcing new origin ids first, cut into batches.

        Args:
            head_seq: our newest log sequence.
            entries: ``(seq, origin_id, value)`` in increasing ``seq`` order.
            origin_names: names of (at least) the origin ids used by ``entries``.

        Raises:
            RuntimeError: unless streaming (and not in a copy).
            ValueError: if sequences do not increase past ``sent_seq`` or an
                origin id has no name.
        """
        self._require_streaming()
        previous = self.sent_seq
        new_ids: dict[int, str] = {}
        for seq, origin_id, _ in entries:
            if seq <= previous:
                raise ValueError(f"sequence {seq} does not follow {previous}")
            previous = seq
            if origin_id not in self._announced and origin_id not in new_ids:
                if origin_id not in origin_names:
                    raise ValueError(f"no name for origin id {origin_id}")
                new_ids[origin_id] = origin_names[origin_id]
        if new_ids:
            self._send("origins", origins=new_ids)
            self._announced.update(new_ids)
        builder = BatchBuilder()
        for seq, _, value in entries:
            if not builder.fits(value):
                self._queue_data(builder.build(head_seq))
            builder.add(seq, value)
            if builder.full:
                self._queue_data(builder.build(head_seq))
        if len(builder):
            self._queue_data(builder.build(head_seq))
        self.sent_seq = previous
        self.entries_sent += len(entries)

    def announce_origins(self, origin_names: Mapping[int, str]) -> None:
        """Queue an ``origins`` frame for the ids in ``origin_names`` not yet announced
        on this session (allowed during a copy)."""
        if self.state is not PublisherState.STREAMING:
            raise RuntimeError(f"not streaming (state {self.state.name})")
        new_ids = {oid: name for oid, name in origin_names.items()
                   if oid not in self._announced}
        if new_ids:
            self._send("origins", origins=new_ids)
            self._announced.update(new_ids)

    def send_caught_up(self, seq: int) -> None:
        """Tell the subscriber we reached the end of our log at ``seq``."""
        self._require_streaming()
        self._send("caught_up", seq=seq)

    def begin_copy(self, snapshot_seq: int, total: int, tables: Sequence[str]) -> None:
        """Start a full copy taken at log sequence ``snapshot_seq``."""
        self._require_streaming()
        self.copying = True
        self._send("copy_begin", snapshot_seq=snapshot_seq, total=total, tables=list(tables))

    def send_copy_rows(self, table: str, rows: Sequence[tuple[bytes, bytes]],
                       origins: Mapping[int, str] | None = None) -> None:
        """Queue rows of ``table`` in key order, in chunks of about 64 KiB.

        Args:
            table: the table name (with a NUL suffix for tombstones).
            rows: ``(key, stored value)`` pairs.
            origins: names of the origin ids these rows use; those not announced yet
                (assigned after our hello) are announced first, or the subscriber
                would drop rows it cannot attribute.
        """
        if not self.copying or self.state is not PublisherState.STREAMING:
            raise RuntimeError("no copy in progress")
        if origins:
            self.announce_origins(origins)
        for chunk in split_rows(rows):
            self._queue_data(encode_copy_chunk(table, chunk))

    def end_copy(self, snapshot_seq: int) -> None:
        """Finish the copy; streaming continues after ``snapshot_seq``."""
        if not self.copying or self.state is not PublisherState.STREAMING:
            raise RuntimeError("no copy in progress")
        self.copying = False
        self.sent_seq = snapshot_seq
        self._send("copy_end", snapshot_seq=snapshot_seq)

    def send_resync_required(self, oldest_seq: int, reason: str) -> None:
        """Tell the subscriber its cursor is behind retention; await a new subscribe."""
        self._require_streaming(allow_copying=True)
        self.copying = False
        self._send("resync_required", oldest_seq=oldest_seq, reason=reason)
        self.state = PublisherState.AWAIT_SUBSCRIBE

    def _require_streaming(self, allow_copying: bool = False) -> None:
        if self.state is not PublisherState.STREAMING:
            raise RuntimeError(f"not streaming (state {self.state.name})")
        if self.copying and not allow_copying:
            raise RuntimeError("a copy is in progress")

    def _receive_frame(self, frame: BatchFrame | CopyChunkFrame) -> None:
        raise ProtocolError("a publisher does not accept data frames")

    def _receive_control(self, type_: str, fields: dict[str, Any]) -> None:
        s = PublisherState
        if type_ == "hello":
            self._require(s.AWAIT_HELLO)
            if self.peer is not None:
                raise ProtocolError("duplicate hello")
            hello = event_from(PeerHello, fields)
            if hello.protocol != PROTOCOL_VERSION:
                raise ProtocolError(f"unsupported protocol version {hello.protocol}")
            offers = fields.get("compression")
            if isinstance(offers, list):
                self._peer_offers = [o for o in offers if isinstance(o, str)]
            self.peer = hello
            self._events.append(hello)
        elif type_ == "subscribe":
            self._require(s.AWAIT_SUBSCRIBE, s.STREAMING)
            self.subscription = event_from(SubscribeRequested, fields)
            self.sent_seq = self.subscription.after_seq
            self.copying = False
            self.state = s.STREAMING
            self._events.append(self.subscription)
        elif type_ == "ack":
            self._require(s.AWAIT_SUBSCRIBE, s.STREAMING)
            seq = fields["seq"]
            if seq > self.acked_seq:
                self.acked_seq = seq
                self._events.append(AckReceived(seq))
        else:
            raise ProtocolError(f"unexpected control frame {type_!r}")
