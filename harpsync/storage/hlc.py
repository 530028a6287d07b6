"""Hybrid logical clock: versions are ``(wall_ms << 16) | counter`` packed in 64 bits."""

from __future__ import annotations

import threading
import time

COUNTER_BITS = 16


def wall_ms_of(version: int) -> int:
    """The wall-clock milliseconds part of a version."""
    return version >> COUNTER_BITS


def version_to_ms(version: int) -> float:
    """A version as float milliseconds, the shape Harper uses for ``__updatedtime__``."""
    return version / float(1 << COUNTER_BITS)


def ms_to_version(ms: float) -> int:
    """The smallest version whose wall time is ``ms`` (for ``start_time`` filters)."""
    return int(ms) << COUNTER_BITS


class HLC:
    """A thread-safe hybrid logical clock.

    Every local commit takes ``max(now, last + 1)``; every received version moves the
    clock forward, so versions stay monotonic even when the wall clock steps back.
    """

    def __init__(self, last: int = 0) -> None:
        self._last = last
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        return self._last

    def now(self) -> int:
        """Return a new version strictly greater than every version seen so far."""
        wall = int(time.time() * 1000) << COUNTER_BITS
        with self._lock:
            self._last = wall if wall > self._last else self._last + 1
            return self._last

    @staticmethod
    def wall_now_ms() -> int:
        return int(time.time() * 1000)

    def observe(self, version: int) -> None:
        """Move the clock forward past a version received from a peer."""
        with self._lock:
            if version > self._last:
                self._last = version
