"""Background upkeep of the replication log: retention by acknowledgement and by age."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from harpsync.replication import peers
from harpsync.storage import retention
from harpsync.storage.database import Database

if TYPE_CHECKING:
    from harpsync.replication.replicator import Replicator

log = logging.getLogger(__name__)


def ack_floor(rep: Replicator, db: Database) -> int | None:
    """The sequence every peer that receives ``db`` has acknowledged (None if no peer)."""
    floors = [rep.acks.get((name, db.name), 0) for name, row in rep.rows.items()
              if peers.publish_tables(row, db.name) is not False]
    return min(floors) if floors else None


async def prune_database(rep: Replicator, db: Database, now_ms: float | None = None,
                         tombstones: bool = True) -> dict[str, int]:
    """Prune ``db``'s log entries older than ``auditRetention``, and tombstones that are
    both that old and acknowledged by every peer.

    Log entries are kept for the whole retention even when every peer has them, so the
    log stays a useful audit trail; a peer away for longer is repaired by a full copy.
    """
    now_ms = rep.storage.hlc.wall_now_ms() if now_ms is None else now_ms
    cutoff_version = int(now_ms - rep.config.retention_ms()) << 16
    through = retention.seq_for_time(db, cutoff_version)
    acked = ack_floor(rep, db)
    tomb_floor = None
    if not tombstones:
        pass
    elif acked is None:
        tomb_floor = cutoff_version
    elif acked:
        tomb_floor = min(cutoff_version, retention.version_at(db, acked) or 0)
    if through <= db.pruned_through() and not tomb_floor:
        return {"entries": 0, "tombstones": 0, "through": db.pruned_through()}
    job = retention.prune_log_job(db, through, tomb_floor)
    result: dict[str, int] = await rep.storage.write(job)
    if result["entries"] or result["tombstones"]:
        log.info("pruned %d log entries and %d tombstones of %s through %d",
                 result["entries"], result["tombstones"], db.name, result["through"])
    return result


TOMBSTONE_EVERY = 60.0  # seconds between tombstone sweeps (they scan every tombstone)


async def retention_loop(rep: Replicator) -> None:
    interval = rep.config.duration_ms("replication.retentionInterval") / 1000.0
    last_sweep = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        sweep = time.monotonic() - last_sweep >= max(TOMBSTONE_EVERY, interval)
        if sweep:
            last_sweep = time.monotonic()
        for db in list(rep.storage.databases.values()):
            try:
                await prune_database(rep, db, tombstones=sweep)
            except Exception:
                log.exception("pruning %s failed", db.name)
