"""Background upkeep of the replication log: retention by acknowledgement and by age.

It depends on plain values, not on the replicator: the acknowledgements per (peer,
database), the peers' rows, the storage and two settings (read on every round, so a
live configuration change applies).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from harpsync.replication import peers
from harpsync.replication.seams import PeerRow
from harpsync.storage import horizon, retention
from harpsync.storage.database import Database
from harpsync.storage.store import Storage

log = logging.getLogger(__name__)

TOMBSTONE_EVERY = 60.0  # seconds between tombstone sweeps (they scan every tombstone)


def ack_floor(acks: Mapping[tuple[str, str], int], rows: Mapping[str, PeerRow],
              database: str) -> int | None:
    """The sequence every peer that receives ``database`` has acknowledged (None if no
    peer receives it; 0 for a peer that never acknowledged)."""
    floors = [acks.get((name, database), 0) for name, row in list(rows.items())
              if peers.publish_tables(row, database) is not False]
    return min(floors) if floors else None


def forget_removed(rows: Mapping[str, PeerRow], *by_peer: dict[Any, Any]) -> None:
    """Drop what ``by_peer`` maps (keys: a peer name, or ``(peer, database)``) for peers
    no longer in ``rows``: a peer added again under its name (wiped, say) must not be
    trusted to hold what its old self acknowledged until it subscribes again."""
    for table in by_peer:
        for key in [k for k in table if (k[0] if isinstance(k, tuple) else k) not in rows]:
            del table[key]


def limited_tables(rows: Mapping[str, PeerRow], database: str) -> list[list[str]]:
    """The table lists of ``database`` this node publishes to peers it sends only some
    tables to, ``[]`` for a peer an operator set to take none of it (``replicates:
    false``, or subscriptions that leave the database out). Such a peer receives no
    delete of the other tables, and may still hold the rows they removed (it took the
    table before a narrowing). Their tombstones must stay, or a widening later copies
    those rows back (see :func:`kept_tombstone_tables`). A node learned by gossip
    limits nothing: it never took rows from this node directly, and what relays
    brought it is guarded by the relays' own retention."""
    out: list[list[str]] = []
    for row in list(rows.values()):
        tables = peers.publish_tables(row, database)
        if tables is None:
            continue
        if tables is False:
            if not row.get("learned"):
                out.append([])
            continue
        out.append(list(tables))
    return out


def kept_tombstone_tables(db: Database, limited: Collection[Collection[str]]) -> set[str]:
    """The tables of ``db`` some peer receiving the database does not take: their
    tombstones are not pruned by acknowledgement nor age (a peer narrowed to other
    tables acknowledges past their deletes without receiving them; the rows it kept
    would come back when it takes the table again, on it and, by the copy back, here)."""
    return {name for name in db.tables if any(name not in tables for tables in limited)}


def forget_database(database: str, *by_link: dict[tuple[str, str], int]) -> None:
    """Drop what ``by_link`` holds for a dropped database: its log is gone, and a new one
    of that name starts again at sequence 1, so no peer holds any of it until it
    subscribes to it. Kept, a peer's position in the old log covered the new one's first
    sequences: ``wait_for_replication`` answered that a peer applied writes it never
    received (it was down), ``cluster_status`` showed it caught up, and retention pruned
    tombstones by its old acknowledgement."""
    for table in by_link:
        for key in [k for k in table if k[1] == database]:
            del table[key]


async def note_log_replaced(storage: Storage, database: str) -> None:
    """A peer's cursor named entries this node's log of ``database`` never held: it was
    restored from a backup (or replaced). Its rows written after the backup may be gone
    with no delete, so the tombstone horizons stop below them (``horizon.restored_job``)."""
    db = storage.databases.get(database)
    if db is None or db.closed:
        return
    version = await asyncio.to_thread(horizon.opened_own_version, db)
    log.warning("a peer's position in %s is past this node's log: it was restored or "
                "replaced; rows this node wrote after %d are not taken as deleted here",
                database, version)
    await storage.write(horizon.restored_job(db, version))


async def prune_database(storage: Storage, db: Database, retention_ms: int,
                         acked: int | None, now_ms: float | None = None,
                         tombstones: bool = True,
                         keep_tombstones: Collection[str] = ()) -> dict[str, int]:
    """Prune ``db``'s log entries older than ``retention_ms``, and tombstones that are
    both that old and acknowledged by every peer (``acked``: see :func:`ack_floor`),
    except those of the tables in ``keep_tombstones`` (:func:`kept_tombstone_tables`).

    Log entries are kept for the whole retention even when every peer has them, so the
    log stays a useful audit trail; a peer away for longer is repaired by a full copy.
    """
    if db.closed:  # dropped since the caller listed it: nothing left to prune
        return {"entries": 0, "tombstones": 0, "through": 0}
    now_ms = storage.hlc.wall_now_ms() if now_ms is None else now_ms
    cutoff_version = int(now_ms - retention_ms) << 16
    through = retention.seq_for_time(db, cutoff_version)
    tomb_floor = None
    read_through = None
    if not tombstones:
        pass
    elif acked is None:
        tomb_floor = cutoff_version
    elif acked:
        tomb_floor = min(cutoff_version, retention.version_at(db, acked) or 0)
        # The log is not in version order: a tombstone written by an entry after the
        # acknowledged one may be older than it, and no peer has it yet.
        oldest, read_through = await asyncio.to_thread(retention.oldest_version_after, db,
                                                       acked)
        if tomb_floor and oldest is not None:
            tomb_floor = min(tomb_floor, oldest)
    if through <= db.pruned_through() and not tomb_floor:
        return {"entries": 0, "tombstones": 0, "through": db.pruned_through()}
    job = retention.prune_log_job(db, through, tomb_floor, read_through,
                                  keep_tables=frozenset(keep_tombstones))
    result: dict[str, int] = await storage.write(job)
    if result["entries"] or result["tombstones"]:
        log.info("pruned %d log entries and %d tombstones of %s through %d",
                 result["entries"], result["tombstones"], db.name, result["through"])
    return result


async def retention_loop(storage: Storage, interval: float,
                         retention_ms: Callable[[], int],
                         acked: Callable[[str], int | None],
                         limited: Callable[[str], list[list[str]]] = lambda _db: [],
                         ) -> None:
    """Every ``interval`` seconds prune each database's log (tombstones at most every
    ``TOMBSTONE_EVERY``); ``acked(database)`` is that database's :func:`ack_floor`,
    ``limited(database)`` its :func:`limited_tables`."""
    last_sweep = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        sweep = time.monotonic() - last_sweep >= max(TOMBSTONE_EVERY, interval)
        if sweep:
            last_sweep = time.monotonic()
        for db in list(storage.databases.values()):
            try:
                keep = kept_tombstone_tables(db, limited(db.name)) if sweep else set()
                await prune_database(storage, db, retention_ms(), acked(db.name),
                                     tombstones=sweep, keep_tombstones=keep)
            except Exception:
                if db.closed:
                    # Dropped (by a peer's drop, through the system link) while it was
                    # read or pruned: its environment closed under the read, which is
                    # no failure of pruning.
                    continue
                log.exception("pruning %s failed", db.name)
