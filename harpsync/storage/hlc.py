"""Hybrid logical clock: versions are ``(wall_ms << 16) | counter`` packed in 64 bits."""

from __future__ import annotations

import math
import os
import threading
import time

COUNTER_BITS = 16
# Shifts this node's wall clock, for tests and diagnostics of clock skew only.
OFFSET_ENV = "HARPSYNC_CLOCK_OFFSET_MS"


def wall_ms_of(version: int) -> int:
    """The wall-clock milliseconds part of a version."""
    return version >> COUNTER_BITS


def version_to_ms(version: int) -> float:
    """A version as float milliseconds, the shape Harper uses for ``__updatedtime__``."""
    return version / float(1 << COUNTER_BITS)


def ms_to_version(ms: float) -> int:
    """The smallest version whose wall time is ``ms`` (for ``start_time`` filters)."""
    return int(ms) << COUNTER_BITS


def first_version_at(ms: float) -> int:
    """The smallest version that ``version_to_ms`` shows at or after ``ms``: versions
    below it read as earlier than ``ms``, to the fraction of a millisecond."""
    return math.ceil(ms * (1 << COUNTER_BITS))


def _offset_from_env() -> int:
    raw = os.environ.get(OFFSET_ENV, "").strip()
    try:
        return int(raw) if raw else 0
    except ValueError:
        return 0


class ClockSkewError(ValueError):
    """A peer's version lies further ahead of this node's clock than the allowed skew."""

    def __init__(self, version: int, ahead_ms: int, bound_ms: int) -> None:
        super().__init__(
            f"clock skew: a version stamped {ahead_ms} ms ahead of this node's clock "
            f"exceeds replication.maxClockSkew ({bound_ms} ms); it is held back until the "
            f"clocks agree")
        self.version = version
        self.ahead_ms = ahead_ms


class HLC:
    """A thread-safe hybrid logical clock.

    Every local commit takes ``max(now, last + 1)``; every received version moves the
    clock forward, so versions stay monotonic even when the wall clock steps back. A
    version further ahead of the wall clock than ``max_skew_ms`` never moves the clock:
    one peer with a clock years ahead must not drag every node into its future.
    """

    def __init__(self, last: int = 0, max_skew_ms: int = 60_000,
                 offset_ms: int | None = None) -> None:
        self._last = last
        self._lock = threading.Lock()
        self.max_skew_ms = max_skew_ms
        self.offset_ms = _offset_from_env() if offset_ms is None else offset_ms

    @property
    def last(self) -> int:
        return self._last

    def wall_now_ms(self) -> int:
        """This node's wall clock in milliseconds (with the test offset, if any)."""
        return int(time.time() * 1000) + self.offset_ms

    def now(self) -> int:
        """Return a new version strictly greater than every version seen so far."""
        wall = self.wall_now_ms() << COUNTER_BITS
        with self._lock:
            self._last = wall if wall > self._last else self._last + 1
            return self._last

    def now_after(self, floor: int) -> int:
        """A new version for a local write that must beat a stored version ``floor``.

        The clock follows ``floor`` even past the skew bound: ``floor`` is a version
        stored here (accepted within the bound when it arrived, so past it only when
        this node's clock stepped back), and this node's own versions must keep rising.
        A peer takes an origin's log to be in version order and, subscribing again,
        skips what is at or below the newest version it holds from it: a later write
        stamped below this one would never reach it.
        """
        wall = self.wall_now_ms() << COUNTER_BITS
        with self._lock:
            self._last = wall if wall > self._last else self._last + 1
            if floor >= self._last:
                self._last = floor + 1
            return self._last

    def limit(self) -> int:
        """The highest version this node accepts from a peer right now."""
        return ((self.wall_now_ms() + self.max_skew_ms) << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1)

    def check(self, version: int) -> None:
        """Refuse a peer's version beyond the skew bound.

        Raises:
            ClockSkewError: ``version`` is more than ``max_skew_ms`` ahead of the clock.
        """
        if version > self.limit():
            ahead = wall_ms_of(version) - self.wall_now_ms()
            raise ClockSkewError(version, ahead, self.max_skew_ms)

    def advance_past(self, version: int) -> None:
        """Move the clock to at least ``version``, whatever the skew bound: for versions
        this node issued itself, which its next ones must exceed."""
        with self._lock:
            if version > self._last:
                self._last = version

    def observe(self, version: int) -> None:
        """Move the clock forward past a version received from a peer (within bounds)."""
        if version <= self.limit():
            self.advance_past(version)
