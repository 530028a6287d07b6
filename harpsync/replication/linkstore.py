"""A subscriber's view of this node's storage (the ``LinkStore`` seam).

Every write is one writer job that commits the link's cursor with what it applies, so
a crash can neither lose nor double-apply a batch. The subscriber sees only this small
surface; the storage package keeps its own types and jobs (``ingest``, ``deadletters``,
``schema``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from harpsync.replication import peers
from harpsync.replication.seams import Entries, Rows
from harpsync.storage import deadletters, ingest, logscan, schema
from harpsync.storage.conflicts import Review
from harpsync.storage.horizon import Sweep
from harpsync.storage.ingest import ApplyStats
from harpsync.storage.store import Storage
from harpsync.storage.writer import WriteContext


class StorageLinkStore:
    """:class:`~harpsync.replication.seams.LinkStore` over a :class:`Storage`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def has_database(self, name: str) -> bool:
        return name in self.storage.databases

    def hello_schema(self, database: str) -> tuple[dict[str, Any], dict[int, str]]:
        db = self.storage.databases[database]
        return table_definitions(self.storage, db), dict(db.origin_names)

    def cursor(self, database: str, peer: str) -> dict[str, Any]:
        return self.storage.databases[database].cursor(peer)

    def origin_floors(self, database: str, origins: Iterable[str]) -> dict[str, int | None]:
        # Committed, not ``origin_hw``: a job raises that before its commit, and a floor
        # from a job that then failed would skip the entries it did not apply.
        return self.storage.databases[database].committed_hw(origins)

    def wall_now_ms(self) -> int:
        return int(self.storage.hlc.wall_now_ms())

    async def learn_schema(self, database: str, tables: Mapping[str, Any], peer: str) -> None:
        await schema.apply_hello(self.storage, database, tables, peer)

    async def write_cursor(self, database: str, peer: str, cursor: dict[str, Any],
                           sweeps: Sequence[Sweep] = (),
                           floors: Mapping[str, int] | None = None) -> Any:
        # The database may be dropped (by a peer, through the system link) while this
        # link still runs, until the reconcile retires it: the cursor then belongs to
        # an incarnation that is gone, and is not written (as the apply jobs do). Before,
        # the lookup raised KeyError and the link failed with a logged traceback; and a
        # job queued before the drop committed wrote into the dropped environment or,
        # re-created meanwhile, into the new incarnation.
        db = self.storage.databases.get(database)
        if db is None:
            return None

        def job(ctx: WriteContext) -> None:
            if self.storage.databases.get(database) is db:
                ingest.apply_sweeps(self.storage, ctx, db, peer, sweeps)
                if floors:
                    ingest.raise_floors(ctx, db, floors)
                ingest.write_cursor(ctx, db=db, peer=peer, cursor=cursor)

        return await self.storage.write(job)

    async def apply_entries(self, database: str, peer: str, entries: Entries,
                            origins: Mapping[int, str], cursor: dict[str, Any],
                            max_skew_ms: int, local_name: str, floor: int,
                            review: Review | None,
                            held_floors: frozenset[str] = frozenset()) -> ApplyStats:
        job, prepare = ingest.apply_entries_job(self.storage, database, peer, entries, origins,
                                                cursor, max_skew_ms, local_name, floor, review,
                                                held_floors)
        stats: ApplyStats = await self.storage.write(job, prepare)
        return stats

    async def apply_rows(self, database: str, peer: str, table: str, rows: Rows,
                         origins: Mapping[int, str], cursor: dict[str, Any], floor: int,
                         incarnation: int | None, review: Review | None,
                         sweeps: Sequence[Sweep] = ()) -> Any:
        return await self.storage.write(ingest.apply_rows_job(
            self.storage, database, peer, table, rows, origins, cursor, floor, incarnation,
            review, sweeps))

    async def dead_letter(self, database: str, peer: str, letters: list[dict[str, Any]],
                          cursor: dict[str, Any]) -> Any:
        return await self.storage.write(deadletters.record_job(
            self.storage, database, peer, letters, cursor))


async def held_floors(db: Any, through_seq: int) -> dict[str, int]:
    """``logscan.held_floors`` off the event loop: finding this node's newest entry
    through ``through_seq`` may read far back in a log of relayed entries."""
    return await asyncio.to_thread(logscan.held_floors, db, through_seq)


def table_definitions(storage: Storage, db: Any) -> dict[str, Any]:
    """The schema a hello describes for ``db`` (tables, drop markers; databases in system)."""
    return schema.describe_schema(storage, db,
                                  lambda name: peers.table_allowed(db.name, name, None))
