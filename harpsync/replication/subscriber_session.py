"""The dialing side of a link as a sans-I/O state machine: it receives one database."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from harpsync.compression import NAME as COMPRESSION
from harpsync.compression import FrameCompressor
from harpsync.replication.events import (
    CaughtUp,
    CopyBegan,
    CopyEnded,
    CopyRows,
    EntriesReceived,
    OriginsAnnounced,
    PeerHello,
    ResyncRequired,
    event_from,
)
from harpsync.replication.messages import (
    BatchFrame,
    CopyChunkFrame,
    ProtocolError,
)
from harpsync.replication.session import PROTOCOL_VERSION, Session


class SubscriberState(enum.Enum):
    """States of a :class:`SubscriberSession`."""

    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    READY = "ready"
    SUBSCRIBED = "subscribed"
    COPYING = "copying"
    FAILED = "failed"
    CLOSED = "closed"


class SubscriberSession(Session):
    """The dialing side of a link: it receives one database from the publisher.

    Attributes:
        peer_origins: the publisher's origin-id map, from its hello and ``origins``.
        received_seq: the highest publisher sequence received (or copied up to).
        head_seq: the publisher's newest sequence as last reported.
        acked_seq: the highest sequence acknowledged to the publisher.
        entries_received, bytes_received: counters for metrics.

    A link's status reads these counters here (they are not copied elsewhere); a
    session that replaces another on the same link continues its reported positions
    (``previous``).
    """

    _FAILED = SubscriberState.FAILED
    _CLOSED = SubscriberState.CLOSED
    _OPERATIONAL = frozenset(
        {SubscriberState.READY, SubscriberState.SUBSCRIBED, SubscriberState.COPYING}
    )

    def __init__(
        self, node: str, database: str, tables: dict[str, Any], origins: dict[int, str],
        compression: bool = False, previous: SubscriberSession | None = None,
    ) -> None:
        super().__init__(node)
        self._offer = compression
        self.state = SubscriberState.IDLE
        self.database = database
        self.tables = tables
        self.origins = origins
        self.peer_origins: dict[int, str] = {}
        # Per origin the peer takes only some tables from: those tables (its hello).
        self.relay_tables: dict[str, list[str]] = {}
        # Until it subscribes, a new session reports where the link's last one was.
        self.received_seq: int = previous.received_seq if previous is not None else 0
        self.head_seq: int = previous.head_seq if previous is not None else 0
        self.acked_seq = 0
        self.entries_received = 0
        self._snapshot_seq: int | None = None
        # The publisher's last ``caught_up`` of this subscription: it has read its log
        # through there, so every later entry must come after it.
        self._reported_seq = 0

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
        origin_tables: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Ask the publisher for its log after ``after_seq``.

        Args:
            after_seq: the publisher sequence to start after.
            origins: origin name to exclusive minimum version (``None``: no
                minimum), or ``None`` for every origin.
            tables: table names, or ``None`` for every table.
            copy: request a full copy before streaming.
            copy_resume: ``{"table": str, "key": bytes}`` to resume a copy.
            origin_tables: per origin other than the publisher, the only tables whose
                writes by that origin to send (none or empty: no such limit).

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
            **({"origin_tables": {k: list(v) for k, v in origin_tables.items()}}
               if origin_tables else {}),
        )
        self.received_seq = after_seq
        self._reported_seq = 0
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
        previous = max(self.received_seq, self._reported_seq)
        for seq, _ in frame.entries:
            if seq <= previous:
                raise ProtocolError(f"sequence {seq} does not follow {previous}")
            previous = seq
        self.received_seq = max(self.received_seq, previous)
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
            relay = fields.get("relay_tables")
            self.relay_tables = {str(k): [str(t) for t in v] for k, v in relay.items()
                                 if isinstance(v, list)} if isinstance(relay, dict) else {}
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
            self._reported_seq = max(self._reported_seq, fields["seq"])
            self.head_seq = max(self.head_seq, fields["seq"])
            self._events.append(event_from(CaughtUp, fields))
        elif type_ == "copy_begin":
            self._require(s.SUBSCRIBED)
            self._snapshot_seq = fields["snapshot_seq"]
            self.head_seq = max(self.head_seq, fields["snapshot_seq"])
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
