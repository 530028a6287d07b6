"""harpsync/storage/compare.py on real LMDB: what a verify reads and what a repair writes."""

from __future__ import annotations

import asyncio

from harpsync.storage import compare, writes
from harpsync.storage.keys import encode_id
from harpsync.storage.store import Storage


def _row(storage: Storage, rid: int) -> compare.RowState:
    db, table = storage.table("data", "t")
    return compare.read_rows(db, table, [encode_id(rid)], True)[0]


def test_repair_never_overwrites_a_newer_row(storage: Storage) -> None:
    """A repair carries the row that won when the verify compared; a write that landed
    here since is newer and stays (last writer wins), and the repair changes nothing."""
    async def run() -> None:
        await storage.create_table("data", "t", "id")
        await storage.write(writes.write_records(storage, "data", "t",
                                                 [{"id": 1, "v": "old"}], "insert", None))
        stale = _row(storage, 1)  # what the peer sent when the verify compared
        await storage.write(writes.write_records(storage, "data", "t",
                                                 [{"id": 1, "v": "new"}], "update", None))
        _db, table = storage.table("data", "t")
        assert stale is not None
        changed = await storage.write(compare.repair_job(
            storage, "data", "t", table.version, [(encode_id(1), list(stale))]))
        row = _row(storage, 1)
        assert row is not None and row[4]["v"] == "new"
        assert changed == []

    asyncio.run(run())
