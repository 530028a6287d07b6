"""Background upkeep of the replication log: retention by acknowledgement and by age.

It depends on plain values, not on the replicator: the acknowledgements per (peer,
database), the peers' rows, the storage and two settings (read on every round, so a
live configuration change applies).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from harpsync.replication import peers
from harpsync.replication.seams import PeerRow
from harpsync.storage import retention
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


async def prune_database(storage: Storage, db: Database, retention_ms: int,
                         acked: int | None, now_ms: float | None = None,
                         tombstones: bool = True) -> dict[str, int]:
    """Prune ``db``'s log entries older than ``retention_ms``, and tombstones that are
    both that old and acknowledged by every peer (``acked``: see :func:`ack_floor`).

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
    job = retention.prune_log_job(db, through, tomb_floor, read_through)
    result: dict[str, int] = await storage.write(job)
    if result["entries"] or result["tombstones"]:
        log.info("pruned %d log entries and %d tombstones of %s through %d",
                 result["entries"], result["tombstones"], db.name, result["through"])
    return result


async def retention_loop(storage: Storage, interval: float,
                         retention_ms: Callable[[], int],
                         acked: Callable[[str], int | None]) -> None:
    """Every ``interval`` seconds prune each database's log (tombstones at most every
    ``TOMBSTONE_EVERY``); ``acked(database)`` is that database's :func:`ack_floor`."""
    last_sweep = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        sweep = time.monotonic() - last_sweep >= max(TOMBSTONE_EVERY, interval)
        if sweep:
            last_sweep = time.monotonic()
        for db in list(storage.databases.values()):
            try:
                await prune_database(storage, db, retention_ms(), acked(db.name),
                                     tombstones=sweep)
            except Exception:
                if db.closed:
                    # Dropped (by a peer's drop, through the system link) while it was
                    # read or pruned: its environment closed under the read, which is
                    # no failure of pruning.
                    continue
                log.exception("pruning %s failed", db.name)
