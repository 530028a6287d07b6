"""Events that replication sessions report through ``events_received()``.

Each is a small frozen dataclass whose fields carry the same names as the control frame
it comes from, so :func:`event_from` can build it from a validated frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar


class Event:
    """Base of everything a session reports through ``events_received()``."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class PeerHello(Event):
    """The peer introduced itself."""

    node: str
    database: str
    protocol: int
    tables: dict[str, Any]
    origins: dict[int, str]


@dataclass(frozen=True, slots=True)
class OriginsAnnounced(Event):
    """The publisher announced origin ids (merged into ``peer_origins``)."""

    origins: dict[int, str]


@dataclass(frozen=True, slots=True)
class EntriesReceived(Event):
    """A batch of ``(seq, value)`` log entries arrived."""

    head_seq: int
    entries: list[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class CopyBegan(Event):
    """A full copy starts; streaming resumes after ``snapshot_seq``."""

    snapshot_seq: int
    total: int
    tables: list[str]
    # The schema the copy was taken with (as a hello describes it; None from older
    # peers): learned before any row, in place of the hello's.
    schema: dict[str, Any] | None = None
    # Per table, ``[incarnation, version]`` of the newest tombstone the publisher swept
    # (``replication/copysweep.py``; None from older peers).
    horizons: dict[str, Any] | None = None
    # Per origin, the version through which the publisher held all of that origin's
    # transactions before it read any row (None from older peers): the receiver's
    # floors once the copy is applied (``Applier.copy_floors``).
    floors: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class CopyRows(Event):
    """A chunk of ``(key, value)`` rows of one table arrived during a copy."""

    table: str
    rows: list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class CopyEnded(Event):
    """The full copy is complete."""

    snapshot_seq: int


@dataclass(frozen=True, slots=True)
class CaughtUp(Event):
    """The publisher reached the end of its log at ``seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class ResyncRequired(Event):
    """The requested sequence is behind retention; a full copy is needed."""

    oldest_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class SubscribeRequested(Event):
    """The subscriber asked for the stream (``None`` filters mean "all")."""

    after_seq: int
    origins: dict[str, int | None] | None
    tables: list[str] | None
    copy: bool
    copy_resume: dict[str, Any] | None
    # Per origin, the only tables of its writes to send (streamed or copied): what
    # the subscriber takes from that origin directly (None from older peers).
    origin_tables: dict[str, list[str]] | None = None


@dataclass(frozen=True, slots=True)
class AckReceived(Event):
    """The subscriber committed everything up to ``seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class OperationRequested(Event):
    """The peer asks us to run an operation; answer with ``respond_operation``."""

    id: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OperationCompleted(Event):
    """The peer answered one of our operation requests."""

    id: int
    result: Any
    error: str | None


@dataclass(frozen=True, slots=True)
class ProtocolFailed(Event):
    """We failed the session because the peer broke the protocol."""

    message: str


@dataclass(frozen=True, slots=True)
class PeerFailed(Event):
    """The peer sent an ``error`` frame and the session is over."""

    code: str
    message: str


_E = TypeVar("_E", bound=Event)


def event_from(cls: type[_E], fields: Mapping[str, Any]) -> _E:
    """Build an event whose field names are those of its (validated) control frame."""
    names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{name: fields.get(name) for name in names})
