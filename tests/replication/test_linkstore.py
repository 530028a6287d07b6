"""StorageLinkStore (the subscriber's view of storage) over a real Storage."""

from __future__ import annotations

import asyncio

from harpsync.replication.linkstore import StorageLinkStore
from harpsync.storage.store import Storage


def test_a_cursor_for_a_dropped_database_is_not_written_and_does_not_fail(
        storage: Storage) -> None:
    """A link still running when its database was dropped (a peer's drop arriving
    through the system link, before the reconcile retires the link) writes no cursor
    and does not fail: before, the lookup raised KeyError and the link logged a
    traceback (lifecycle seed 623 with --lifecycle-rounds=3)."""
    store = StorageLinkStore(storage)

    async def run() -> None:
        await storage.create_table("dbx", "t", "id")
        await storage.drop_database("dbx")
        assert await store.write_cursor("dbx", "node-b", {"seq": 5}) is None

    asyncio.run(run())
    assert "dbx" not in storage.databases


def test_a_cursor_queued_before_a_drop_stays_out_of_the_recreated_database(
        storage: Storage) -> None:
    """A cursor write of the old incarnation that reaches the writer after the drop and
    a re-create of the database is not written into the new incarnation (its links
    start from an empty cursor: a full copy); before, the job wrote into the dropped
    environment (an LMDB error, in some runs)."""
    store = StorageLinkStore(storage)

    async def run() -> None:
        await storage.create_table("dbx", "t", "id")
        drop = asyncio.ensure_future(storage.drop_database("dbx"))
        await asyncio.sleep(0)  # the drop's job is queued first
        cursor = asyncio.ensure_future(store.write_cursor("dbx", "node-b", {"seq": 5}))
        await asyncio.sleep(0)
        await drop
        await storage.create_table("dbx", "t", "id")
        await cursor
        assert storage.databases["dbx"].cursor("node-b").get("seq") in (None, 0)

    asyncio.run(run())
