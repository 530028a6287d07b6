"""harpsync/storage/compare.py on real LMDB: what a verify reads and what a repair writes."""

from __future__ import annotations

import asyncio

import pytest

from harpsync.errors import BadRequestError
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
        assert changed["changed"] == []

    asyncio.run(run())


def test_a_repair_after_a_re_create_writes_nothing(storage: Storage) -> None:
    """A verify compared the table's old incarnation; dropped and re-created before the
    repair, the new table takes none of the old comparison's rows."""
    from types import SimpleNamespace

    from harpsync.replication.verifier import BOTH, Outcome, Pair, Verifier

    async def run() -> None:
        await storage.create_table("data", "t", "id")
        await storage.write(writes.write_records(storage, "data", "t",
                                                 [{"id": 1, "v": "old"}], "insert", None))
        theirs = _row(storage, 1)  # the peer's row that won the comparison
        await storage.write(writes.delete_records(storage, "data", "t", [1], None))
        verifier = Verifier(SimpleNamespace(storage=storage, node_name="node-a",  # type: ignore[arg-type]
                                            review=lambda peer, database: None))
        outcome = Outcome(Pair("node-b", "https://unused", "data", "t", BOTH))
        outcome.incarnation = storage.table("data", "t")[1].version  # as _compare notes it
        outcome.differences = [(encode_id(1), _row(storage, 1), theirs, -1)]
        await storage.drop_table("data", "t")
        await storage.create_table("data", "t", "id")
        with pytest.raises(BadRequestError, match="re-created"):
            await verifier._repair(outcome, dry_run=False)
        assert _row(storage, 1) is None

    asyncio.run(run())


def test_a_repair_skips_a_live_row_that_came_without_its_record(storage: Storage) -> None:
    """A peer gives whole records only of tables it publishes to this node; a winning
    live row it answered without one cannot be stored: it is skipped (and reported
    unchanged), and the rows with records in the same repair still land."""
    async def run() -> None:
        await storage.create_table("data", "t", "id")
        _db, table = storage.table("data", "t")
        version = storage.hlc.now()
        changed = await storage.write(compare.repair_job(
            storage, "data", "t", table.version,
            [(encode_id(1), [b"12345678", version, "node-b", False, None]),
             (encode_id(2), [b"87654321", version, "node-b", False, {"id": 2}])]))
        assert changed["changed"] == [2]
        assert _row(storage, 1) is None
        row = _row(storage, 2)
        assert row is not None and row[4] == {"id": 2}

    asyncio.run(run())
