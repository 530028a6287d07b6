"""Sans-I/O replication sessions, in the style of websockets' ``protocol.py``.

A session is fed whole WebSocket messages with :meth:`receive`, and the caller
drains :meth:`events_received` and :meth:`data_to_send`. Sessions know frames,
states and cursors; they never touch sockets, event loops or storage, so two of
them can be driven back to back in memory.

:class:`SubscriberSession` is the dialing side that receives a database stream;
:class:`PublisherSession` is the listening side that sends its log.

The sessions live in three modules, one per reason to change: :mod:`session` (what
both sides share), :mod:`subscriber_session` and :mod:`publisher_session`; the
publisher's decisions are pure functions in :mod:`steps`. This module is the one
import for all of them and for the events they emit.
"""

from __future__ import annotations

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
)
from harpsync.replication.publisher_session import PublisherSession, PublisherState
from harpsync.replication.session import PROTOCOL_VERSION, Session, lag
from harpsync.replication.subscriber_session import SubscriberSession, SubscriberState

__all__ = [
    "PROTOCOL_VERSION",
    "AckReceived",
    "CaughtUp",
    "CopyBegan",
    "CopyEnded",
    "CopyRows",
    "EntriesReceived",
    "Event",
    "OperationCompleted",
    "OperationRequested",
    "OriginsAnnounced",
    "PeerFailed",
    "PeerHello",
    "ProtocolFailed",
    "PublisherSession",
    "PublisherState",
    "ResyncRequired",
    "Session",
    "SubscribeRequested",
    "SubscriberSession",
    "SubscriberState",
    "lag",
]
