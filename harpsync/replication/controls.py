"""Operator stream controls: pausing, resuming and replaying the links from one peer.

``pause_replication``, ``resume_replication`` and ``replay_replication`` act on the
links of one peer (one database, or all). A pause is kept in the peer's ``hdb_nodes``
row (``paused``), so it survives a restart and a link re-made by a subscription change
starts held. One control runs at a time: each changes the links and then saves the
paused databases, and interleaved, a pause saved ``paused`` after a resume that came
later had cleared it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from harpsync.errors import BadRequestError

if TYPE_CHECKING:
    from harpsync.replication.seams import OriginPlanner
    from harpsync.replication.subscriber import Subscriber


class ControlsHost(Protocol):
    """What the controls need from the link runtime (the replicator)."""

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """The peers' ``hdb_nodes`` rows."""
        ...

    @property
    def subscribers(self) -> Mapping[tuple[str, str], Subscriber]:
        """The links, by (peer, database)."""
        ...

    @property
    def reconcile_lock(self) -> asyncio.Lock:
        """Held while links are made and retired."""
        ...

    async def save_row(self, row: dict[str, Any]) -> None:
        """Merge ``row`` into the peer's saved row."""
        ...


class StreamControls:
    """Pause, resume and replay, one at a time."""

    def __init__(self, host: ControlsHost, relays: OriginPlanner) -> None:
        self.host = host
        self.relays = relays
        self._lock = asyncio.Lock()

    def links_of(self, peer: str, database: str | None) -> list[Subscriber]:
        """The links from ``peer`` (for ``database``, or all), by database.

        Raises:
            BadRequestError: no such peer, or no such link.
        """
        if peer not in self.host.rows:
            raise BadRequestError(f"{peer} does not exist")
        subs = [s for (p, d), s in sorted(self.host.subscribers.items())
                if p == peer and (database is None or d == database)]
        if not subs:
            raise BadRequestError(f"no replication link from '{peer}'"
                                  + (f" for database '{database}'" if database else ""))
        return subs

    async def pause(self, peer: str, database: str | None) -> list[str]:
        """Stop receiving from ``peer``; the committed cursor is kept."""
        async with self._lock:
            databases = [s.database for s in self.links_of(peer, database)]
            # Saved first, and the links paused under the reconcile lock: a link that a
            # subscription change re-creates meanwhile starts held. Before, the pause
            # stopped the old link and the new one streamed on, paused only in the row.
            await self._persist_paused(peer, set(databases), set())
            async with self.host.reconcile_lock:
                for db_name in databases:
                    sub = self.host.subscribers.get((peer, db_name))
                    if sub is not None:
                        await sub.pause()
                    # Pausing stops the peer's own stream, also where another peer
                    # relays it (its direct link was down); the planner does not relay
                    # a paused origin.
                    await self.relays.release(peer, db_name)
            return databases

    async def resume(self, peer: str, database: str | None) -> list[str]:
        """Restart paused links from their committed cursor. The pause of a database
        whose link a subscription change removed meanwhile ends too (kept, it would
        hold that link again once a widening re-creates it)."""
        async with self._lock:
            held = {d for d in self.host.rows.get(peer, {}).get("paused") or []
                    if database is None or d == database}
            try:
                subs = self.links_of(peer, database)
            except BadRequestError:
                if not held:
                    raise
                subs = []
            for sub in subs:
                sub.resume()
            resumed = {s.database for s in subs} | held
            await self._persist_paused(peer, set(), resumed)
            return sorted(resumed)

    async def replay(self, peer: str, database: str | None, from_seq: int | None,
                     from_version: int | None) -> list[str]:
        """Rewind links to a publisher sequence (or to the start, skipping versions older
        than ``from_version``) and stream again; applying twice is harmless."""
        async with self._lock:
            subs = self.links_of(peer, database)
            for sub in subs:
                await sub.rewind(from_seq if from_seq is not None else 0, from_version or 0)
            await self._persist_paused(peer, set(), {s.database for s in subs})
            return [s.database for s in subs]

    async def _persist_paused(self, peer: str, add: set[str], remove: set[str]) -> None:
        """Keep the paused databases in the peer's row, so a pause survives a restart."""
        old = set(self.host.rows.get(peer, {}).get("paused") or [])
        new = (old | add) - remove
        if new != old and peer in self.host.rows:
            await self.host.save_row({"name": peer, "paused": sorted(new)})
