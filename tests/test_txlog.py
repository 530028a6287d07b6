"""operations/txlog.py over a real LMDB log: how a table's transactions read back."""

from __future__ import annotations

import asyncio

from harpsync.storage import compare, writes
from harpsync.storage.keys import encode_id
from harpsync.storage.store import Storage
from operations.txlog import read_entries


def test_an_entry_with_deletes_and_upserts_reads_as_both(storage: Storage) -> None:
    """A repair logs one entry per origin holding deletes and upserts together; read
    back, its deletes stay deletes (ids in ``hash_values``) instead of showing as
    upserts of bare ids."""
    async def run() -> None:
        await storage.create_table("data", "t", "id")
        await storage.write(writes.write_records(storage, "data", "t", [{"id": 1}],
                                                 "insert", None))
        db, table = storage.table("data", "t")
        version = storage.hlc.now()
        await storage.write(compare.repair_job(
            storage, "data", "t", table.version,
            [(encode_id(1), [b"1" * 8, version, "node-b", True, None]),
             (encode_id(2), [b"2" * 8, version, "node-b", False, {"id": 2, "v": 2}])]))
        entries = read_entries(db, "t", "id", None, None, None)
        assert [(e["operation"], [r["id"] for r in e["records"]]) for e in entries] == [
            ("insert", [1]), ("delete", [1]), ("upsert", [2])]
        assert entries[1]["hash_values"] == [1]

    asyncio.run(run())
