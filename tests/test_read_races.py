"""Reads racing drop_database, on real LMDB: a 404 of the dropped database, never an
LMDB error about a closed environment (which the API answered with a 500)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harpsync.storage import reads, writes
from harpsync.storage.errors import NoSuchDatabaseError
from harpsync.storage.store import Storage


async def test_reads_of_a_database_dropped_under_them_are_404s(tmp_path: Path) -> None:
    storage = Storage(tmp_path, "node-a", 1 << 27)
    storage.open()
    try:
        await storage.create_database("d")
        await storage.create_table("d", "t", "id")
        records = [{"id": i, "name": f"n{i}"} for i in range(2500)]
        await storage.write(writes.write_records(storage, "d", "t", records, "insert", "u"))
        db = storage.database("d")
        table = db.tables["t"]
        rows = reads.scan(db, table)  # reads a chunk at a time
        assert [next(rows)["id"] for _ in range(3)] == [0, 1, 2]
        await storage.drop_database("d")
        with pytest.raises(NoSuchDatabaseError, match="database 'd' does not exist"):
            list(rows)
        with pytest.raises(NoSuchDatabaseError, match="database 'd' does not exist"):
            reads.get_by_ids(db, table, [1])
    finally:
        storage.close()
