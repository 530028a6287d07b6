"""The publisher's decisions, as pure functions (sans-I/O, like ``protocol.py``).

A publisher serving one subscription repeats: read its log after a position, then do
what :func:`next_step` says. Whether to resync (the cursor is past the head, or the log
it needs was pruned), to copy, to stream or to report ``caught_up`` is decided here from
plain values, so every rule can be tested in memory; ``publisher.py`` only performs the
step (reads, sends, waits).

Steps:

- :class:`Resync`: send ``resync_required`` and wait for a new subscribe.
- :class:`Copy`: send a full copy first, then stream after its snapshot.
- :class:`Stream`: read the log after ``after_seq`` (entries, if any, were sent first).
- :class:`CaughtUp`: report the end of the log at ``seq``, then wait for a commit.
- :class:`Wait`: wait for a commit, at most ``timeout`` seconds (None: no limit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# After the first, caught_up reports go out at most this often (seconds): one per commit
# would cost a frame each way, and where the entries read were filtered out (the peer's
# own transactions coming back, other tables) each report makes the subscriber commit its
# cursor, a synced commit on the far side per write there.
CAUGHT_UP_INTERVAL = 0.5


@dataclass(frozen=True)
class Resync:
    """Send ``resync_required(oldest_seq, reason)``; the subscriber must copy again."""

    oldest_seq: int
    reason: str


@dataclass(frozen=True)
class Copy:
    """Send a full copy, then stream after its snapshot."""


@dataclass(frozen=True)
class Stream:
    """Read the log after ``after_seq``."""

    after_seq: int


@dataclass(frozen=True)
class CaughtUp:
    """Send ``caught_up(seq)``, then wait for a commit."""

    seq: int


@dataclass(frozen=True)
class Wait:
    """Wait for a commit, for at most ``timeout`` seconds (None: until one comes)."""

    timeout: float | None


Step = Resync | Copy | Stream | CaughtUp | Wait


@dataclass(frozen=True)
class Reported:
    """The last ``caught_up`` of a session: its sequence (-1: none yet) and when (a
    monotonic time)."""

    seq: int = -1
    at: float = 0.0


@dataclass(frozen=True)
class LogRead:
    """What one read of the log returned.

    Attributes:
        pruned_through: every entry up to this sequence is gone.
        last_seq: the sequence of the last entry read (None: nothing after the cursor).
        full: the read stopped at its limit (there may be more).
        woken: a commit came in since the read.
    """

    pruned_through: int
    last_seq: int | None = None
    full: bool = False
    woken: bool = False


def first_step(after_seq: int, copy: bool, head_seq: int,
               known_through: int | None = None) -> Resync | Copy | Stream:
    """What to do on a new subscribe.

    Args:
        after_seq: the subscriber's cursor in this node's log.
        copy: whether it asked for a full copy.
        head_seq: this node's newest log sequence.
        known_through: the newest sequence the cursor can rightly be at: the head when
            this process opened the log, or what it sent to this subscriber since.

    Returns:
        :class:`Copy` if asked; :class:`Resync` when the cursor is past the head (this
        node's log was reset: wiped or restored), or past ``known_through`` (restored,
        and written again since: the cursor names entries this log never sent), else
        :class:`Stream` after the cursor.
    """
    if copy:
        return Copy()
    if after_seq > head_seq:
        return Resync(head_seq, f"cursor {after_seq} is beyond this node's log head {head_seq}")
    if known_through is not None and after_seq > known_through:
        return Resync(head_seq, f"cursor {after_seq} is past this node's log as it started "
                                f"({known_through}) and nothing since took it there: the "
                                "log was restored or replaced")
    return Stream(after_seq)


def copy_resumable(snapshot: int, head_seq: int, known_through: int) -> bool:
    """Whether an interrupted copy may resume at its ``snapshot``: only if this log can
    have sent it (the same rule as a cursor in :func:`first_step`). Past the head, or
    past the head at open and anything sent since (the log was restored and written
    again), the stream after the copy would skip the entries up to the old snapshot:
    the copy starts over."""
    return snapshot <= head_seq and snapshot <= known_through


def floors_cover(origins: Mapping[str, int | None] | None,
                 pruned_max: Mapping[str, int]) -> bool:
    """Whether a subscription with per-origin version floors lost nothing to pruning:
    every requested origin's newest pruned version is at or below its floor.

    Without floors (every origin) or without a record of pruned versions (pruned
    before they were kept), the pruned part may hold anything: not covered.
    """
    if origins is None or not pruned_max:
        return False
    return all(pruned_max.get(name, 0) <= (floor or 0) for name, floor in origins.items())


def sendable(pos: int, pruned_through: int, origins: Mapping[str, int | None] | None,
             pruned_max: Mapping[str, int] | None) -> bool:
    """Whether entries read after ``pos`` may be sent: nothing after ``pos`` was pruned,
    or the floors cover everything that was (then :func:`next_step` streams on)."""
    return pruned_through <= pos or floors_cover(origins, pruned_max or {})


def next_step(pos: int, read: LogRead, reported: Reported, now: float, *,
              origins: Mapping[str, int | None] | None = None,
              pruned_max: Mapping[str, int] | None = None,
              interval: float = CAUGHT_UP_INTERVAL) -> Resync | Stream | CaughtUp | Wait:
    """What to do after reading the log after ``pos``.

    Args:
        pos: the position the read started after.
        read: what the read returned.
        reported: the last ``caught_up`` of this session.
        now: the current monotonic time.
        origins: the subscription's per-origin version floors (None: every origin).
        pruned_max: the newest pruned version per origin; needed only when the read
            says entries after ``pos`` were pruned.
        interval: the least time between two ``caught_up`` reports after the first.

    Returns:
        When entries after ``pos`` were pruned: :class:`Resync` unless the floors
        cover everything pruned, else :class:`Stream` after the last entry read (the
        caller sends the entries a partial prune left; see :func:`sendable`), or from
        the pruned point when none is left. When
        entries were read (the caller sends them) and more may follow:
        :class:`Stream` after the last one. At the end of the log: :class:`CaughtUp`
        if the position was not reported yet and the last report is old enough,
        :class:`Wait` until it is, or :class:`Wait` for a commit.
    """
    if read.pruned_through > pos:
        if not floors_cover(origins, pruned_max or {}):
            return Resync(read.pruned_through + 1,
                          f"log entries up to {read.pruned_through} were pruned; "
                          f"cursor is {pos}")
        # Nothing pruned is above the floors. ``purge_stream`` removes one table's
        # entries and keeps the rest: those read (and sent) here go on after the last.
        return Stream(read.pruned_through if read.last_seq is None else read.last_seq)
    if read.last_seq is not None:
        pos = read.last_seq
        if read.full or read.woken:
            return Stream(pos)
    if reported.seq == pos:
        return Wait(None)
    # The first report of a session goes out at once (the subscriber's state and lag
    # follow it); later ones at most every ``interval``: each makes the subscriber
    # commit its cursor.
    due = 0.0 if reported.seq < 0 else reported.at + interval - now
    if due <= 0:
        return CaughtUp(pos)
    return Wait(due)
