"""How a link comes back: reconnect backoff, the per-peer reachability gate, and the
short, secret-free cause a failed dial leaves in ``last_error``."""

from __future__ import annotations

import asyncio
import random

from harpsync.security import describe_tls_error

# Reconnect backoff: short enough that a link is back within a few seconds of a network
# heal, with jitter so links do not dial in lockstep. While a peer is unreachable only
# its system link keeps probing at this pace; its database links wait for that probe
# (see ``PeerGate``), so a dead peer sees about one dial per interval, not one per link.
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
# Database links of an unreachable peer still dial on their own this often, in case
# only the system link cannot connect.
GATED_RETRY = 10.0
# A dial that takes longer than this is abandoned and retried: a long open timeout
# would hold a link down long after the network heals.
DIAL_TIMEOUT = 4.0


class PeerGate:
    """Reachability of one peer, shared by all links to it.

    The system link is the probe: when it fails to dial, the peer is marked down and
    the database links wait (up to ``GATED_RETRY``) for it to connect again instead of
    each dialing a dead peer.
    """

    def __init__(self) -> None:
        self.reachable = asyncio.Event()
        self.reachable.set()

    def mark_down(self) -> None:
        self.reachable.clear()

    def mark_up(self) -> None:
        self.reachable.set()

    async def wait_up(self, timeout: float) -> bool:
        """Wait until the peer is reachable again; False if ``timeout`` passed first."""
        try:
            # Not ``wait_for``: on Python 3.11 it drops a cancellation that arrives as
            # the event is set, and a link that ignores its cancellation never retires.
            async with asyncio.timeout(timeout):
                await self.reachable.wait()
        except TimeoutError:
            return False
        return True


def backoff_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures: doubling from
    ``MIN_BACKOFF``, capped at ``MAX_BACKOFF``, with jitter (never above the cap)."""
    # The exponent is capped: a link to a peer down for good counts a failure about
    # every second, and ``2.0 ** 1024`` raises OverflowError (the link's task died).
    base = min(MIN_BACKOFF * 2.0 ** min(max(0, failures - 1), 64), MAX_BACKOFF)
    return base * random.uniform(0.5, 1.0)


def describe_error(exc: BaseException) -> str:
    """A short, secret-free cause for ``last_error`` and ``add_node`` errors."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    tls = describe_tls_error(exc)
    if tls is not None:
        return tls
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:200]
