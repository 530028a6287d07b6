"""Which link carries which origin's transactions: one copy per link.

Each link to a peer asks for that peer's own transactions, and for the transactions of
origins this node cannot hear directly: an origin whose direct link is down (for longer
than ``RELAY_AFTER``), or with which this node has no data link for the database at
all (a node known only by gossip, a removed node). Those are assigned to one healthy
peer, the relay: one whose link carries all this node takes of the origin before one
that carries only some tables of it. Every request carries a per-origin version floor,
the newest version this node already holds from that origin by any path, so switching
between the direct path and a relay neither loses nor repeats a transaction.

Hand-over is ordered: a relay is assigned only after the direct link's last write
finished, and a direct link releases its relay (and waits for the relay link's last
write) before it subscribes with its floor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

log = logging.getLogger(__name__)

RELAY_AFTER = 1.5  # seconds a direct link must be down before a relay takes over
TICK = 0.25


class RelayLink(Protocol):
    """What the planner needs of one (peer, database) link."""

    peer: str
    database: str
    paused: bool

    @property
    def reachable(self) -> bool: ...

    @property
    def streaming(self) -> bool: ...

    def origin_names(self) -> Iterable[str]: ...

    async def restart(self) -> None: ...

    async def settle(self) -> None: ...


class RelayingSocket(Protocol):
    """What the planner needs of one inbound socket (a peer pulling from this node)."""

    def relayed_origins(self) -> Iterable[str]: ...


def asking(sockets: Mapping[tuple[str, str], Iterable[RelayingSocket]],
           database: str) -> set[tuple[str, str]]:
    """The ``(peer, origin)`` pairs of ``database`` whose peer takes ``origin``'s
    writes from this node as its relay (``sockets``: per (peer, database))."""
    return {(peer, origin) for (peer, db), socks in list(sockets.items()) if db == database
            for sock in list(socks) for origin in sock.relayed_origins()}


class RelayPlanner:
    """Assigns origins without a healthy direct link to one relay link per database."""

    def __init__(self, node_name: str, links: Callable[[], Mapping[tuple[str, str], RelayLink]],
                 databases: Callable[[], Iterable[str]],
                 known_origins: Callable[[str], Iterable[str]],
                 asking: Callable[[str], Iterable[tuple[str, str]]] = lambda _db: (),
                 carries_all: Callable[[str, str, str], bool] = lambda _p, _o, _db: True,
                 ) -> None:
        """``asking(database)``: the ``(peer, origin)`` pairs of peers that take
        ``origin``'s writes of ``database`` from this node, as their relay: they do not
        hear it directly either, and are no use as its relay here.
        ``carries_all(peer, origin, database)``: whether the link from ``peer`` carries
        every table this node takes of ``origin`` (not only some, by its subscription
        or the peer's own); such a relay is preferred."""
        self.node_name = node_name
        self._links = links
        self._databases = databases
        self._known_origins = known_origins
        self._asking = asking
        self._carries_all = carries_all
        # database -> origin -> relay peer
        self.assignments: dict[str, dict[str, str]] = {}
        self._down_since: dict[tuple[str, str], float] = {}
        self._lock = asyncio.Lock()

    def _down_for(self, link: RelayLink, now: float) -> bool:
        """Whether ``link`` has been unreachable for longer than ``RELAY_AFTER``."""
        since = self._down_since.get((link.peer, link.database))
        return since is not None and now - since >= RELAY_AFTER

    def covered(self, peer: str, database: str) -> set[str]:
        """The origins the link to ``peer`` asks for: the peer and what it relays."""
        relayed = {o for o, r in self.assignments.get(database, {}).items() if r == peer}
        return {peer} | relayed

    async def release(self, origin: str, database: str) -> None:
        """The direct link to ``origin`` is about to subscribe: stop relaying it."""
        async with self._lock:
            relay = self.assignments.get(database, {}).pop(origin, None)
            if relay is None:
                return
            link = self._links().get((relay, database))
            if link is not None:
                log.info("%s/%s: direct link back, %s stops relaying it",
                         origin, database, relay)
                await link.restart()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.plan()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay planning failed")

    async def plan(self, now: float | None = None) -> None:
        """One planning pass over every replicated database."""
        now = time.monotonic() if now is None else now
        async with self._lock:
            links = dict(self._links())
            for database in list(self._databases()):
                await self._plan_database(database, links, now)

    async def _plan_database(self, database: str, links: Mapping[tuple[str, str], RelayLink],
                             now: float) -> None:
        current = self.assignments.setdefault(database, {})
        origins = set(self._known_origins(database))
        for link in links.values():
            if link.database == database:
                origins.update(link.origin_names())
        origins.discard(self.node_name)
        for key in [k for k in self._down_since if k[1] == database and k not in links]:
            del self._down_since[key]  # a link gone (peer removed): added again, it starts anew
        for (peer, db), link in links.items():
            if db == database:
                if link.reachable or link.paused:
                    self._down_since.pop((peer, db), None)
                else:
                    self._down_since.setdefault((peer, db), now)
        relays = sorted(peer for (peer, db), link in links.items()
                        if db == database and not link.paused and link.streaming)
        asking: set[tuple[str, str]] | None = None  # read only if an origin needs a relay
        released: set[str] = set()
        changed: set[str] = set()
        for origin in sorted(origins):
            direct = links.get((origin, database))
            if direct is not None and not self._down_for(direct, now):
                continue  # released by the direct link itself when it subscribes
            relay = current.get(origin)
            kept = links.get((relay, database)) if relay is not None else None
            live = kept is not None and not kept.paused and not self._down_for(kept, now)
            # A peer that takes the origin from this node has nothing of it to relay
            # here: two nodes cut from the same origin chose each other (the first by
            # name), and neither received its writes until the heal.
            if asking is None:
                asking = set(self._asking(database))
            useful = [p for p in relays if p != origin and (p, origin) not in asking]
            # A relay carrying only some of what this node takes of the origin leaves
            # the rest with no path while it stays (an origin relays are the only path
            # of: for good): one that carries all of it comes first.
            full = [p for p in useful if self._carries_all(p, origin, database)]
            if live and (not useful or ((relay, origin) not in asking
                                        and (not full or relay in full))):
                continue  # sticky: a relay restarting (to change origins) stays the relay
            choice = next(iter(full or useful), None)
            if choice is None:
                choice = next((p for p in relays if p != origin), None)
            if choice == relay:
                continue
            if direct is not None:
                await direct.settle()  # its last write sets the floor the relay starts at
            if live and relay is not None:
                released.add(relay)  # it stops carrying the origin before the new one
            if choice is None:
                current.pop(origin, None)
            else:
                current[origin] = choice
                changed.add(choice)
                log.info("%s/%s: no direct link, relayed by %s", origin, database, choice)
        for origin, relay in list(current.items()):
            if origin not in origins:
                del current[origin]
                changed.add(relay)
        # The relays given up first: their last writes set the floors the new ones
        # start at, and no origin is carried by two links at once.
        for peer in [*sorted(released), *sorted(changed - released)]:
            relay_link = links.get((peer, database))
            if relay_link is not None:
                await relay_link.restart()
