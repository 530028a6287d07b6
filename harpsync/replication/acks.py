"""A subscriber's acks of committed batches, paced: at most one per ``ACK_INTERVAL``.

Each commit of a link's batches moves its cursor; the origin learns of it by an ack.
The first commit after a quiet spell is acked at once; commits that follow within
``ACK_INTERVAL`` are acked together by a timer, with the newest sequence, so a busy
link sends one small frame per interval instead of one per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from harpsync.replication.protocol import SubscriberSession
from harpsync.replication.transport import Link

# Each ack is a frame the origin must take in and decrypt: with a lone client writing one
# record per commit, an ack per commit cost the origin about a seventh of its extra work
# per record. ``wait_for_replication`` waits at most this much longer.
ACK_INTERVAL = 0.005

# The link's current session and socket (either None while it is not connected).
Current = Callable[[], tuple[SubscriberSession | None, Link | None]]


class AckPacer:
    """Sends a link's acks, paced (see the module docstring).

    Args:
        current: the link's session and socket now; an ack due for an ended session is
            dropped (the next one subscribes from the committed cursor).
        confirmed: called whenever an ack went to the session (the link's
            ``last_commit_confirmed``).
    """

    def __init__(self, current: Current, confirmed: Callable[[], None]) -> None:
        self._current = current
        self._confirmed = confirmed
        self._acked_at = 0.0  # monotonic time of the last ack sent
        self._due = 0  # a sequence to ack when the timer fires
        self._timer: asyncio.TimerHandle | None = None
        self._flush: asyncio.Future[None] | None = None  # (kept: tasks are weakly held)

    def ack(self, seq: int) -> None:
        """``seq`` is committed: ack it now, or when the interval since the last ends."""
        session, _ = self._current()
        if session is None:
            return
        now = time.monotonic()
        wait = self._acked_at + ACK_INTERVAL - now
        if wait > 0:
            self._due = max(self._due, seq)
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(
                    wait, self._send_due, session)
            return
        self._acked_at = now
        if session.ack(seq):
            self._confirmed()

    def _send_due(self, session: SubscriberSession) -> None:
        self._timer = None
        current, link = self._current()
        if session is not current or link is None:
            return  # the session ended: the next one subscribes from the cursor
        self._acked_at = time.monotonic()
        if not session.ack(self._due):
            return
        self._confirmed()
        # Straight onto the socket when it takes the frame at once (a task per timed
        # ack cost the peer a task's creation and an event-loop iteration); else, or
        # for what is left, a task that awaits the socket.
        frames = session.data_to_send()
        for i, frame in enumerate(frames):
            if not link.send_now(frame):
                self._flush = asyncio.ensure_future(_send_quietly(link, frames[i:]))
                return

    def send_due_now(self) -> None:
        """The link stops with an ack waiting for its timer: it goes now, if the socket
        takes it at once, or the origin would not know of those commits until the link
        runs again (``wait_for_replication`` would wait for them)."""
        if self._timer is None:
            return
        self._timer.cancel()
        self._timer = None
        session, link = self._current()
        if session is None or link is None or not session.ack(self._due):
            return
        self._confirmed()
        for frame in session.data_to_send():
            if not link.send_now(frame):
                break

    def reset(self) -> None:
        """A new session: nothing of the last one's pacing carries over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._acked_at, self._due = 0.0, 0


async def _send_quietly(link: Link, frames: list[bytes]) -> None:
    # A link that fails now is ended and reported by its receive loop.
    with contextlib.suppress(Exception):
        for frame in frames:
            await link.send(frame)
