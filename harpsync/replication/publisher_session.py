"""The listening side of a link as a sans-I/O state machine: it streams its log."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from harpsync.compression import NAME as COMPRESSION
from harpsync.compression import FrameCompressor
from harpsync.replication.events import (
    AckReceived,
    PeerHello,
    SubscribeRequested,
    event_from,
)
from harpsync.replication.messages import (
    BatchBuilder,
    BatchFrame,
    CopyChunkFrame,
    ProtocolError,
    encode_copy_chunk,
    split_rows,
)
from harpsync.replication.session import PROTOCOL_VERSION, Session


class PublisherState(enum.Enum):
    """States of a :class:`PublisherSession`."""

    AWAIT_HELLO = "await_hello"
    AWAIT_SUBSCRIBE = "await_subscribe"
    STREAMING = "streaming"
    FAILED = "failed"
    CLOSED = "closed"


class PublisherSession(Session):
    """The listening side of a link: it streams its log to one subscriber.

    Attributes:
        sent_seq: the highest sequence sent (or copied up to) on this subscription.
        last_entry_seq: the sequence of the newest entry sent on this session (neither
            a subscribe nor a copy moves it; 0 before the first).
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
        self.last_entry_seq = 0
        self.acked_seq = 0
        self.entries_sent = 0
        self.copying = False
        self._announced: set[int] = set()
        self._peer_offers: list[str] = []

    def accept(self, database: str, tables: dict[str, Any], origins: dict[int, str],
               compression: bool = False,
               relay_tables: Mapping[str, list[str]] | None = None) -> None:
        """Accept the peer's hello and answer with ours.

        Args:
            database: the database this link serves.
            tables: our table definitions.
            origins: our local origin-id map.
            relay_tables: per origin this node takes only some tables from, those
                tables: what it can relay of that origin (the rest it never holds).

        Raises:
            RuntimeError: unless a hello was received and not yet answered.
        """
        if self.state is not PublisherState.AWAIT_HELLO or self.peer is None:
            raise RuntimeError("no hello to accept")
        if compression and COMPRESSION in self._peer_offers:
            self.compression = COMPRESSION
        self._send_hello(database, tables, origins, compression=self.compression,
                         relay_tables=None if relay_tables is None else dict(relay_tables))
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
        if entries:
            self.last_entry_seq = previous
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

    def begin_copy(self, snapshot_seq: int, total: int, tables: Sequence[str],
                   schema: Mapping[str, Any] | None = None,
                   horizons: Mapping[str, list[int]] | None = None,
                   floors: Mapping[str, int] | None = None) -> None:
        """Start a full copy taken at log sequence ``snapshot_seq``; ``schema`` is the
        schema it was taken with (as in a hello), read after the snapshot; ``horizons``
        the tables' tombstone horizons (``replication/copysweep.py``); ``floors`` per
        origin, the version through which this node held all its transactions before
        reading any row (an optional field: older peers ignore it)."""
        self._require_streaming()
        self.copying = True
        self._send("copy_begin", snapshot_seq=snapshot_seq, total=total, tables=list(tables),
                   **({} if schema is None else {"schema": dict(schema)}),
                   **({"horizons": dict(horizons)} if horizons else {}),
                   **({"floors": dict(floors)} if floors else {}))

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
